"""The Python API, for notebooks and scripts; the ``lightstudy`` commands are built on it.

>>> import lightstudy
>>> study = lightstudy.run("studies/digits.yaml", workers=2)    # runs to the end, shows progress
>>> study.best_value, study.best_params
>>> study.export("exported/")                                    # checkpoint + config.yaml
>>> study = lightstudy.load("digits")                            # later, or from another machine

Every function finds the database by the one rule of the CLI (:func:`lightstudy.locations.storage_url`):
``storage=``, else ``$LIGHTSTUDY_STORAGE``, else the spec's, else ``runs/<study>/study.db``. Errors are
:class:`lightstudy.errors.LightstudyError` with the message the CLI prints.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightstudy.errors import LightstudyError
from lightstudy.locations import storage_url
from lightstudy.project import use_project_folder

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    from optuna.trial import FrozenTrial

    from lightstudy.predict import Predictions
    from lightstudy.reproduce import Reproduction
    from lightstudy.spec import StudySpec

__all__ = ["Study", "WorkersFailed", "create", "load", "run", "validate"]

log = logging.getLogger(__name__)


class Study:
    """A lightstudy study in its database: what it found, and what to do with it.

    Reads are live (each property asks the database), so a study still running elsewhere shows
    its latest trials. Several objectives: :attr:`best_trials` is the Pareto front; the single
    ``best_*`` properties raise.
    """

    def __init__(self, study: optuna.Study, spec: StudySpec, url: str, run_dir: Path | None = None) -> None:
        self._study = study
        self.spec = spec
        self.url = url
        self.run_dir = Path(run_dir) if run_dir is not None else spec.run_dir

    @property
    def name(self) -> str:
        return self.spec.study.name

    @property
    def optuna(self) -> optuna.Study:
        """The ``optuna.Study`` itself (for optuna.visualization, ``study.optuna.trials``, ...)."""
        return self._study

    @property
    def trials(self) -> list[FrozenTrial]:
        return self._study.get_trials(deepcopy=False)

    @property
    def best_trials(self) -> list[FrozenTrial]:
        """Complete trials best first (one objective), or the Pareto front (several), as ``best`` lists them."""
        from lightstudy.ranking import pareto_front, ranked

        if self.spec.study.is_multi_objective:
            return pareto_front(self.trials, self.spec.study.directions)
        return ranked(self.trials, self.spec)

    @property
    def best_trial(self) -> FrozenTrial:
        """The best complete trial (:mod:`lightstudy.ranking`'s order: ties go to the earlier trial).

        Raises:
            LightstudyError: no complete trial yet, or the study has several objectives.
        """
        from lightstudy.evaluate import select_trial

        if self.spec.study.is_multi_objective:
            raise LightstudyError(
                f"study {self.name!r} has several objectives: no single best trial",
                fix="use study.best_trials (the Pareto front)",
            )
        return select_trial(self._study, self.spec, rank=1)

    @property
    def best_value(self) -> float:
        return float(self.best_trial.values[0])

    @property
    def best_params(self) -> dict[str, Any]:
        return dict(self.best_trial.params)

    def trials_dataframe(self, **kwargs: Any) -> pd.DataFrame:
        """Optuna's ``trials_dataframe``: one row per trial (``kwargs`` as Optuna's)."""
        return self._study.trials_dataframe(**kwargs)

    def trial(self, *, rank: int | None = None, number: int | None = None) -> FrozenTrial:
        """The ``rank``-th best complete trial (1: the best), or the complete trial ``number``."""
        from lightstudy.evaluate import select_trial

        return select_trial(self._study, self.spec, rank=rank, number=number)

    def export(self, dest: str | Path, *, rank: int = 1, trial: int | None = None) -> dict[str, Path]:
        """Write a kept trial's checkpoint, ``config.yaml`` (``LightningCLI fit --config``),
        ``params.json`` and ``metrics.json`` to the folder ``dest``; returns their paths by kind."""
        from lightstudy.evaluate import export_trial

        chosen = self.trial(rank=None if trial is not None else rank, number=trial)
        return export_trial(self._study, self.spec, self.run_dir, chosen, Path(dest))

    def test(self, top: int = 1) -> dict[int, dict[str, float]]:
        """``trainer.test`` with the kept checkpoints of the best ``top`` trials; the metrics are
        stored in the study (``status``, ``best`` and ``report`` show them) and returned by trial."""
        from lightstudy.dashboard import write_trial_note
        from lightstudy.evaluate import evaluate_on_test

        if top < 1:
            raise LightstudyError(f"top must be >= 1, but got {top}", fix="pass top=1 or more")
        results = evaluate_on_test(self._study, self.spec, self.run_dir, top)
        for number in results:  # the dashboard's note of each tested trial shows its test metrics
            write_trial_note(self._study, self.spec, number)
        return results

    def predict(
        self,
        out: str | Path = "predictions.csv",
        *,
        rank: int | None = None,
        trial: int | None = None,
        files: Sequence[str | Path] = (),
        data: dict[str, Any] | None = None,
    ) -> Predictions:
        """Predict with the best (or ``rank``-th, or ``trial``) kept checkpoint through
        ``predict_step``, over the data module's predict dataloader or the ``files``; ``data``
        overrides the data module's init_args. Writes ``out`` (.csv or .pt)."""
        from lightstudy.predict import predict

        if rank is not None and trial is not None:
            raise LightstudyError("give rank or trial, not both", fix="drop one of them")
        return predict(
            self._study,
            self.spec,
            self.run_dir,
            Path(out),
            rank=rank,
            number=trial,
            files=[Path(f) for f in files],
            data_args=dict(data or {}),
        )

    def report(self, path: str | Path = "report.html") -> Path:
        """Write one self-contained HTML page (optuna.visualization plots, the kept trials)."""
        from lightstudy.report import render_report

        page = render_report(self._study, self.spec, self.run_dir)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
        return out

    def reproduce(self, trial: int) -> Reproduction:
        """Train a finished trial again from its record and compare the values."""
        from lightstudy.reproduce import reproduce

        return reproduce(self._study, self.spec, trial)

    def __repr__(self) -> str:
        from lightstudy.storage import redact

        return f"Study({self.name!r}, storage={redact(self.url)!r}, trials={len(self.trials)})"


class WorkersFailed(LightstudyError):
    """``run`` ended with workers that exited with an error; ``study`` is what they left."""

    def __init__(self, message: str, *, fix: str, study: Study) -> None:
        super().__init__(message, fix=fix)
        self.study = study


def validate(file: str | Path) -> StudySpec:
    """Load a study file and check it completely (imports the user's classes; no database).

    The current folder and the file's folder are put on ``sys.path`` (and ``PYTHONPATH``) first.

    Raises:
        SpecError: naming the file, the key, the rule, the value and the fix.
    """
    from lightstudy.lightning_config import check_spec
    from lightstudy.spec import load_spec

    use_project_folder(file)
    spec = load_spec(file)
    check_spec(spec)
    return spec


def create(
    file: str | Path,
    *,
    storage: str | None = None,
    update_spec: bool = False,
    n_trials: int | None = None,
    timeout: float | None = None,
    run_dir: str | Path | None = None,
) -> Study:
    """Create the study (idempotent) and store its spec; ``n_trials``/``timeout``/``run_dir``
    override the file's."""
    from lightstudy.spec import with_overrides
    from lightstudy.study import create_study

    spec = with_overrides(validate(file), n_trials=n_trials, timeout=timeout, run_dir=str(run_dir) if run_dir else None)
    url = storage_url(storage, spec=spec)
    study = create_study(spec, url, update_spec=update_spec or n_trials is not None or timeout is not None)
    return Study(study, spec, url)


def run(
    file: str | Path,
    *,
    workers: int | None = None,
    gpus: str | Sequence[int] | None = None,
    trials_per_gpu: int | str = 1,
    gpus_per_trial: int | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    run_dir: str | Path | None = None,
    update_spec: bool = False,
    threads: int | None = None,
    console: Any = None,
) -> Study:
    """Create (or resume) the study of ``file`` and run it to the end with local workers.

    Progress is shown with rich: a line per finished trial (in Jupyter too, where rich renders
    it as the cell's output) and, on a terminal, a live bar. Workers are processes of their own
    (their logs: ``<run dir>/workers``), so a notebook's kernel stays free of the trials' memory.
    Interrupting the kernel stops them the way Ctrl-C does: the running trials are handed back
    and retried on the next run. Where torch is imported already (a notebook's usually is), the
    spec is checked here and the trials are forked by this process's warm process, which stays
    for the next study (:func:`lightstudy.warmserver.shared_warm`): a second run starts at once.

    Args:
        file: The study file (YAML).
        workers: CPU workers (when no ``gpus``).
        gpus: ``"auto"``, ``"0,1"`` or ``[0, 1]``: one worker per GPU (``trials_per_gpu`` each).
        trials_per_gpu: Workers per GPU, or ``"auto"``: as many as the first trial's measured
            peak memory allows (README, "One GPU box").
        gpus_per_trial: Devices one trial runs on (DDP) when ``trainer.devices`` does not say.
        n_trials, timeout: Override the study block's.
        storage: The database URL (default: as the CLI finds it).
        run_dir: The run folder (default: the spec's, ``runs/<study>``).
        update_spec: Replace the stored spec of an existing study of the same name.
        threads: torch threads per trial (default: the cores split between the workers).
        console: A ``rich.console.Console`` to show progress on (default: stdout).

    Raises:
        LightstudyError: a bad spec or option.
        WorkersFailed: a worker exited with an error (``.study`` is the study as it ended).
    """
    from lightstudy.devices import check_devices
    from lightstudy.launcher import Launcher, plan_slots, trials_per_gpu_count
    from lightstudy.spec import load_spec, trial_world_size, with_overrides
    from lightstudy.study import create_study
    from lightstudy.warmserver import shared_warm, start_warm

    if gpus is not None and not isinstance(gpus, str):
        gpus = ",".join(str(g) for g in gpus)
    auto = trials_per_gpu_count(trials_per_gpu) is None  # a bad value: one line, before the study is made
    # The spec's schema here; its classes, config and search space in the warm process, which
    # imports torch for the trials anyway (the CLI never does): the errors are validate's.
    use_project_folder(file)
    spec = with_overrides(
        load_spec(file), n_trials=n_trials, timeout=timeout, run_dir=str(run_dir) if run_dir else None
    )
    url = storage_url(storage, spec=spec)
    per_trial = gpus_per_trial or trial_world_size(spec.config)
    if per_trial > 1 and not url.startswith(("sqlite", "postgresql", "mysql")):
        check_devices(spec, per_trial, url)
    gpu_trials = str((spec.config.get("trainer") or {}).get("accelerator", "auto")) != "cpu"
    slots = plan_slots(gpus, workers, trials_per_gpu, gpus_per_trial=per_trial if gpu_trials else 1, threads=threads)
    if gpus and gpus != "auto" and gpu_trials and len(gpus.split(",")) % per_trial:
        log.warning("%d GPU(s) left idle: a trial runs on %d", len(gpus.split(",")) % per_trial, per_trial)
    # A process that has torch already (a notebook, a test) checks here, at no import's cost.
    checked_here = "torch" in sys.modules
    if checked_here:
        from lightstudy.lightning_config import check_spec

        check_spec(spec)
    made = next((p for p in reversed([spec.run_dir, *spec.run_dir.parents]) if not p.exists()), None)
    # Checked here: this process's own warm process serves the run (kept for its next study, as
    # its in-process workers' is); else one for this run, which checks the spec and logs to warm.log.
    own = not checked_here
    warm = start_warm(spec, check=True, log=spec.run_dir / "workers" / "warm.log") if own else shared_warm(spec)
    out = console if console is not None else _console()
    auto = auto and any(s.gpu is not None for s in slots)
    launcher = Launcher(
        url, spec, slots, spec.run_dir, out, gpus_per_trial=gpus_per_trial, packing=auto, warm=warm, threads=threads
    )
    going = False
    try:
        from lightstudy.launcher import can_fork
        from lightstudy.storage import preload

        # Forked from here, the workers have Optuna, SQLAlchemy and the storage's schema loaded
        # (of `lightstudy.worker`, only ~30 ms is left for each to import once `run` has read
        # its spec); spawned ones import them meanwhile, and so does this process.
        if can_fork():
            preload(url)
        launcher.start()  # the workers wait for the study
        preload(url)  # the study is created at once when the spec is good (a no-op if done)
        warm.ready()  # the spec checked, torch and the study's classes imported, once for every worker
        updating = update_spec or n_trials is not None or timeout is not None
        created = Study(create_study(spec, url, update_spec=updating), spec, url)
        from lightstudy.storage import redact

        where = ", ".join(f"GPU {s.gpu}" if s.gpu is not None else "CPU" for s in slots)
        out.print(
            f"study [bold]{spec.study.name}[/bold] in {redact(url)}: {len(slots)} worker(s) "
            f"({where}); logs in {spec.run_dir / 'workers'}"
        )
        going = True
        result = launcher.run()
    finally:
        if not going:
            launcher.cancel()
        if own:
            warm.stop()
        if not going and made is not None:  # a spec refused (or an interrupt) leaves no run folder
            import shutil

            shutil.rmtree(made, ignore_errors=True)
    failed = [i for i, code in enumerate(result.exit_codes) if code not in (0, None)]
    if failed and not result.interrupted:
        raise WorkersFailed(
            f"worker(s) {', '.join(map(str, failed))} exited with an error",
            fix=f"see {spec.run_dir / 'workers'}/worker-<i>.log",
            study=created,
        )
    return created


def load(name: str, *, storage: str | None = None, run_dir: str | Path | None = None) -> Study:
    """The study ``name`` as it is in its database (it must exist).

    Raises:
        StorageError: nothing names a database; LightstudyError: no such study.
    """
    from lightstudy.study import load_study

    use_project_folder()  # its classes import from here, for test/predict/reproduce
    folder = Path(run_dir) if run_dir is not None else None
    url = storage_url(storage, study=name, run_dir=folder)
    study, spec = load_study(url, name)
    return Study(study, spec, url, folder)


def _console() -> Any:
    """A rich console on stdout; in Jupyter, rich renders its output in the cell."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)

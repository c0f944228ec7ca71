"""The commands that make and run a study: init, validate, create, run, worker, enqueue, proxy, dashboard.

Each is a plain function whose docstring is its ``--help``, registered on
:data:`lightstudy.cli.shared.app`. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lightstudy.cli.shared import GpusPerTrialOpt, RunDirOpt, StorageOpt, StudyRunDirOpt, app, console, storage_url
from lightstudy.errors import LightstudyError

if TYPE_CHECKING:
    from lightstudy.spec import StudySpec

__all__ = ["create", "dashboard", "enqueue_command", "init", "proxy", "run", "validate", "worker"]


def _load(file: Path) -> StudySpec:
    """Load a spec and check it completely (imports user classes, from the project folder too)."""
    from lightstudy.api import validate as check

    return check(file)


@app.command()
def validate(file: Annotated[Path, typer.Argument(help="Study spec (YAML).")]) -> None:
    """Check a study spec completely, without training and without touching any database.

    Checks YAML syntax, keys, types, ranges, class paths (importable LightningModule and
    LightningDataModule), init_args against the classes, search-space paths and values,
    sampler and pruner. Exits 2 with a one-line error naming file, key, rule, value and fix.

    Example: lightstudy validate studies/digits.yaml
    """
    spec = _load(file)
    from lightstudy.storage import check_url

    url = storage_url(None, spec=spec)
    check_url(url)
    from lightstudy.devices import check_ddp_storage
    from lightstudy.spec import trial_world_size

    check_ddp_storage(trial_world_size(spec.config), url)
    console().print(
        f"[green]ok[/green] {file}: study {spec.study.name!r}, "
        f"{len(spec.search_space)} parameters, "
        f"{spec.study.n_trials or 'unlimited'} trials, metric "
        f"{', '.join(spec.study.metrics)} ({', '.join(spec.study.directions)})"
    )


@app.command()
def create(
    file: Annotated[Path, typer.Argument(help="Study spec (YAML).")],
    storage: StorageOpt = None,
    update_spec: Annotated[
        bool,
        typer.Option("--update-spec", help="Replace the stored spec of an existing study of the same name."),
    ] = False,
) -> None:
    """Create the study in the database and store its spec (idempotent).

    Workers anywhere then need only --storage and --study. Creating a study that exists with
    a different spec is an error unless --update-spec is given.

    Example: lightstudy create studies/digits.yaml --storage postgresql+psycopg://db/studies
    """
    from lightstudy.api import create as create_study
    from lightstudy.storage import redact

    found = create_study(file, storage=storage, update_spec=update_spec)
    spec, url = found.spec, found.url
    console().print(
        f"study {spec.study.name!r} ready in {redact(url)}\n"
        f"start workers: lightstudy worker --storage {redact(url)} --study {spec.study.name}"
    )


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="Study spec (YAML).")],
    storage: StorageOpt = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-w", help="CPU workers (when no --gpus).", show_default=False),
    ] = None,
    gpus: Annotated[
        str | None,
        typer.Option(
            "--gpus",
            help="GPUs to use: 'auto' or indices like 0,1,2 (one worker per GPU).",
            show_default=False,
        ),
    ] = None,
    trials_per_gpu: Annotated[
        str,
        typer.Option(
            "--trials-per-gpu",
            help=(
                "Workers sharing each GPU, or 'auto': measure the first trial's peak GPU memory, then run "
                "as many trials per GPU as fit with a margin, each capped at its share; one that runs out "
                "of memory is retried alone."
            ),
        ),
    ] = "1",
    gpus_per_trial: GpusPerTrialOpt = None,
    n_trials: Annotated[
        int | None, typer.Option("--n-trials", help="Override study.n_trials.", show_default=False)
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", help="Override study.timeout (seconds).", show_default=False),
    ] = None,
    run_dir: RunDirOpt = None,
    update_spec: Annotated[
        bool, typer.Option("--update-spec", help="Replace the stored spec of an existing study.")
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help="torch threads per trial (default: the cores split between the workers).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Create (or resume) a study and run it to the end with local workers, showing progress.

    One worker per GPU with --gpus (CUDA_VISIBLE_DEVICES pinned), or --workers N CPU workers
    with torch threads split between them (or --threads each). Ends with the best trial and where its checkpoint is.

    Example: lightstudy run studies/digits.yaml --workers 2
    """
    from lightstudy.api import WorkersFailed
    from lightstudy.api import run as run_study
    from lightstudy.cli.show import print_best

    try:
        found = run_study(
            file,
            workers=workers,
            gpus=gpus,
            trials_per_gpu=trials_per_gpu,
            gpus_per_trial=gpus_per_trial,
            n_trials=n_trials,
            timeout=timeout,
            storage=storage,
            run_dir=run_dir,
            update_spec=update_spec,
            threads=threads,
            console=console(),
        )
    except WorkersFailed as e:
        print_best(e.study.name, e.study.url, e.study.run_dir, console(), final=True)
        raise
    print_best(found.name, found.url, found.run_dir, console(), final=True)


@app.command()
def worker(
    study: Annotated[str, typer.Option("--study", help="Study name.")],
    storage: StorageOpt = None,
    gpu: Annotated[
        str | None,
        typer.Option(
            "--gpu",
            help="GPU(s) this worker owns, e.g. 2 (sets CUDA_VISIBLE_DEVICES); 'cpu' hides all GPUs.",
            show_default=False,
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="torch threads per trial.", show_default=False)
    ] = None,
    run_dir: RunDirOpt = None,
    max_trials: Annotated[
        int | None,
        typer.Option("--max-trials", help="Exit after this many trials of this worker.", show_default=False),
    ] = None,
    gpus_per_trial: GpusPerTrialOpt = None,
) -> None:
    """Run trials of a study until its study-wide budget is spent (start one per GPU).

    The spec comes from the database, so any machine that reaches it can help. SIGTERM or
    Ctrl-C: the running trial saves a checkpoint and is handed back for a retry; twice: stop now.

    Example: lightstudy worker --storage postgresql+psycopg://db/studies --study digits --gpu 0
    """
    from lightstudy.worker import Worker

    url = storage_url(storage, study=study, run_dir=run_dir)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = "" if gpu.lower() == "cpu" else gpu
    w = Worker(
        url,
        study,
        run_dir=run_dir,
        gpu=None if gpu is None or gpu.lower() == "cpu" else gpu,
        threads=threads,
        max_trials=max_trials,
        gpus_per_trial=gpus_per_trial,
    )
    report = w.run()
    logging.getLogger("lightstudy").info(
        "worker done: %d complete, %d pruned, %d failed, %d handed back",
        report.complete,
        report.pruned,
        report.failed,
        report.interrupted,
    )


@app.command("enqueue")
def enqueue_command(
    name: Annotated[str, typer.Argument(help="Study name.")],
    storage: StorageOpt = None,
    run_dir: StudyRunDirOpt = None,
    params: Annotated[
        list[str] | None,
        typer.Option(
            "--params",
            "-p",
            help="path=value of one parameter; repeat for each (one configuration).",
            show_default=False,
        ),
    ] = None,
    from_study: Annotated[
        str | None, typer.Option("--from-study", help="Queue the best trials of this study.", show_default=False)
    ] = None,
    from_storage: Annotated[
        str | None,
        typer.Option("--from-storage", help="Its database (default: this study's).", show_default=False),
    ] = None,
    top: Annotated[int, typer.Option("--top", help="How many of its best trials (with --from-study).")] = 5,
) -> None:
    """Queue configurations to evaluate before any sampled trial (Optuna's enqueue_trial).

    Either one configuration from --params path=value (parameters left out are sampled), or the
    parameters of the best trials of another study (a warm start). Queued trials count toward
    n_trials; a configuration already in the study is not queued again.

    Example: lightstudy enqueue digits -p model.init_args.lr=0.003 -p data.init_args.batch_size=64
    """
    import yaml

    from lightstudy.study import best_params, enqueue, load_study

    if bool(params) == bool(from_study):
        raise LightstudyError(
            "give either --params path=value ... or --from-study NAME",
            fix="e.g. lightstudy enqueue NAME -p model.init_args.lr=0.01",
        )
    url = storage_url(storage, study=name, run_dir=run_dir)
    study, spec = load_study(url, name)
    if params:
        config: dict[str, Any] = {}
        for item in params:
            path, sep, text = item.partition("=")
            if not sep or not path:
                raise LightstudyError(
                    f"--params expects path=value, but got {item!r}", fix="e.g. -p model.init_args.lr=0.01"
                )
            config[path.strip()] = yaml.safe_load(text)
        configurations = [config]
    else:
        assert from_study is not None
        if top < 1:
            raise LightstudyError(f"--top must be >= 1, but got {top}", fix="pass --top 1 or more")
        paths = {p.path: p for p in spec.search_space}
        configurations = []
        for found in best_params(from_storage or url, from_study, top):
            kept = {k: v for k, v in found.items() if k in paths and paths[k].contains(v)}
            dropped = sorted(set(found) - set(kept))
            if dropped:
                logging.getLogger("lightstudy").warning(
                    "not carried over (not in this search space, or outside it): %s", ", ".join(dropped)
                )
            if kept:
                configurations.append(kept)
    added = enqueue(study, spec, configurations)
    console().print(f"queued {added} configuration(s) in {name} ({len(configurations) - added} already there)")


@app.command()
def proxy(
    storage: StorageOpt = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; it has no authentication: keep it private.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port.")] = 13000,
    threads: Annotated[int, typer.Option("--threads", help="Requests served at once.")] = 32,
) -> None:
    """Run Optuna's gRPC storage proxy in front of the database, for hundreds of workers.

    Workers then use --storage grpc://HOST:PORT and hold no database connections. The proxy
    keeps the study-wide budget and the heartbeats (reaping stale trials) for them.

    Example: lightstudy proxy --storage postgresql+psycopg://db/studies --host 10.0.0.5
    """
    from lightstudy.proxy import serve as serve_proxy

    # No spec and no run folder: the flag or $LIGHTSTUDY_STORAGE, else an error.
    serve_proxy(storage_url(storage), host=host, port=port, threads=threads)


@app.command()
def dashboard(
    storage: StorageOpt = None,
    study: Annotated[
        str | None,
        typer.Option(
            "--study",
            help="Study whose run folder holds the database (when --storage is not given).",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; 0.0.0.0 exposes it to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port.")] = 8080,
    run_dir: StudyRunDirOpt = None,
) -> None:
    """Serve optuna-dashboard on the study database (loopback only unless --host says otherwise).

    Example: lightstudy dashboard --study digits --port 8080
    """
    from lightstudy.dashboard import serve

    url = storage_url(storage, study=study, run_dir=run_dir)
    serve(url, host=host, port=port, run_dir=run_dir)


@app.command()
def init(
    out: Annotated[Path, typer.Option("--out", "-o", help="Study file to write.")] = Path("study.yaml"),
    config: Annotated[
        list[Path] | None,
        typer.Option(
            "--config", "-c", help="LightningCLI config file; repeat for several (later wins).", show_default=False
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="LightningModule class path (without --config).", show_default=False)
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="LightningDataModule class path.", show_default=False)
    ] = None,
    cli: Annotated[
        str | None,
        typer.Option("--cli", help="Your LightningCLI subclass (package.module.Class), if any.", show_default=False),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Study name (default: the file's stem).", show_default=False)
    ] = None,
    metric: Annotated[str, typer.Option("--metric", help="The logged score to optimize.")] = "val_loss",
    direction: Annotated[
        str | None,
        typer.Option("--direction", help="minimize or maximize (default: from the metric's name).", show_default=False),
    ] = None,
    n_trials: Annotated[int, typer.Option("--n-trials", help="Trials of the study, across all workers.")] = 20,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
) -> None:
    """Write a starting study file from your LightningCLI config (or model and data classes).

    The config files become `config:`; the search space is proposed from the typed float, int,
    bool and Literal arguments of the model, optimizer and data module (learning rates active,
    the rest commented out). The file is validated once written.

    Example: lightstudy init --config configs/base.yaml --metric val_acc --out studies/base.yaml
    """
    from lightstudy.api import validate as check
    from lightstudy.errors import SpecError
    from lightstudy.project import use_project_folder
    from lightstudy.scaffold import study_file

    if out.exists() and not force:
        raise LightstudyError(f"{out} exists", fix="pass --force to overwrite it, or another --out")
    if direction not in (None, "minimize", "maximize"):
        raise LightstudyError(
            f"--direction must be minimize or maximize, but got {direction!r}", fix="pass --direction maximize"
        )
    use_project_folder(out)
    text = study_file(
        out,
        configs=list(config or []),
        model=model,
        data=data,
        cli=cli,
        name=name,
        metric=metric,
        direction=direction,
        n_trials=n_trials,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    try:
        spec = check(out)
    except SpecError as e:
        raise LightstudyError(
            f"wrote {out}, but it does not validate: {e.message}",
            fix=e.fix or f"edit {out}, then lightstudy validate {out}",
        ) from e
    console().print(
        f"wrote {out}: study {spec.study.name!r}, {len(spec.search_space)} active parameter(s); it validates.\n"
        f"next: edit the search space, then lightstudy run {out} --workers 2"
    )

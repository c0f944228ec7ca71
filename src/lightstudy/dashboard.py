"""``lightstudy dashboard``: optuna-dashboard on the study database, serving the checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import IO, Any

from lightstudy.storage import open_storage, redact

__all__ = ["StudiesStore", "serve", "trial_note", "write_trial_note"]

_log = logging.getLogger(__name__)


class StudiesStore:
    """One artifact store over the stores of every lightstudy study in a database.

    optuna-dashboard takes a single store; each study may have its own (its run folder, a shared
    folder, a bucket). Artifact ids are UUIDs, so reading tries each store in turn.
    """

    def __init__(self, stores: list[Any]) -> None:
        self.stores = stores

    def open_reader(self, artifact_id: str) -> IO[bytes]:
        from optuna.artifacts.exceptions import ArtifactNotFound

        for store in self.stores:
            try:
                return store.open_reader(artifact_id)  # type: ignore[no-any-return,unused-ignore]
            except (ArtifactNotFound, FileNotFoundError):
                continue
        raise ArtifactNotFound(f"artifact {artifact_id} is in none of the studies' stores")

    def write(self, artifact_id: str, content_body: IO[bytes]) -> None:
        self.stores[0].write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        from optuna.artifacts.exceptions import ArtifactNotFound

        for store in self.stores:
            try:
                store.remove(artifact_id)
                return
            except (ArtifactNotFound, FileNotFoundError):
                continue
        raise ArtifactNotFound(f"artifact {artifact_id} is in none of the studies' stores")


def study_stores(url: str, run_dir: Path | None = None) -> list[Any]:
    """The artifact store of every lightstudy study in the database (run folders as their specs say)."""
    from lightstudy.artifacts import make_store
    from lightstudy.study import SPEC_ATTR, load_study

    storage = open_storage(url, create=False)
    stores = []
    for summary in storage.get_all_studies():
        if SPEC_ATTR not in summary.user_attrs:
            continue
        _, spec = load_study(url, summary.study_name, storage=storage)
        stores.append(make_store(spec, Path(run_dir or spec.run_dir)))
    return stores


def serve(url: str, *, host: str = "127.0.0.1", port: int = 8080, run_dir: Path | None = None) -> None:
    """Serve optuna-dashboard until interrupted (binds loopback by default)."""
    from optuna_dashboard import run_server

    storage = open_storage(url, create=False)
    stores = study_stores(url, run_dir)
    if host not in ("127.0.0.1", "localhost", "::1"):
        _log.warning("the dashboard has no authentication and is bound to %s", host)
    _log.info("optuna-dashboard on http://%s:%d for %s", host, port, redact(url))
    run_server(storage, host=host, port=port, artifact_store=StudiesStore(stores) if stores else None)


# --- trial notes ---------------------------------------------------------------------------------


def _at(config: Any, path: str) -> Any:
    """The value at a dotted path of a config, or ``_MISSING``."""
    for part in path.split("."):
        if not isinstance(config, dict) or part not in config:
            return _MISSING
        config = config[part]
    return config


_MISSING = object()


def trial_note(trial: Any, spec: Any, *, kept: bool, test_metrics: dict[str, float] | None = None) -> str:
    """The Markdown note a person reads on a trial's page in optuna-dashboard.

    What they look for: the outcome (values, or why it failed or was pruned), the parameters that
    differ from the study file's config, whether its checkpoint is kept or was removed, what it
    resumed from, and its test metrics.
    """
    from lightstudy.artifacts import CheckpointRef
    from lightstudy.summary import config_summary, format_value, recorded_config

    state = trial.state.name.lower()
    lines = [f"## Trial {trial.number}: {state}"]
    if trial.values is not None:
        lines.append(", ".join(f"**{m}** = {format_value(v)}" for m, v in zip(spec.study.metrics, trial.values)))
    if state == "fail":
        lines.append(f"**Failed:** {trial.user_attrs.get('fail_reason', 'the worker died (heartbeat stale)')}")
    if state == "pruned":
        steps = sorted(trial.intermediate_values)
        if steps:
            last = steps[-1]
            lines.append(f"**Pruned** after step {last} ({format_value(trial.intermediate_values[last])})")
        else:
            lines.append("**Pruned** before its first report")
    if trial.user_attrs.get("interrupted"):
        lines.append("Handed back when its worker stopped; retried as another trial.")
    base = spec.lightning_config()
    changed = []
    for path, value in trial.params.items():
        default = _at(base, path)
        if default is _MISSING:
            changed.append(f"- `{path}` = {format_value(value)} (the class's default otherwise)")
        elif default != value:
            changed.append(f"- `{path}` = {format_value(value)} (config: {format_value(default)})")
    if changed:
        lines += ["", "**Changed from the config:**", *changed]
    elif trial.params:
        lines += ["", "Parameters as in the config."]
    lines.append("")
    ref = CheckpointRef.of(trial)
    if ref is not None and kept:
        lines.append(f"**Checkpoint:** kept (`{ref.filename}`), among the best {spec.study.checkpoints.keep}")
    elif ref is not None:
        lines.append(f"**Checkpoint:** removed (outside the best {spec.study.checkpoints.keep})")
    elif state == "complete":
        lines.append("**Checkpoint:** none kept")
    resumed = trial.user_attrs.get("resumed_from")
    if isinstance(resumed, dict):
        epoch = f", epoch {resumed['epoch']}" if resumed.get("epoch") is not None else ""
        lines.append(f"**Resumed from** trial {resumed.get('trial')}{epoch}")
    if test_metrics:
        lines.append("**Test:** " + ", ".join(f"{k} = {format_value(v)}" for k, v in sorted(test_metrics.items())))
    config = recorded_config(trial)
    if config is not None:
        lines.append(f"**Config:** {config_summary(config)} (full: `lightstudy best {spec.study.name} --export DIR`)")
    return "\n".join(lines).rstrip() + "\n"


def write_trial_note(study: Any, spec: Any, number: int, *, trial_id: int | None = None) -> str:
    """Write trial ``number``'s note as optuna-dashboard's ``save_note`` does; returns it.

    Called by the worker once a trial is told (and again by ``test`` when test metrics arrive);
    each call saves a new version of the note, which the dashboard shows. Given the trial's
    ``trial_id`` (the worker knows it), a trial without a stored checkpoint is read alone: whether
    a checkpoint is kept, and its test metrics (tested from that checkpoint), are what the
    study's other trials and attrs would say, and such a trial has neither. Otherwise (most
    trials of a large study) every trial would be read for nothing. The note is written in
    optuna-dashboard's layout (its own key functions) by :meth:`StudyStorage.write_note`: one
    transaction, where ``save_note`` reads every study attr twice and commits each key.
    """
    from lightstudy.artifacts import CheckpointRef
    from lightstudy.ranking import kept
    from lightstudy.storage.boundary import storage_of
    from lightstudy.storage.boundary import trial_id as id_of
    from lightstudy.summary import stored_test_metrics

    trial = storage_of(study).trial(trial_id) if trial_id is not None else None
    if trial is not None and CheckpointRef.of(trial) is None:
        body = trial_note(trial, spec, kept=False)
    else:
        trials = study.get_trials(deepcopy=False)
        trial = next(t for t in trials if t.number == number)
        is_kept = number in {t.number for t in kept(trials, spec)}
        body = trial_note(trial, spec, kept=is_kept, test_metrics=stored_test_metrics(study).get(number))
    notes, tid = _notes_module(), id_of(trial)  # optuna-dashboard's keys, written in one transaction
    parts = notes.split_body(body, tid)
    storage_of(study).write_note(study, notes.note_ver_key(tid), parts, notes.note_str_key_prefix(tid))
    return body


def _notes_module() -> Any:
    """optuna-dashboard's notes module (``save_note``, ``get_note``), without the dashboard app.

    ``from optuna_dashboard import save_note`` runs the package's ``__init__``, which imports the
    web app and through it ``optuna.importance``, scikit-learn and SciPy: 1.7 s of CPU in every
    worker, on the path from its first trial's tell to its next claim, for a module that needs
    only Optuna. So the module file (``optuna_dashboard/_note.py``) is loaded on its own, under
    its own name: the package, if something imports it later, finds it in ``sys.modules`` and
    uses this same module. Where the file is not there (a layout this was not written for), the
    package import it stands in for is used instead.
    """
    import importlib.util
    import sys

    name = "optuna_dashboard._note"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("optuna_dashboard")  # finds the package, imports nothing
    folders = list(package.submodule_search_locations or []) if package is not None else []
    path = Path(folders[0]) / "_note.py" if folders else None
    found = importlib.util.spec_from_file_location(name, path) if path is not None and path.is_file() else None
    if found is None or found.loader is None:
        return importlib.import_module(name)  # through the package's __init__, app and all
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module
    try:
        found.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module

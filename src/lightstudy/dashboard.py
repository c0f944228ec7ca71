"""``lightstudy dashboard``: optuna-dashboard on the study database, serving the checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import IO, Any

from lightstudy.storage import open_storage, redact

__all__ = ["StudiesStore", "serve"]

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

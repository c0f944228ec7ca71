"""``lightstudy dashboard``: optuna-dashboard on the study database."""

from __future__ import annotations

import logging

from lightstudy.storage import open_storage, redact

__all__ = ["serve"]

_log = logging.getLogger(__name__)


def serve(url: str, *, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve optuna-dashboard until interrupted (binds loopback by default)."""
    from optuna_dashboard import run_server

    storage = open_storage(url, create=False)
    if host not in ("127.0.0.1", "localhost", "::1"):
        _log.warning("the dashboard has no authentication and is bound to %s", host)
    _log.info("optuna-dashboard on http://%s:%d for %s", host, port, redact(url))
    run_server(storage, host=host, port=port)

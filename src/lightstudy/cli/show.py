"""How a study's best trials look on the terminal: shown by ``best`` and at the end of ``run``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightstudy.errors import LightstudyError

__all__ = ["print_best"]


def print_best(name: str, url: str, run_dir: Path | None, console: Any, *, final: bool) -> None:
    """One table per best trial (several objectives: per Pareto-optimal trial).

    ``final`` (the end of ``run``): a study without a complete trial says so instead of failing,
    and the commands to look further follow.

    Raises:
        LightstudyError: no complete trial (unless ``final``), or no such study.
    """
    from rich.table import Table

    from lightstudy.storage import redact
    from lightstudy.study import load_study
    from lightstudy.summary import best_records, format_value

    study, spec = load_study(url, name)
    try:
        records = best_records(study, spec, Path(run_dir or spec.run_dir))
    except LightstudyError:
        if final:
            console.print("[yellow]no complete trial[/yellow]")
            return
        raise
    shown = records if spec.study.is_multi_objective else records[:1]
    for r in shown:
        table = Table(
            show_header=False,
            title=f"best trial of {name}"
            if not spec.study.is_multi_objective
            else f"Pareto-optimal trial {r.number} of {name}",
        )
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")
        table.add_row("trial", str(r.number))
        for metric, value in zip(spec.study.metrics, r.values or []):
            table.add_row(metric, format_value(value))
        for key, value in r.params.items():
            table.add_row(key, format_value(value))
        table.add_row("checkpoint", r.checkpoint or "(not kept)")
        table.add_row("seed", format_value(r.seed))
        console.print(table)
    if final:
        console.print(
            f"dashboard: lightstudy dashboard --storage {redact(url)}\n"
            f"details:   lightstudy status {name}"
            + ("" if "LIGHTSTUDY_STORAGE" in os.environ else f" --storage {redact(url)}")
        )

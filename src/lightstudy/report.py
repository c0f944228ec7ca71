"""``lightstudy report``: one self-contained HTML page about a study.

optuna.visualization's plotly figures (optimization history, intermediate values, parameter
importances, parallel coordinates, slice; the Pareto front for several objectives) with
plotly.js inlined once, so the page opens offline, plus a table of the kept trials with their
checkpoints and test metrics.
"""

from __future__ import annotations

import datetime
import html
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightstudy.errors import LightstudyError

if TYPE_CHECKING:
    import optuna

    from lightstudy.spec import StudySpec

__all__ = ["render_report"]

_log = logging.getLogger(__name__)


def _plots(study: optuna.Study, spec: StudySpec) -> list[tuple[str, Callable[[], Any]]]:
    from optuna import visualization as vis

    if spec.study.is_multi_objective:
        names = list(spec.study.metrics)
        plots: list[tuple[str, Callable[[], Any]]] = [
            ("Pareto front", lambda: vis.plot_pareto_front(study, target_names=names)),
        ]
        for i, name in enumerate(names):
            plots.append((f"Optimization history: {name}", _history(study, i, name)))
        plots.append(
            (
                "Parallel coordinates",
                lambda: vis.plot_parallel_coordinate(study, target=lambda t: t.values[0], target_name=names[0]),
            )
        )
        return plots
    name = spec.study.metric
    return [
        ("Optimization history", lambda: vis.plot_optimization_history(study, target_name=name)),
        ("Intermediate values", lambda: vis.plot_intermediate_values(study)),
        ("Parameter importances", lambda: vis.plot_param_importances(study, target_name=name)),
        ("Parallel coordinates", lambda: vis.plot_parallel_coordinate(study, target_name=name)),
        ("Slice", lambda: vis.plot_slice(study, target_name=name)),
    ]


def _history(study: optuna.Study, index: int, name: str) -> Callable[[], Any]:
    from optuna import visualization as vis

    return lambda: vis.plot_optimization_history(study, target=lambda t: t.values[index], target_name=name)


def render_report(study: optuna.Study, spec: StudySpec, run_dir: Path) -> str:
    """The report page as one HTML string.

    Raises:
        LightstudyError: the study has no complete trial to plot.
    """
    from optuna.trial import TrialState

    from lightstudy.summary import best_records, counts, format_value, lineages, stored_test_metrics

    trials = study.get_trials(deepcopy=False)
    if not any(t.state == TrialState.COMPLETE for t in trials):
        raise LightstudyError(
            f"study {spec.study.name!r} has no complete trial to report on",
            fix="run the study first (lightstudy run FILE)",
        )
    sections = []
    include_js: Any = True  # plotly.js inlined in the first figure only
    for title, make in _plots(study, spec):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                figure = make()
            body = figure.to_html(
                full_html=False,
                include_plotlyjs=include_js,
                config={"displaylogo": False, "responsive": True},
            )
            include_js = False
        except Exception as e:  # e.g. importances need two complete trials with varied params
            body = f'<p class="na">Not available: {html.escape(str(e))}</p>'
        sections.append(f'<section class="plot"><h2>{html.escape(title)}</h2>{body}</section>')

    records = best_records(study, spec, run_dir)
    tests = stored_test_metrics(study)
    kept = [r for r in records if r.checkpoint]
    test_keys = sorted({k for m in tests.values() for k in m})
    head = ["trial", *spec.study.metrics, *[p.path for p in spec.search_space], "checkpoint", *test_keys]
    rows = []
    for r in kept:
        cells = [
            str(r.number),
            *[format_value(v) for v in (r.values or [])],
            *[format_value(r.params.get(p.path)) for p in spec.search_space],
            r.checkpoint or "-",
            *[format_value(tests.get(r.number, {}).get(k)) for k in test_keys],
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    table = (
        "<table><thead><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )
    c = counts(trials)
    summary = (
        f"{len(trials)} trials: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed, "
        f"{c['running']} running. Direction: {', '.join(spec.study.directions)} "
        f"{', '.join(spec.study.metrics)}."
    )
    now = datetime.datetime.now().isoformat(timespec="seconds")
    lines = lineages(trials, spec)
    if lines:  # a scheduler's lineages (PBT: each member's parameter schedule over epochs)
        kind = spec.study.scheduler.name if spec.study.scheduler is not None else ""
        items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
        table += f'<h2>Lineages ({html.escape(kind)})</h2><ul class="lineages">{items}</ul>'
    return _PAGE.format(
        name=html.escape(spec.study.name),
        summary=html.escape(summary),
        generated=html.escape(now),
        table=table,
        sections="\n".join(sections),
    )


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>lightstudy report: {name}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }}
th {{ background: #f3f3f3; }}
section.plot {{ margin: 2em 0; }}
.na {{ color: #777; font-style: italic; }}
</style>
</head>
<body>
<h1>Study {name}</h1>
<p>{summary}</p>
<p><small>Generated by lightstudy on {generated}.</small></p>
<h2>Kept trials</h2>
{table}
{sections}
</body>
</html>
"""

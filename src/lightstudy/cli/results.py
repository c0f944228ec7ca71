"""The commands that read what a study found: status, best (and export), test, predict,
reproduce and report.

Each is a plain function whose docstring is its ``--help``, registered on
:data:`lightstudy.cli.shared.app`. They find the study's database by the one rule of
:func:`~lightstudy.cli.shared.storage_url`: ``--storage``, ``$LIGHTSTUDY_STORAGE``, else
``study.db`` in ``--run-dir`` or ``runs/<study>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from lightstudy.cli.shared import (
    StorageOpt,
    StudyRunDirOpt,
    app,
    console,
    quiet_lightning,
    storage_url,
    storage_urls,
)
from lightstudy.errors import LightstudyError

__all__ = ["best", "predict_command", "report", "reproduce", "status", "test_command"]


@app.command()
def status(
    name: Annotated[
        str | None, typer.Argument(help="Study name (omit to list the studies).", show_default=False)
    ] = None,
    storage: StorageOpt = None,
    run_dir: StudyRunDirOpt = None,
) -> None:
    """Show the studies in a database, or one study's trials.

    Example: lightstudy status digits
    """
    from rich.table import Table

    from lightstudy.ranking import best_first, has_value, kept, ranked
    from lightstudy.storage import open_storage, redact
    from lightstudy.study import budget, load_study
    from lightstudy.summary import counts, format_value, lineages, stored_test_metrics

    out = console()
    if name is None:
        urls = storage_urls(storage, run_dir)
        table = Table("study", "storage", "direction", "complete", "pruned", "failed", "running", "best")
        for url in urls:
            st = open_storage(url, create=False)
            for summary in st.get_all_studies():
                import optuna

                s = optuna.load_study(study_name=summary.study_name, storage=st)
                every = s.get_trials(deepcopy=False)
                c = counts(every)
                order = _ranked_of(s, every, best_first, ranked) if len(s.directions) == 1 else []
                best = order[0].values[0] if order and has_value(order[0]) else None
                table.add_row(
                    summary.study_name,
                    redact(url),
                    ", ".join(d.name.lower() for d in s.directions),
                    str(c["complete"]),
                    str(c["pruned"]),
                    str(c["fail"]),
                    str(c["running"]),
                    format_value(best),
                )
        out.print(table)
        return
    url = storage_url(storage, study=name, run_dir=run_dir)
    study, spec = load_study(url, name)
    trials = study.get_trials(deepcopy=False)
    kept_numbers = {t.number for t in kept(trials, spec)}
    tests = stored_test_metrics(study)
    test_keys = sorted({k for m in tests.values() for k in m})
    table = Table(
        "#",
        "state",
        *spec.study.metrics,
        *[p.path.rsplit(".", 1)[-1] for p in spec.search_space],
        "kept",
        *test_keys,
        "time",
        *(["lineage"] if spec.study.scheduler is not None else []),
        "note",
        title=f"{name} ({redact(url)})",
    )
    for t in trials:
        values = list(t.values) if t.values else [None] * len(spec.study.metrics)
        seconds = t.duration.total_seconds() if t.duration else None
        table.add_row(
            str(t.number),
            t.state.name.lower(),
            *[format_value(v) for v in values],
            *[format_value(t.params.get(p.path)) for p in spec.search_space],
            "✓" if t.number in kept_numbers else "",
            *[format_value(tests.get(t.number, {}).get(k)) for k in test_keys],
            f"{seconds:.1f}s" if seconds is not None else "-",
            *([_lineage(t)] if spec.study.scheduler is not None else []),
            _note(t),
        )
    out.print(table)
    lines = lineages(trials, spec)
    if lines:
        kind = spec.study.scheduler.name if spec.study.scheduler else ""
        out.print(f"lineages ({kind}; #trial, value at its last epoch):")
        for line in lines:
            out.print(f"  {line}", highlight=False, soft_wrap=True)
    b = budget(trials, spec)
    c = counts(trials)
    total = spec.study.n_trials or "∞"
    out.print(
        f"{b.used - c['running'] - c['waiting']}/{total} trials done: {c['complete']} complete, "
        f"{c['pruned']} pruned, {c['fail']} failed, {c['running']} running, {c['waiting']} waiting"
        + (" — study done" if b.done else "")
    )


def _ranked_of(study: Any, trials: Any, best_first: Any, ranked: Any) -> Any:
    """A listed study's order: a lightstudy study's own (a scheduler ranks its lineages' furthest)."""
    from lightstudy.spec import spec_from_dict
    from lightstudy.study import SPEC_ATTR

    doc = study.user_attrs.get(SPEC_ATTR)
    if isinstance(doc, dict):
        try:
            return ranked(trials, spec_from_dict(doc, source=f"study {study.study_name!r}"))
        except Exception:  # a spec of another lightstudy version: the plain order
            pass
    return best_first(trials, study.directions)


def _lineage(trial: Any) -> str:
    """A scheduled trial's lineage, rung (r) or generation (g), and the trial it starts from."""
    attrs = trial.user_attrs
    if attrs.get("lineage") is None:
        return ""
    level = f"r{attrs['rung']}" if attrs.get("rung") is not None else f"g{attrs.get('generation', '?')}"
    parent = f" ←{attrs['parent_trial']}" if attrs.get("parent_trial") is not None else ""
    return f"{attrs['lineage']} {level}{parent}"


def _note(trial: Any) -> str:
    """What status says beside a trial: why it failed, what it resumed from."""
    attrs = trial.user_attrs
    if attrs.get("interrupted"):
        return "handed back (retried)"
    if trial.state.name == "FAIL":
        return str(attrs.get("fail_reason", "worker died (heartbeat stale)"))[:100]
    resumed = attrs.get("resumed_from")
    if resumed:
        epoch = f" epoch {resumed['epoch']}" if resumed.get("epoch") is not None else ""
        return f"resumed from trial {resumed.get('trial')}{epoch}"
    return ""


@app.command()
def best(
    name: Annotated[str, typer.Argument(help="Study name.")],
    storage: StorageOpt = None,
    run_dir: StudyRunDirOpt = None,
    output_format: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            help="Write the checkpoint, config.yaml (LightningCLI fit --config), "
            "params.json and metrics.json to this folder.",
            show_default=False,
        ),
    ] = None,
    rank: Annotated[int, typer.Option("--rank", help="Which trial: 1 is the best, 2 the second best, ...")] = 1,
) -> None:
    """Show the best trial (value, parameters, checkpoint, trial number), or export it.

    Several objectives: the Pareto front.

    Example: lightstudy best digits --export exported/ --rank 1
    """
    from lightstudy.api import load

    if output_format not in ("table", "json"):
        raise LightstudyError(
            f"--format must be table or json, but got {output_format!r}",
            fix="pass --format table or --format json",
        )
    found = load(name, storage=storage, run_dir=run_dir)
    if export is not None:
        number = found.trial(rank=rank).number
        paths = found.export(export, trial=number)
        out = console()
        out.print(f"exported trial {number} of {name} to {export}:")
        for kind, path in paths.items():
            out.print(f"  {kind:<10} {path}")
        # PYTHONPATH=.: jsonargparse parses a config from inside its folder, where `python -c`'s
        # '' on sys.path no longer means the project folder.
        out.print(
            f"train it again: python main.py fit --config {paths['config']} (your LightningCLI script), "
            f"or PYTHONPATH=. python -c 'from lightning.pytorch.cli import LightningCLI; "
            f"LightningCLI()' fit --config {paths['config']}"
        )
        return
    if output_format == "json":
        from lightstudy.summary import best_records

        records = best_records(found.optuna, found.spec, found.run_dir)
        doc = [r.to_json(found.spec.study.metrics) for r in records]
        out = doc if found.spec.study.is_multi_objective else doc[min(rank, len(doc)) - 1]
        typer.echo(json.dumps(out, indent=2, default=str))
        return
    from lightstudy.cli.show import print_best

    print_best(name, found.url, run_dir, console(), final=False)


@app.command("test")
def test_command(
    name: Annotated[str, typer.Argument(help="Study name.")],
    storage: StorageOpt = None,
    run_dir: StudyRunDirOpt = None,
    top: Annotated[int, typer.Option("--top", help="Test the kept checkpoints of the best K trials.")] = 1,
) -> None:
    """Run trainer.test with the kept checkpoints of the best trials; store the test metrics.

    The metrics appear in `status`, `best` and `report`.

    Example: lightstudy test digits --top 3
    """
    from rich.table import Table

    from lightstudy.api import load
    from lightstudy.summary import format_value

    if top < 1:
        raise LightstudyError(f"--top must be >= 1, but got {top}", fix="pass --top 1 or more")
    quiet_lightning()
    results = load(name, storage=storage, run_dir=run_dir).test(top)
    keys = sorted({k for m in results.values() for k in m})
    table = Table("trial", *keys, title=f"test metrics of {name}")
    for number, metrics in results.items():
        table.add_row(str(number), *[format_value(metrics.get(k)) for k in keys])
    console().print(table)


@app.command("predict")
def predict_command(
    name: Annotated[str, typer.Argument(help="Study name.")],
    files: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Image files to predict (default: the data module's predict dataloader).", show_default=False
        ),
    ] = None,
    storage: StorageOpt = None,
    run_dir: StudyRunDirOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Predictions file: .csv (one row per sample) or .pt.")] = Path(
        "predictions.csv"
    ),
    rank: Annotated[int | None, typer.Option("--rank", help="Use the N-th best trial.", show_default=False)] = None,
    trial: Annotated[int | None, typer.Option("--trial", help="Use this trial.", show_default=False)] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data", help="key=value overriding the data module's init_args (e.g. root=/data).", show_default=False
        ),
    ] = None,
) -> None:
    """Predict with the best (or --rank N, or --trial N) kept checkpoint through predict_step.

    Runs the data module's predict dataloader, or the image files given, and writes one
    prediction per sample.

    Example: lightstudy predict digits --out predictions.csv
    """
    import yaml

    from lightstudy.api import load

    if rank is not None and trial is not None:
        raise LightstudyError("give --rank or --trial, not both", fix="drop one of them")
    overrides: dict[str, Any] = {}
    for item in data or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise LightstudyError(f"--data expects key=value, but got {item!r}", fix="e.g. --data batch_size=256")
        overrides[key.strip()] = yaml.safe_load(text)
    found = load(name, storage=storage, run_dir=run_dir)
    quiet_lightning()
    result = found.predict(out, rank=rank, trial=trial, files=list(files or []), data=overrides)
    console().print(f"wrote {result.rows} predictions of trial {result.trial} to {result.path}")


@app.command()
def reproduce(
    name: Annotated[str, typer.Argument(help="Study name.")],
    trial: Annotated[int, typer.Option("--trial", help="Trial number.")],
    storage: StorageOpt = None,
    run_dir: StudyRunDirOpt = None,
) -> None:
    """Train a finished trial again from its record (config, seed, threads) and compare values.

    With trainer.deterministic: true on CPU the values agree to 1e-6.

    Example: lightstudy reproduce digits --trial 12
    """
    from lightstudy.api import load
    from lightstudy.summary import format_value

    quiet_lightning()
    result = load(name, storage=storage, run_dir=run_dir).reproduce(trial)
    out = console()
    for metric, old, new, diff in zip(result.metrics, result.recorded, result.new, result.differences):
        out.print(
            f"trial {trial} {metric}: recorded {format_value(old)}, new {format_value(new)}, difference {diff:+.3g}"
        )
    for package, (then, now) in result.changed_versions.items():
        out.print(f"[yellow]note:[/yellow] {package} was {then}, is {now}")
    if result.resumed:
        out.print(
            "[yellow]note:[/yellow] the recorded run resumed from a checkpoint of an earlier "
            "attempt; this run trained from the start"
        )


@app.command()
def report(
    name: Annotated[str, typer.Argument(help="Study name.")],
    storage: StorageOpt = None,
    run_dir: StudyRunDirOpt = None,
    out: Annotated[Path, typer.Option("--out", help="HTML file to write.")] = Path("report.html"),
) -> None:
    """Write one self-contained HTML page: optuna.visualization plots and the kept trials.

    Example: lightstudy report digits --out digits.html
    """
    from lightstudy.api import load

    written = load(name, storage=storage, run_dir=run_dir).report(out)
    console().print(f"wrote {written} ({written.stat().st_size // 1024} KiB)")

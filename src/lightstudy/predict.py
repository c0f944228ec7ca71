"""``lightstudy predict``: the study's model on new data, through its ``predict_step``.

The kept checkpoint of the chosen trial is fetched from the artifact store and loaded with
``weights_only=True`` into the model its recorded config describes; the data module's predict
dataloader (or image files, for data modules with ``files_dataloader``) runs through
``Trainer.predict`` with a progress bar; the predictions go to a CSV (one row per sample) or a
``.pt`` file.
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightstudy.errors import LightstudyError

if TYPE_CHECKING:
    import optuna

    from lightstudy.spec import StudySpec

__all__ = ["Predictions", "predict"]


@dataclass
class Predictions:
    """Where the predictions went."""

    trial: int
    rows: int
    path: Path


def _flatten(outputs: list[Any]) -> tuple[list[str], list[list[Any]]]:
    """Per-batch ``predict_step`` outputs (tensors, or dicts of them) as a header and one row per sample."""
    import torch

    header: list[str] | None = None
    rows: list[list[Any]] = []
    for batch in outputs:
        columns = batch if isinstance(batch, dict) else {"prediction": batch}
        flats = {}
        for name, value in columns.items():
            tensor = torch.as_tensor(value).detach().cpu()
            flats[name] = tensor.reshape(tensor.shape[0] if tensor.dim() else 1, -1)
        if header is None:
            header = [n if f.shape[1] == 1 else f"{n}_{i}" for n, f in flats.items() for i in range(f.shape[1])]
        for i in range(len(next(iter(flats.values())))):
            rows.append([x for f in flats.values() for x in f[i].tolist()])
    return header or ["prediction"], rows


def predict(
    study: optuna.Study,
    spec: StudySpec,
    run_dir: Path,
    out: Path,
    *,
    rank: int | None = None,
    number: int | None = None,
    files: list[Path] | None = None,
    data_args: dict[str, Any] | None = None,
) -> Predictions:
    """Predict with a kept checkpoint and write the predictions to ``out`` (.csv or .pt).

    Raises:
        LightstudyError: bad output suffix, a data module that cannot read files, missing files.
        CheckpointError: the checkpoint is missing or unsafe.
    """
    import torch

    from lightstudy.checkpoints import load_checkpoint
    from lightstudy.evaluate import build_for_eval, exported_config, fetch, load_weights, select_trial

    if out.suffix not in (".csv", ".pt"):
        raise LightstudyError(f"--out must end in .csv or .pt, but got {out.name!r}", fix="e.g. --out predictions.csv")
    for path in files or []:
        if not path.is_file():
            raise LightstudyError(f"{path}: no such file", fix="pass existing image files")
    trial = select_trial(study, spec, rank=rank, number=number)
    config = exported_config(trial, spec)
    if data_args:
        data = config.get("data")
        if not isinstance(data, dict):
            raise LightstudyError("--data needs a data module in the study's config", fix="drop --data")
        data.setdefault("init_args", {}).update(data_args)
    with tempfile.TemporaryDirectory(prefix="lightstudy-predict-") as tmp:
        path = fetch(study, spec, run_dir, trial, Path(tmp))
        checkpoint = load_checkpoint(path, name=f"{path.name} (trial {trial.number})")
        built = build_for_eval(config, Path(tmp), progress_bar=True, cli=spec.cli)
        load_weights(built, checkpoint, path.name)
        if files:
            reader = getattr(built.datamodule, "files_dataloader", None)
            if reader is None:
                raise LightstudyError(
                    f"{type(built.datamodule).__name__} cannot read files (it has no files_dataloader)",
                    fix="run predict without files to use its predict_dataloader",
                )
            outputs = built.trainer.predict(built.model, dataloaders=reader([str(f) for f in files]))
        else:
            outputs = built.trainer.predict(built.model, datamodule=built.datamodule)
    outputs = list(outputs or [])
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".pt":
        tensors = [o for o in outputs if isinstance(o, torch.Tensor)]
        saved: Any = torch.cat(tensors) if len(tensors) == len(outputs) and tensors else outputs
        torch.save(saved, out)
        rows = len(saved) if isinstance(saved, torch.Tensor) else sum(len(o) for o in outputs)
        return Predictions(trial.number, rows, out)
    header, table = _flatten(outputs)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", *(["file"] if files else []), *header])
        for i, row in enumerate(table):
            writer.writerow([i, *([str(files[i])] if files else []), *row])
    return Predictions(trial.number, len(table), out)

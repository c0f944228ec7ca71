"""The devices a trial may use: which GPUs this process sees, found without initializing CUDA,
and whether a DDP trial has the devices and the storage it needs (checked before it starts;
nothing here imports torch)."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

__all__ = ["check_ddp_storage", "check_devices", "detect_gpus"]


def detect_gpus() -> list[str]:
    """GPU ids this process may use, without initializing CUDA: CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def check_ddp_storage(world_size: int, url: str) -> None:
    """Refuse a multi-device (DDP) study on a storage other than a database.

    Raises:
        LightstudyError: the storage is, e.g., lightstudy proxy's ``grpc://``.
    """
    from lightstudy.errors import LightstudyError

    if world_size > 1 and not url.startswith(("sqlite", "postgresql", "mysql")):
        raise LightstudyError(
            f"a trial on {world_size} devices (DDP) needs a database storage; Optuna's pruning callback "
            f"shares its verdict between ranks through RDBStorage, but the storage is {url.split(':', 1)[0]}://",
            fix="point workers of multi-device studies at the database itself (postgresql+psycopg://...)",
        )


def check_devices(spec: Any, world_size: int, url: str) -> None:
    """Refuse a multi-device trial this worker cannot run: too few GPUs, or a storage that
    Optuna's pruning callback cannot use under DDP.

    Raises:
        LightstudyError: naming what is missing and the fix.
    """
    from lightstudy.errors import LightstudyError

    if world_size == 1:
        return
    check_ddp_storage(world_size, url)
    accelerator = str((spec.config.get("trainer") or {}).get("accelerator", "auto"))
    if accelerator in ("cpu",):
        return
    gpus = detect_gpus()
    if (accelerator in ("gpu", "cuda") or gpus) and len(gpus) < world_size:
        raise LightstudyError(
            f"a trial of study {spec.study.name!r} runs on {world_size} GPUs, but this worker sees "
            f"{len(gpus)} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})",
            fix=f"give the worker {world_size} GPUs (--gpu 0,1), or lower trainer.devices",
        )

"""Checkpoints in Optuna's artifact store, where optuna-dashboard lists and serves them.

The store is a folder (``<run dir>/artifacts`` by default, or any path the spec names, e.g. a
shared file system) or an S3-compatible bucket (``checkpoints: {store: s3://bucket/prefix,
endpoint_url: ...}``; credentials come from the usual AWS variables, never from the spec).

The artifact's metadata is written where optuna-dashboard looks for a trial's artifacts and
where it can later be withdrawn: the study's system attrs, key
``dashboard:artifacts:<trial_id>:<artifact_id>``. (Optuna's own ``upload_artifact`` writes to the
trial's system attrs, which freeze when the trial finishes; a checkpoint that falls out of the
study's top k could then never be unlisted.) Removing a checkpoint deletes the object and sets
that key to JSON ``null``, which the dashboard skips.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mimetypes
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from lightstudy.errors import CheckpointError
from lightstudy.storage.boundary import storage_of
from lightstudy.storage.boundary import trial_id as id_of

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from lightstudy.spec import StudySpec

__all__ = [
    "CheckpointRef",
    "describe_store",
    "download",
    "make_store",
    "remove_checkpoint",
    "upload_checkpoint",
]

DASHBOARD_PREFIX = "dashboard:artifacts:"

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint in the store, as recorded in the trial's ``checkpoint`` user attr."""

    artifact_id: str
    filename: str

    def to_dict(self) -> dict[str, str]:
        return {"artifact_id": self.artifact_id, "filename": self.filename}

    @classmethod
    def of(cls, trial: FrozenTrial) -> CheckpointRef | None:
        value = trial.user_attrs.get("checkpoint")
        if isinstance(value, dict) and "artifact_id" in value:
            return cls(str(value["artifact_id"]), str(value.get("filename") or value["artifact_id"]))
        return None


class _PrefixedStore:
    """An artifact store whose object keys start with a prefix (``s3://bucket/prefix``)."""

    def __init__(self, inner: Any, prefix: str) -> None:
        self.inner = inner
        self.prefix = prefix

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self.inner.open_reader(self.prefix + artifact_id)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.inner.write(self.prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self.inner.remove(self.prefix + artifact_id)


def _s3_parts(store: str) -> tuple[str, str]:
    rest = store[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    return bucket, (prefix.rstrip("/") + "/") if prefix else ""


def make_store(spec: StudySpec, run_dir: Path) -> Any:
    """The study's artifact store (an ``optuna.artifacts`` store)."""
    from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore

    store = spec.study.checkpoints.store
    if store is None:
        path = run_dir / "artifacts"
        path.mkdir(parents=True, exist_ok=True)
        return FileSystemArtifactStore(path)
    if store.startswith("s3://"):
        import boto3

        bucket, prefix = _s3_parts(store)
        client = boto3.client("s3", endpoint_url=spec.study.checkpoints.endpoint_url)
        inner = Boto3ArtifactStore(bucket, client=client)
        return _PrefixedStore(inner, prefix) if prefix else inner
    path = Path(store).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(path)


def describe_store(spec: StudySpec, run_dir: Path) -> str:
    """Where the checkpoints are, for people: a folder or ``s3://bucket/prefix``."""
    store = spec.study.checkpoints.store
    if store is None:
        return str((run_dir / "artifacts").resolve())
    if store.startswith("s3://"):
        return store
    return str(Path(store).expanduser().resolve())


def location(spec: StudySpec, run_dir: Path, ref: CheckpointRef) -> str:
    """Where one checkpoint is: a file path (file system stores) or an s3:// URL."""
    base = describe_store(spec, run_dir)
    return f"{base.rstrip('/')}/{ref.artifact_id}"


def _key(trial_id: int, artifact_id: str) -> str:
    return f"{DASHBOARD_PREFIX}{trial_id}:{artifact_id}"


def upload_checkpoint(store: Any, study: optuna.Study, trial_id: int, path: Path, filename: str) -> CheckpointRef:
    """Write a checkpoint file to the store and list it on the trial's dashboard page."""
    artifact_id = str(uuid.uuid4())
    with open(path, "rb") as handle:
        store.write(artifact_id, handle)
    mimetype, encoding = mimetypes.guess_type(filename)
    meta = {
        "artifact_id": artifact_id,
        "filename": filename,
        "mimetype": mimetype or "application/octet-stream",
        "encoding": encoding,
    }
    storage_of(study).set_study_system_attr(study, _key(trial_id, artifact_id), json.dumps(meta))
    return CheckpointRef(artifact_id, filename)


def is_listed(study: optuna.Study, trial: FrozenTrial, ref: CheckpointRef, attrs: dict[str, Any]) -> bool:
    """Whether the checkpoint is still listed (not withdrawn by retention)."""
    value = attrs.get(_key(id_of(trial), ref.artifact_id))
    return value is not None and json.loads(value) is not None


def remove_checkpoint(store: Any, study: optuna.Study, trial: FrozenTrial, ref: CheckpointRef) -> None:
    """Delete the object and withdraw it from the dashboard (idempotent)."""
    from optuna.artifacts.exceptions import ArtifactNotFound

    with contextlib.suppress(ArtifactNotFound, FileNotFoundError):
        store.remove(ref.artifact_id)
    storage_of(study).set_study_system_attr(study, _key(id_of(trial), ref.artifact_id), json.dumps(None))


@contextmanager
def open_checkpoint(store: Any, ref: CheckpointRef, where: str) -> Iterator[IO[bytes]]:
    """Open a stored checkpoint for reading.

    Raises:
        CheckpointError: the artifact is missing from the store.
    """
    from optuna.artifacts.exceptions import ArtifactNotFound

    try:
        reader = store.open_reader(ref.artifact_id)
    except (ArtifactNotFound, FileNotFoundError) as e:
        raise CheckpointError(
            f"checkpoint {ref.filename} (artifact {ref.artifact_id}) is missing from {where}",
            fix="check checkpoints.store and its credentials; a deleted artifact cannot be recovered",
        ) from e
    try:
        yield reader
    finally:
        reader.close()


def download(store: Any, ref: CheckpointRef, dest: Path, where: str) -> Path:
    """Copy a stored checkpoint to ``dest`` (a file path)."""
    import shutil

    dest.parent.mkdir(parents=True, exist_ok=True)
    with open_checkpoint(store, ref, where) as reader, open(dest, "wb") as out:
        shutil.copyfileobj(reader, out)
    return dest

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.trial import TrialState

from conftest import tiny_spec
from lightstudy.artifacts import CheckpointRef, describe_store, make_store
from lightstudy.errors import SpecError
from lightstudy.spec import spec_from_dict
from lightstudy.study import create_study, load_study
from lightstudy.worker import Worker


def test_store_settings_are_validated() -> None:
    with pytest.raises(SpecError, match="only applies to an s3:// store"):
        spec_from_dict(tiny_spec(checkpoints={"store": "/tmp/x", "endpoint_url": "http://h:9000"}))
    with pytest.raises(SpecError, match="http"):
        spec_from_dict(tiny_spec(checkpoints={"store": "s3://b", "endpoint_url": "ftp://h"}))
    with pytest.raises(SpecError, match=r"study\.checkpoints\.bucket"):
        spec_from_dict(tiny_spec(checkpoints={"bucket": "b"}))


def test_a_shared_folder_store(tmp_path: Path) -> None:
    spec = spec_from_dict(tiny_spec(checkpoints={"keep": 1, "store": str(tmp_path / "shared")}))
    assert describe_store(spec, tmp_path / "run") == str(tmp_path / "shared")
    store = make_store(spec, tmp_path / "run")
    import io

    store.write("abc", io.BytesIO(b"data"))
    assert (tmp_path / "shared" / "abc").read_bytes() == b"data"


@pytest.mark.slow
def test_checkpoints_in_an_s3_compatible_store(s3_server: str, tmp_path: Path) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="studies")
    doc = tiny_spec(n_trials=3, checkpoints={"keep": 2, "store": "s3://studies/tiny/ckpt", "endpoint_url": s3_server})
    url = f"sqlite:///{tmp_path / 'study.db'}"
    create_study(spec_from_dict(doc), url)
    Worker(url, "tiny", run_dir=tmp_path / "run", threads=1).run()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="studies").get("Contents", []))
    study, spec = load_study(url, "tiny")
    complete = sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: (-t.value, t.number))
    assert keys == sorted(f"tiny/ckpt/{CheckpointRef.of(t).artifact_id}" for t in complete[:2])
    assert not (tmp_path / "run" / "artifacts").exists()

    from lightstudy.evaluate import fetch

    path = fetch(study, spec, tmp_path / "run", complete[0], tmp_path / "dl")
    assert path.stat().st_size > 1000

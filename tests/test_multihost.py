"""Several machines, simulated on one: workers that share only PostgreSQL and the checkpoint store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, tiny_spec, write_spec
from lightstudy.study import load_study


@pytest.mark.slow
def test_two_hosts_share_only_the_database_and_the_store(pg_url: str, s3_server: str, tmp_path: Path) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="shared")
    doc = tiny_spec(
        "hosts", n_trials=6, checkpoints={"keep": 6, "store": "s3://shared/hosts", "endpoint_url": s3_server}
    )
    doc["trainer"].update(max_epochs=2, limit_train_batches=4)
    hosts = [tmp_path / "host-a", tmp_path / "host-b", tmp_path / "laptop"]
    for host in hosts:
        host.mkdir()
    spec = write_spec(hosts[0] / "hosts.yaml", doc)
    env = {"LIGHTSTUDY_STORAGE": pg_url}
    run_cli("create", str(spec), cwd=hosts[0], env=env, check=True)
    # Each "host" runs its worker in its own working directory, with its own run folder.
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lightstudy", "worker", "--study", "hosts", "--threads", "1"],
            cwd=host,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for host in hosts[:2]
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for host in hosts[:2]:
        assert (host / "runs" / "hosts" / "trials").is_dir()  # each host's own run folder
        assert not (host / "runs" / "hosts" / "artifacts").exists()  # checkpoints went to the store
    study, _ = load_study(pg_url, "hosts")
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
    # From a third machine, `best` sees the kept checkpoints of both hosts and fetches each.
    records = [
        json.loads(
            run_cli("best", "hosts", "--rank", str(rank), "--format", "json", cwd=hosts[2], env=env, check=True).stdout
        )
        for rank in range(1, 7)
    ]
    assert all(r["checkpoint"].startswith("s3://shared/hosts/") for r in records)
    by_worker = {r["user_attrs"]["worker"]: r for r in records}
    assert len(by_worker) == 2, "the kept checkpoints should come from both hosts"
    for record in by_worker.values():
        rank = records.index(record) + 1
        out = hosts[2] / f"export-{rank}"
        run_cli("best", "hosts", "--rank", str(rank), "--export", str(out), cwd=hosts[2], env=env, check=True)
        assert len(list(out.glob("*.ckpt"))) == 1

"""The Slurm script as shipped, submitted with ``sbatch`` to a real one-node Slurm cluster.

The fixture starts Debian's munged, slurmctld and slurmd (slurm-wlm 22.05) as root, from a
temporary folder (its own munge key and socket, state, spool and logs; free ports), and stops
them afterwards, also when a test fails. The node declares what the script asks of each task
(``--cpus-per-task=8``, ``--mem=32G``, ``--gres=gpu:1``) three times over: 24 CPUs, 96 GiB and
three GPUs that are character devices standing in for ``/dev/nvidia0..2``. Slurm believes the
declaration (``SlurmdParameters=config_overrides``), so three tasks run at once on the two real
cores, each told its own GPU in ``CUDA_VISIBLE_DEVICES``. ``LIGHTSTUDY_THREADS=1`` keeps each
trial to one torch thread, as the README says to do where the CPUs Slurm counts are not there.

Everything else is what ``examples/slurm/README.md`` tells a user: ``lightstudy create`` against
PostgreSQL, ``sbatch --array=... examples/slurm/lightstudy-worker.sbatch`` with the settings in
the environment, and ``scancel --signal=TERM --batch`` to stop a task and hand its trial back.
Needs root, ``apt-get install slurm-wlm munge`` (``.ci/run`` installs them) and PostgreSQL.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, free_port, tiny_spec, wait_until, write_spec

pytestmark = [pytest.mark.slow(seconds=55), pytest.mark.postgres]

SBATCH = REPO / "examples" / "slurm" / "lightstudy-worker.sbatch"
TESTS = Path(__file__).resolve().parent
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo")
# What the script asks of one task, times the three tasks that run at once.
NODE = "CPUs=24 Sockets=1 CoresPerSocket=24 ThreadsPerCore=1 RealMemory=98304 Gres=gpu:3"


def _until(predicate: Callable[[], Any], timeout: float, what: Callable[[], str] | str) -> Any:
    """Poll ``predicate`` until it returns something true; fail with ``what`` after ``timeout`` s."""
    return wait_until(predicate, timeout, what, interval=0.2)  # each look runs a Slurm command


def _daemon(path: str) -> str:
    found = shutil.which(path) or (f"/usr/sbin/{path}" if Path(f"/usr/sbin/{path}").exists() else None)
    if found is None:
        pytest.fail(f"{path} not found: install Slurm and munge (apt-get install slurm-wlm munge; .ci/run does)")
    return found


class Cluster:
    """munged, slurmctld and slurmd of a private one-node cluster; ``SLURM_CONF`` picks it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.host = socket.gethostname().split(".")[0]

    def write_config(self) -> None:
        r = self.root
        for sub in ("munge", "state", "spool", "log", "dev"):
            (r / sub).mkdir(mode=0o755)
        for i in range(3):  # stand-in GPUs: Slurm only stats them (a character device, like /dev/null's)
            os.mknod(r / "dev" / f"gpu{i}", 0o666 | 0o020000, os.makedev(1, 3))
        sock = r / "munge" / "munge.sock"
        self.conf.write_text(
            f"""ClusterName=lightstudy-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,default_queue_depth=100
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
KillWait=5
NodeName={self.host} NodeAddr=127.0.0.1 {NODE} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
        )
        (r / "gres.conf").write_text(f"NodeName={self.host} Name=gpu File={r}/dev/gpu[0-2]\n")

    def _start(self, name: str, *args: str) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "wb")  # noqa: SIM115 (kept open while it runs)
        proc = subprocess.Popen(
            [_daemon(name), *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        self.procs.append((name, proc))

    def start(self) -> None:
        self.write_config()
        m = self.root / "munge"
        subprocess.run([_daemon("mungekey"), "--create", f"--keyfile={m}/munge.key"], check=True, timeout=30)
        self._start(
            "munged",
            "-F",
            f"--socket={m}/munge.sock",
            f"--key-file={m}/munge.key",
            f"--pid-file={m}/munged.pid",
            f"--log-file={m}/munged.log",
            f"--seed-file={m}/munged.seed",
        )
        _until(lambda: (m / "munge.sock").exists() or self._died(), 30, "munged's socket")
        self._start("slurmctld", "-D")
        self._start("slurmd", "-D")
        _until(lambda: self._died() or self.node_state() == "idle", 60, lambda: f"node idle\n{self.logs()}")
        if self._died():
            raise AssertionError(f"a Slurm daemon exited:\n{self.logs()}")

    def _died(self) -> bool:
        return any(proc.poll() is not None for _, proc in self.procs)

    def node_state(self) -> str:
        result = subprocess.run(
            [_daemon("sinfo"), "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True, timeout=30
        )
        return result.stdout.strip()

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = [line for line in path.read_text(errors="replace").splitlines() if "pmix" not in line.lower()]
            parts.append(f"--- {path.name}\n" + "\n".join(lines[-30:]))
        return "\n".join(parts)

    def cmd(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        result = subprocess.run(
            [_daemon(args[0]), *args[1:]],
            env={**(env or self.env), "SLURM_CONF": str(self.conf)},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"{' '.join(args)}: {result.stdout}{result.stderr}"
        return result.stdout

    def tasks(self, job: str) -> dict[str, dict[str, str]]:
        """``{"<job>_<task>": {JobState, ExitCode, ...}}`` for each task of an array job."""
        out = self.cmd("scontrol", "-o", "show", "job", job)
        tasks = {}
        for line in out.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            tasks[f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"] = fields
        return tasks

    def queued(self, job: str) -> list[str]:
        return self.cmd("squeue", "-h", "-r", "-j", job, "-o", "%i %T").split("\n")[:-1]

    def stop(self) -> None:
        """Cancel every job, stop the daemons (slurmd, slurmctld, munged) and whatever a job left."""
        if self.procs and not self._died():
            with contextlib.suppress(subprocess.SubprocessError, AssertionError):  # stop the daemons anyway
                subprocess.run([_daemon("scancel"), "--user", "root"], env=self.env, timeout=60, check=False)
                _until(lambda: not self.cmd("squeue", "-h"), 60, "the queue empty after scancel")
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
        # slurmstepd and the tasks it ran outlive slurmd; each carries this cluster's SLURM_CONF.
        marker = f"SLURM_CONF={self.conf}".encode()
        left = [pid for pid in _pids() if marker in _environ(pid)]
        for pid in left:
            _kill(pid)
        _until(lambda: not any(marker in _environ(pid) for pid in left), 30, f"processes {left} gone")


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or a kernel thread
        return b""


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)


@pytest.fixture(scope="module")
def slurm() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.fail("the Slurm test runs slurmctld and slurmd as root (SlurmUser=root): run it as root, as CI does")
    for name in DAEMONS:
        _daemon(name)
    # Not pytest's tmp_path: munged refuses a socket folder with a parent that others cannot enter.
    root = Path(tempfile.mkdtemp(prefix="ls_slurm_"))
    root.chmod(0o755)
    cluster = Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _user_env(cluster: Cluster, url: str, study: str) -> dict[str, str]:
    """What a user exports before `sbatch` (the job gets it all: --export=ALL)."""
    env = {k: v for k, v in cluster.env.items() if not k.startswith(("SLURM_", "SBATCH_", "CUDA_", "LIGHTSTUDY_"))}
    env.update(
        SLURM_CONF=str(cluster.conf),
        STUDY=study,
        LIGHTSTUDY_STORAGE=url,
        # Two real cores, 24 declared: one torch thread per trial, not --cpus-per-task's 8.
        LIGHTSTUDY_THREADS="1",
        # The tests' own model classes (SlowNet), beside the installed package.
        PYTHONPATH=os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p),
        PYTHONUNBUFFERED="1",
    )
    if sys.prefix != sys.base_prefix:  # the script activates the venv this test runs in
        env["LIGHTSTUDY_VENV"] = sys.prefix
    return env


def _create(doc: dict[str, Any], folder: Path, env: dict[str, str]) -> None:
    spec = write_spec(folder / f"{doc['study']['name']}.yaml", doc)
    result = subprocess.run(
        [sys.executable, "-m", "lightstudy", "create", str(spec)],
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _submit(cluster: Cluster, array: str, env: dict[str, str], folder: Path) -> str:
    out = cluster.cmd("sbatch", "--parsable", f"--array={array}", str(SBATCH), env=env, cwd=folder)
    return out.strip().split(";")[0]


def _outputs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(folder.glob("*.out")))


def _trials(url: str, name: str) -> list[Any]:
    from lightstudy.study import load_study

    study, _ = load_study(url, name)
    return study.get_trials(deepcopy=False)


def _wait_done(cluster: Cluster, job: str, folder: Path, timeout: float) -> dict[str, dict[str, str]]:
    _until(lambda: not cluster.queued(job), timeout, lambda: f"job {job} done\n{_outputs(folder)}\n{cluster.logs()}")
    return cluster.tasks(job)


def test_an_array_job_runs_the_study_to_its_end(slurm: Cluster, pg_url: str, tmp_path: Path) -> None:
    from optuna.trial import TrialState

    env = _user_env(slurm, pg_url, "slurm_array")
    _create(tiny_spec("slurm_array", n_trials=4, max_epochs=2), tmp_path, env)
    job = _submit(slurm, "0-2", env, tmp_path)

    tasks = _wait_done(slurm, job, tmp_path, timeout=400)
    out = _outputs(tmp_path)
    assert sorted(tasks) == [f"{job}_{i}" for i in range(3)], tasks
    for name, task in tasks.items():
        assert (task["JobState"], task["ExitCode"]) == ("COMPLETED", "0:0"), (name, task, out)
    trials = _trials(pg_url, "slurm_array")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4, out
    # Each task got its own GPU from Slurm, passed it on with --gpu, and ran one torch thread.
    gpus = re.findall(rf"^task {job}_(\d) on \S+: study slurm_array, gpu (\S+), run folder (\S+)$", out, re.M)
    assert len(gpus) == 3 and {gpu for _, gpu, _ in gpus} == {"0", "1", "2"}, out
    assert {run for _, _, run in gpus} == {str(tmp_path / "runs" / "slurm_array")}
    assert {t.user_attrs["gpu"] for t in trials} <= {"0", "1", "2"}
    assert {t.user_attrs["threads"] for t in trials} == {1}
    for t in trials:
        assert (tmp_path / "runs" / "slurm_array" / t.user_attrs["trial_dir"]).is_dir()


def test_scancel_term_hands_a_running_trial_back_and_another_task_resumes_it(
    slurm: Cluster, pg_url: str, tmp_path: Path
) -> None:
    from optuna.trial import TrialState

    env = _user_env(slurm, pg_url, "slurm_term")
    doc = tiny_spec("slurm_term", n_trials=2, max_epochs=6)
    doc["model"]["class_path"] = "lightstudy_testing_models.SlowNet"
    doc["model"]["init_args"]["step_sleep"] = 0.1  # seconds per training step: epochs of 2-3 s
    _create(doc, tmp_path, env)
    job = _submit(slurm, "0-1", env, tmp_path)
    run_dir = tmp_path / "runs" / "slurm_term"

    def running_with_checkpoint() -> Any:
        for t in _trials(pg_url, "slurm_term"):
            ckpt = run_dir / str(t.user_attrs.get("trial_dir")) / "checkpoints" / "last.ckpt"
            if t.state == TrialState.RUNNING and "worker" in t.user_attrs and ckpt.exists():
                return t
        return None

    victim = _until(running_with_checkpoint, 300, lambda: f"a trial with a checkpoint\n{_outputs(tmp_path)}")
    pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
    task_env = dict(re.findall(rb"([A-Z_]+)=([^\0]*)", _environ(pid)))
    task = f"{job}_{task_env[b'SLURM_ARRAY_TASK_ID'].decode()}"
    slurm.cmd("scancel", "--signal=TERM", "--batch", task)

    tasks = _wait_done(slurm, job, tmp_path, timeout=400)
    out = _outputs(tmp_path)
    for name, fields in tasks.items():  # the signalled task too: it handed its trial back and exited 0
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), (name, fields, out)
    trials = _trials(pg_url, "slurm_term")
    by_number = {t.number: t for t in trials}
    first = by_number[victim.number]
    assert first.state == TrialState.FAIL and first.user_attrs["interrupted"] is True, out
    retries = [t for t in trials if (t.user_attrs.get("resumed_from") or {}).get("trial") == victim.number]
    assert len(retries) == 1, [(t.number, t.state, t.user_attrs.get("resumed_from")) for t in trials]
    retry = retries[0]
    # Resumed by the other task (the signalled worker exited), from the checkpoint it left.
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs["worker"] != victim.user_attrs["worker"]
    resumed = retry.user_attrs["resumed_from"]
    assert resumed["checkpoint"] == f"{first.user_attrs['trial_dir']}/checkpoints/last.ckpt"
    assert resumed["epoch"] >= 0
    assert retry.user_attrs["trial_dir"] == first.user_attrs["trial_dir"]
    # The budget: two trials counted, both finished; the hand-back is not counted, nothing runs.
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"], (states, out)

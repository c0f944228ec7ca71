"""The deployment files, checked without a Docker engine, a GPU or Slurm (these machines have none).

docker-compose.yml is resolved by Debian's docker-compose 1.29 (`docker-compose config`) with an
``.env`` made from ``.env.example``; every command a service, the docs or the Slurm script runs is
parsed by the real CLI; the Dockerfile and ``.dockerignore`` are parsed; the Slurm script runs
with a stand-in Slurm environment, and once as a task runs, against PostgreSQL.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, run_cli, tiny_spec, wait_until

COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
SBATCH = REPO / "examples" / "slurm" / "lightstudy-worker.sbatch"
SLURM_README = REPO / "examples" / "slurm" / "README.md"
SCALING = REPO / "README.md"  # its "Scaling out" section
TESTS = Path(__file__).parent
SERVICES = {
    "postgres",
    "create",
    "worker",
    "worker-gpu0",
    "worker-gpu1",
    "worker-gpu2",
    "worker-gpu3",
    "worker-cpu",
    "dashboard",
}
WORKERS = sorted(s for s in SERVICES if s.startswith("worker"))


# --- docker-compose.yml ----------------------------------------------------------------------


def _docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail(
            "docker-compose is not installed; these tests parse docker-compose.yml with it. "
            "Install Debian's: apt-get install docker-compose (.ci/run does)",
            pytrace=False,
        )
    return path


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line.strip())
        if match:
            values[match[1]] = match[2]
    return values


def _compose(folder: Path, *extra_files: Path, drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` with an .env made from .env.example, less ``drop``."""
    env_file = folder / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in _env_example().items() if k not in drop))
    files = [arg for f in (COMPOSE, *extra_files) for arg in ("-f", str(f))]
    # Only PATH and HOME: variables of the shell running the tests would win over the .env file.
    env = {"PATH": os.environ["PATH"], "HOME": str(folder)}
    return subprocess.run(
        [_docker_compose(), "--env-file", str(env_file), *files, "config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result = _compose(tmp_path_factory.mktemp("compose"))
    assert result.returncode == 0, f"docker-compose config refused docker-compose.yml:\n{result.stderr}"
    doc: dict[str, Any] = yaml.safe_load(result.stdout)
    return doc


def _lightstudy_services(config: dict[str, Any]) -> dict[str, Any]:
    return {n: s for n, s in config["services"].items() if s["image"].startswith("lightstudy:")}


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", duration))


def _published(port: Any) -> tuple[str, str, str]:
    """(host ip, host port, container port) of a ports entry, in either form compose prints."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), str(port.get("published", "")), str(port["target"])
    parts = str(port).split("/")[0].split(":")  # [ip:][published:]target[/protocol]
    ip = parts[0] if len(parts) == 3 else ""
    published = parts[-2] if len(parts) >= 2 else ""
    return ip, published, parts[-1]


def test_compose_config_accepts_the_file(config: dict[str, Any]) -> None:
    assert set(config["services"]) == SERVICES
    assert set(config["volumes"]) == {"pgdata", "runs"}
    # One image for every lightstudy service, built from this folder by `create`.
    services = _lightstudy_services(config)
    assert set(services) == SERVICES - {"postgres"}
    assert len({s["image"] for s in services.values()}) == 1
    assert Path(services["create"]["build"]["context"]) == REPO


def test_compose_stops_when_a_variable_is_missing(tmp_path: Path) -> None:
    result = _compose(tmp_path, drop=("POSTGRES_PASSWORD",))
    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in result.stderr


def test_postgres_is_healthchecked_persistent_and_private(config: dict[str, Any]) -> None:
    pg = config["services"]["postgres"]
    assert pg["image"].startswith("postgres:") and pg["image"] != "postgres:latest"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.startswith("pgdata:/var/lib/postgresql/data") for v in pg["volumes"])
    assert "ports" not in pg, "the database must not be published on the host"


def test_services_start_in_order(config: dict[str, Any]) -> None:
    services = config["services"]
    assert services["create"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["create"]["restart"] == "no"
    for name in [*WORKERS, "dashboard"]:
        assert services[name]["depends_on"] == {"create": {"condition": "service_completed_successfully"}}, name


def test_workers_reserve_gpus_and_stop_gracefully(config: dict[str, Any]) -> None:
    services = config["services"]
    devices = {
        n: services[n].get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices") for n in WORKERS
    }
    assert devices["worker"] == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    pinned = [f"worker-gpu{i}" for i in range(4)]
    for i, name in enumerate(pinned):
        assert devices[name] == [{"driver": "nvidia", "device_ids": [str(i)], "capabilities": ["gpu"]}]
        assert services[name]["profiles"] == ["pinned"]
    assert devices["worker-cpu"] is None and services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["worker-cpu"]["command"][-4:] == ["--gpu", "cpu", "--threads", "2"]
    assert "profiles" not in services["worker"], "the scalable worker starts with a plain `up`"
    for name in WORKERS:
        s = services[name]
        # SIGTERM reaches the worker (tini as PID 1), which has time to hand its trial back.
        assert s["init"] is True and _seconds(s["stop_grace_period"]) >= 60, name
        assert s["restart"].startswith("on-failure"), f"{name}: a worker that finished must stay down"
        assert s["shm_size"], name


def test_dashboard_is_published_on_loopback_only(config: dict[str, Any]) -> None:
    dashboard = config["services"]["dashboard"]
    command = dashboard["command"]
    assert command[0] == "dashboard"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    container_port = command[command.index("--port") + 1]
    ports = [_published(p) for p in dashboard["ports"]]
    assert ports == [("127.0.0.1", _env_example()["DASHBOARD_PORT"], container_port)]
    published = [_published(p) for s in config["services"].values() for p in s.get("ports", [])]
    assert all(ip == "127.0.0.1" for ip, _, _ in published)


def test_storage_url_is_built_from_env_and_no_password_is_hard_coded(config: dict[str, Any]) -> None:
    from lightstudy.storage import check_url

    env = _env_example()
    url = f"postgresql+psycopg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/{env['POSTGRES_DB']}"
    check_url(url)
    for name, service in _lightstudy_services(config).items():
        assert service["environment"]["LIGHTSTUDY_STORAGE"] == url, name
    pg_env = config["services"]["postgres"]["environment"]
    assert (pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"]) == (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"])
    text = COMPOSE.read_text()
    assert env["POSTGRES_PASSWORD"] not in text
    assert not re.search(r"^\s*\w*PASSWORD\w*:\s*(?!\$\{)\S", text, re.M), "passwords come from .env only"
    assert not re.search(r"://[\w.-]+:[\w.~-]+@", text), "no password in a URL"


def test_checkpoints_and_run_folders_are_one_volume_at_one_path(config: dict[str, Any]) -> None:
    from lightstudy.spec import load_spec

    mounts = {n: [v for v in s["volumes"] if v.startswith("runs:")] for n, s in _lightstudy_services(config).items()}
    targets = {v.split(":")[1] for vs in mounts.values() for v in vs}
    assert all(len(vs) == 1 for vs in mounts.values()), mounts
    assert len(targets) == 1, f"the volume must be mounted at the same path everywhere, got {targets}"
    (target,) = targets
    # The image's working directory + runs/ is the mount: default run folders land in the volume.
    workdir = [a for i, a in _instructions(DOCKERFILE.read_text()) if i == "WORKDIR"][-1]
    assert target == f"{workdir}/runs"
    spec = load_spec(REPO / _env_example()["STUDY_FILE"])
    store = spec.study.checkpoints.store
    assert store is not None and Path(store).is_relative_to(target), store


def test_every_service_command_is_a_lightstudy_command_with_help(config: dict[str, Any]) -> None:
    commands = {tuple(s["command"]) for s in _lightstudy_services(config).values()}
    assert {c[0] for c in commands} == {"create", "worker", "dashboard"}
    for command in sorted(commands):
        # --help after the service's own arguments: click rejects an unknown option before it helps.
        result = run_cli(*command, "--help", cwd=REPO)
        assert result.returncode == 0, f"{command}: {result.stderr}"
        assert f"Usage: lightstudy {command[0]}" in result.stdout


def test_the_created_study_validates_and_is_the_one_workers_join(config: dict[str, Any]) -> None:
    from lightstudy.spec import load_spec

    command = config["services"]["create"]["command"]
    assert command[0] == "create" and command[1].startswith("studies/"), "the image has studies/ only"
    result = run_cli("validate", command[1], cwd=REPO)
    assert result.returncode == 0, result.stderr
    name = load_spec(REPO / command[1]).study.name
    for worker in WORKERS:
        args = config["services"][worker]["command"]
        assert args[args.index("--study") + 1] == name, worker


def test_env_example_holds_every_variable_and_no_secret() -> None:
    used = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE.read_text()))
    env = _env_example()
    assert used <= set(env), f".env.example lacks {sorted(used - set(env))}"
    assert set(env) <= used, f".env.example has unused {sorted(set(env) - used)}"
    for key, value in env.items():
        if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", key):
            assert value.startswith("change-me"), f"{key}: a placeholder, never a real-looking secret"
        random_looking = len(value) >= 16 and re.fullmatch(r"[A-Za-z0-9+/=_-]+", value) and re.search(r"\d", value)
        assert not random_looking, f"{key}={value} looks like a secret"


def test_env_is_git_ignored_and_kept_out_of_the_image() -> None:
    result = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f".env must be git-ignored: {result.stderr}"
    assert _ignored(".env")


def test_docs_override_example_merges_with_the_compose_file(tmp_path: Path) -> None:
    blocks = re.findall(r"```yaml\n(# docker-compose\.override\.yml\n.*?)```", SCALING.read_text(), re.S)
    assert len(blocks) == 1
    override = tmp_path / "docker-compose.override.yml"
    override.write_text(blocks[0])
    result = _compose(tmp_path, override)
    assert result.returncode == 0, result.stderr
    merged = yaml.safe_load(result.stdout)["services"]
    assert any(v.endswith("/app/data:ro") for v in merged["worker"]["volumes"])


# --- Dockerfile and .dockerignore ------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped, as Docker does."""
    out, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        instruction, _, args = current.partition(" ")
        out.append((instruction.upper(), args.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return out


def _ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (Docker's rules: last match
    wins, ``!`` lets back in, a pattern that matches a folder matches what is in it)."""
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        alternatives = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(p, a) for p in prefixes for a in alternatives):
            ignored = not negate
    return ignored


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE.read_text())


def _index(instructions: list[tuple[str, str]], instruction: str, needle: str) -> int:
    hits = [i for i, (ins, args) in enumerate(instructions) if ins == instruction and needle in args]
    assert len(hits) == 1, f"expected one {instruction} with {needle!r}, got {len(hits)}"
    return hits[0]


def test_dockerfile_base_user_and_entrypoint(dockerfile: list[tuple[str, str]]) -> None:
    args = dict(re.findall(r"^(\w+)=(\S+)$", "\n".join(a for i, a in dockerfile if i == "ARG"), re.M))
    (base,) = [re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], a) for i, a in dockerfile if i == "FROM"]
    assert re.fullmatch(r"python:3\.\d+-slim-\w+", base), f"a pinned slim Python base, got {base}"
    users = [(n, a) for n, (i, a) in enumerate(dockerfile) if i == "USER"]
    entrypoint = _index(dockerfile, "ENTRYPOINT", "lightstudy")
    assert users and users[-1][1] not in ("root", "0") and users[-1][0] < entrypoint, "run as a non-root user"
    assert json.loads(dockerfile[entrypoint][1]) == ["lightstudy"], "exec form: signals reach lightstudy"
    user = users[-1][1]
    assert any(i == "RUN" and "useradd" in a and user in a for i, a in dockerfile)
    assert any(i == "RUN" and f"chown {user}" in a and "/app/runs" in a for i, a in dockerfile)


def test_dockerfile_layers_are_cache_friendly(dockerfile: list[tuple[str, str]]) -> None:
    torch = _index(dockerfile, "RUN", "torch==")
    deps = _index(dockerfile, "RUN", "-r /tmp/lightstudy/requirements.txt")
    source = _index(dockerfile, "COPY", "src ")
    install = _index(dockerfile, "RUN", "--no-deps /tmp/lightstudy")
    assert torch < deps < source < install
    before_deps = [a for i, a in dockerfile[:deps] if i in ("COPY", "ADD")]
    assert before_deps == ["pyproject.toml /tmp/lightstudy/pyproject.toml"], "only pyproject.toml before the deps"


def test_dockerfile_installs_safely(dockerfile: list[tuple[str, str]]) -> None:
    assert not any(i == "ADD" and re.search(r"\w+://", a) for i, a in dockerfile), "no ADD of a URL"
    pip_installs = [seg for i, a in dockerfile if i == "RUN" for seg in a.split("&&") if "pip install" in seg]
    assert len(pip_installs) == 3
    for segment in pip_installs:
        assert "--no-cache-dir" in segment, segment
    assert not any(i == "RUN" and re.search(r"\b(curl|wget)\b", a) for i, a in dockerfile)
    for i, a in dockerfile:
        if i == "COPY":
            *sources, _ = shlex.split(a)
            for source in sources:
                assert not _ignored(source), f"COPY {source}: excluded by .dockerignore"


def test_dockerfile_dependency_step_lists_pyproject_dependencies(dockerfile: list[tuple[str, str]]) -> None:
    import tomllib

    run = dockerfile[_index(dockerfile, "RUN", "tomllib")][1]
    words = shlex.split(run.split("&&")[0])
    assert words[:2] == ["python", "-c"] and words[3:] == [">", "/tmp/lightstudy/requirements.txt"]
    code = words[2].replace("/tmp/lightstudy/pyproject.toml", str(REPO / "pyproject.toml"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert result.stdout.split("\n")[:-1] == project["dependencies"] + project["optional-dependencies"]["s3"]


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        (".venv/bin/python", True),
        ("runs/digits/study.db", True),
        (".git/HEAD", True),
        (".env", True),
        ("data/cifar-10-batches-py/data_batch_1", True),
        ("tests/conftest.py", True),
        ("src/lightstudy/__pycache__/cli.cpython-312.pyc", True),
        ("src/lightstudy.egg-info/PKG-INFO", True),
        ("src/lightstudy/cli.py", False),
        ("pyproject.toml", False),
        ("README.md", False),
        ("studies/digits_compose.yaml", False),
    ],
)
def test_dockerignore_keeps_the_build_context_small(path: str, ignored: bool) -> None:
    assert _ignored(path) is ignored


# --- Slurm -----------------------------------------------------------------------------------


def test_sbatch_script_parses_and_asks_for_a_signal_before_the_time_limit() -> None:
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = SBATCH.read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, re.M)
    assert any(re.fullmatch(r"--signal=B:TERM@\d+", d) for d in directives), directives
    assert "--gres=gpu:1" in directives and any(d.startswith("--array=") for d in directives)
    # `B:` signals the batch shell only, so the worker must be the batch shell: exec.
    code = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert code[-1].startswith("exec lightstudy worker ")


def _stub(folder: Path, body: str) -> dict[str, str]:
    """An environment whose ``lightstudy`` is a script with ``body``."""
    folder.mkdir(exist_ok=True)
    stub = folder / "lightstudy"
    stub.write_text(f"#!/bin/sh\n{body}\n")
    stub.chmod(0o755)
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_", "LIGHTSTUDY_"))}
    return {**keep, "PATH": f"{folder}:{os.environ['PATH']}"}


@pytest.mark.parametrize(
    ("slurm", "gpu"),
    [
        ({"CUDA_VISIBLE_DEVICES": "3"}, "3"),
        ({"CUDA_VISIBLE_DEVICES": "4,5", "SLURM_LOCALID": "1"}, "5"),
        ({}, "cpu"),
    ],
    ids=["gres-gpu-1", "several-gpus-localid", "no-gpu"],
)
def test_sbatch_script_runs_the_worker_on_the_tasks_gpu(tmp_path: Path, slurm: dict[str, str], gpu: str) -> None:
    env = _stub(tmp_path / "bin", 'printf "%s\\n" "$@" > "$ARGS_OUT"')
    env.update(
        slurm,
        ARGS_OUT=str(tmp_path / "args"),
        STUDY="digits",
        LIGHTSTUDY_STORAGE="postgresql+psycopg://lightstudy@db/lightstudy",
        SLURM_SUBMIT_DIR=str(tmp_path),
        SLURM_CPUS_PER_TASK="8",
    )
    result = subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "args").read_text().splitlines()
    run_dir = str(tmp_path / "runs" / "digits")
    assert args == ["worker", "--study", "digits", "--gpu", gpu, "--run-dir", run_dir, "--threads", "8"]
    assert ("no GPU allocated" in result.stderr) is (gpu == "cpu")


@pytest.mark.parametrize("missing", ["STUDY", "LIGHTSTUDY_STORAGE"])
def test_sbatch_script_says_what_is_missing(tmp_path: Path, missing: str) -> None:
    env = _stub(tmp_path / "bin", "exit 0")
    env.update(STUDY="digits", LIGHTSTUDY_STORAGE="postgresql+psycopg://lightstudy@db/lightstudy")
    del env[missing]
    result = subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert missing in result.stderr


@pytest.fixture
def _terminated() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.postgres
def test_sbatch_task_hands_its_trial_back_on_sigterm_and_exits_zero(
    pg_url: str, tmp_path: Path, _terminated: list[subprocess.Popen[str]]
) -> None:
    """The script as a Slurm task runs it; SIGTERM goes where `--signal=B:TERM` sends it."""
    from optuna.trial import TrialState
    from sqlalchemy.engine import make_url

    from lightstudy.spec import spec_from_dict
    from lightstudy.study import create_study, load_study

    url = make_url(pg_url)
    password = url.password or "not-a-real-password"
    url_text = url.set(password=password).render_as_string(hide_password=False)
    doc = tiny_spec(n_trials=1, max_epochs=8)
    doc["model"]["class_path"] = "lightstudy_testing_models.SlowNet"
    doc["model"]["init_args"]["step_sleep"] = 0.1  # seconds per training step: epochs of 1-2 s
    create_study(spec_from_dict(doc), url_text)

    env = _stub(tmp_path / "bin", f'exec "{sys.executable}" -m lightstudy "$@"')
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p),
        PYTHONUNBUFFERED="1",
        STUDY="tiny",
        LIGHTSTUDY_STORAGE=url_text,
        SLURM_SUBMIT_DIR=str(tmp_path),
        SLURM_ARRAY_JOB_ID="42",
        SLURM_ARRAY_TASK_ID="3",
        SLURM_CPUS_PER_TASK="1",
        # What a batch step has besides: Lightning, in the trial, detects Slurm from these.
        SLURM_JOB_ID="45",
        SLURM_JOB_NAME="lightstudy",
        SLURM_NTASKS="1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        SLURM_NODELIST="node001",
    )
    proc = subprocess.Popen(
        ["bash", str(SBATCH)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _terminated.append(proc)
    last = tmp_path / "runs" / "tiny" / "trials" / "trial-0000" / "checkpoints" / "last.ckpt"
    wait_until(last.exists, 180, "the trial's last.ckpt", proc=proc)
    # Wherever the trial stands (a SIGTERM mid-validation is handed back too: test_worker's
    # test_sigterm_during_validation_hands_the_trial_back signals it there exactly).
    proc.send_signal(signal.SIGTERM)  # the batch shell's pid: after `exec`, the worker's
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "task 42_3 on " in out and "gpu cpu" in out
    assert password not in out
    study, _ = load_study(url_text, "tiny")
    trials = study.get_trials()
    assert len(trials) == 2, (out, [(t.state, t.user_attrs) for t in trials])
    first, retry = trials
    assert first.state == TrialState.FAIL and first.user_attrs["interrupted"] is True
    assert retry.state == TrialState.WAITING


# --- docs ------------------------------------------------------------------------------------


def test_docs_say_what_was_not_run() -> None:
    scaling = SCALING.read_text()
    assert "### What was not run here" in scaling
    for missing in ("no Docker engine", "no GPU"):
        assert missing.lower() in scaling.lower(), missing
    # Slurm was run (tests/test_slurm.py); the page says on what, and what it did not exercise.
    slurm = SLURM_README.read_text()
    assert "## Tested on a one-node cluster" in slurm and "tests/test_slurm.py" in slurm
    assert "Not exercised:" in slurm
    for section in (
        "### One GPU box",
        "### docker-compose on one host",
        "### Several hosts by hand",
        "### Slurm",
        "### Large fleets: `lightstudy proxy`",
    ):
        assert section in scaling, section


def _documented_commands() -> list[list[str]]:
    """Every ``lightstudy CMD ...`` in the docs' shell blocks, as argument lists."""
    commands = []
    for doc in (SCALING, SLURM_README):
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                match = re.search(r"(?:^|\s)lightstudy\s+([a-z].*)", line)
                if match:
                    rest = re.split(r"\s(?:#|>|&|;|\|)", match[1])[0]
                    commands.append(shlex.split(rest))
    return commands


def test_docs_run_only_real_commands_and_options() -> None:
    commands = _documented_commands()
    assert {c[0] for c in commands} >= {"run", "create", "worker", "status", "dashboard", "best"}
    for command in {tuple(c) for c in commands}:
        result = run_cli(*command, "--help", cwd=REPO)
        assert result.returncode == 0, f"docs: lightstudy {' '.join(command)}: {result.stderr}"

"""Bad input found by a machine: hypothesis mutates valid study files (values, types, ranges, keys,
YAML shapes, ``when:`` conditions, enqueued values) and ``lightstudy validate`` must either accept
the result or refuse it with exit code 2 and one line naming the key, never a traceback, writing
nothing; an accepted mutant must be a study that ``create`` and ``run`` finish.

``LIGHTSTUDY_FUZZ_EXAMPLES`` raises the number of cases (the suite runs a modest number).
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from conftest import cli, run_cli, tiny_spec

EXAMPLES = int(os.environ.get("LIGHTSTUDY_FUZZ_EXAMPLES", "120"))
RELATED = {
    "search_space": ("study.enqueue", "study.sampler"),
    # a sampler's needs show in the search space: GridSampler's finite grid (a float without step)
    "study": ("search_space",),
    "model": ("search_space",),
    "data": ("search_space",),
    "trainer": ("search_space",),
}


def _bases() -> list[dict[str, Any]]:
    """Valid specs that between them use every form the spec knows."""
    plain = tiny_spec("fuzz", n_trials=1, max_epochs=1)
    plain["trainer"].update(limit_train_batches=1, limit_val_batches=1, enable_progress_bar=False, logger=False)
    conditional = copy.deepcopy(plain)
    conditional["study"].update(sampler={"name": "TPESampler", "n_startup_trials": 2}, pruner="MedianPruner")
    conditional["search_space"] = {
        "model.init_args.optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
        "model.init_args.weight_decay": {
            "type": "float",
            "low": 0.0,
            "high": 0.01,
            "when": {"model.init_args.optimizer": "adam"},
        },
        "model.init_args.channels": {"type": "int", "low": 4, "high": 8, "step": 2},
        "model.init_args.dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
    }
    conditional["study"]["enqueue"] = [{"model.init_args.optimizer": "sgd", "model.init_args.channels": 6}]
    several = copy.deepcopy(plain)
    del several["study"]["direction"], several["study"]["metric"]
    several["study"].update(
        directions=["maximize", "minimize"],
        metrics=["val_acc", "val_loss"],
        sampler={"class_path": "optuna.samplers.RandomSampler", "init_args": {"seed": 1}},
        timeout=600,
        checkpoints={"keep": 1},
    )
    several["search_space"]["model.init_args.hidden"] = {"type": "int", "low": 8, "high": 64, "log": True}
    return [plain, conditional, several]


BASES = _bases()

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(codec="utf-8"), max_size=8)
    | st.sampled_from([0, -1, 1, 0.0, -0.0, 1e-300, 1e300, "1", "true", "null", "", "maximize", "none"])
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a document (mapping keys and list indexes)."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        doc = doc[key]
    return doc


def _typo(word: str, draw: st.DrawFn) -> str:
    i = draw(st.integers(0, max(len(word) - 1, 0)))
    return draw(
        st.sampled_from([word[:i] + word[i + 1 :], word[:i] + word[i : i + 1] * 2 + word[i + 1 :], word.upper()])
    )


# Each mutation changes the document in place and returns the top-level key it touched ("" for all).
Mutation = Callable[[st.DrawFn, dict[str, Any]], str]


def _replace(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    path = draw(st.sampled_from(_paths(doc)))
    _parent(doc, path)[path[-1]] = draw(_values)
    return str(path[0])


def _delete(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    path = draw(st.sampled_from(_paths(doc)))
    del _parent(doc, path)[path[-1]]
    return str(path[0])


def _add_or_rename(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    mappings = [p for p in _paths(doc) if isinstance(_parent(doc, p)[p[-1]], dict)]
    path = draw(st.sampled_from([(), *mappings]))
    node = _parent(doc, (*path, None)) if path else doc
    old = draw(st.sampled_from(sorted(map(str, node)) or ["x"]))
    new = draw(st.sampled_from([_typo(old, draw), draw(st.text(max_size=6)), draw(st.integers(-1, 3))]))
    if old in node and draw(st.booleans()):
        node[new] = node.pop(old)
    else:
        node[new] = draw(_values)
    return str(path[0]) if path else str(new)


# Keys the spec knows, with values that reach its rules (a vocabulary the random names would miss).
KNOWN = {
    "study": [
        "storage",
        "timeout",
        "seed",
        "sampler",
        "pruner",
        "scheduler",
        "checkpoints",
        "run_dir",
        "trial_timeout",
        "max_retry",
        "heartbeat_interval",
        "grace_period",
        "enqueue",
        "directions",
        "metrics",
    ],
    "trainer": [
        "devices",
        "strategy",
        "num_nodes",
        "max_steps",
        "max_time",
        "enable_checkpointing",
        "callbacks",
        "accelerator",
        "max_epochs",
    ],
    "model": ["init_args", "dict_kwargs", "class_path"],
    "": ["optimizer", "lr_scheduler", "seed_everything", "search_space"],
}
SPECIAL = [
    "ddp",
    "ddp_spawn",
    "fsdp",
    "auto",
    "cpu",
    [0, 1],
    "2",
    2,
    -1,
    {"class_path": 3},
    {"class_path": "x.DDPStrategy"},
    {"name": "GridSampler"},
    {"name": "NSGAIISampler"},
    "NopPruner",
    "optuna.pruners.NopPruner",
    {"name": "ASHA", "max_resource": 2},
    {"name": "PBT", "max_resource": 2, "population": 2, "interval": 1},
    {"keep": 1, "store": "s3://"},
    {"store": "/tmp/x", "endpoint_url": "http://m:9"},
    "sqlite:///x.db",
    "mysql://h/db",
    "postgresql://u:pw@h/db",
    "grpc://h:1",
    "grpc://nowhere",
    "torch.optim.SGD",
    {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}},
    [{"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": {"monitor": "val_acc"}}],
    "00:00:01:00",
]


def _known_key(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    block = draw(st.sampled_from(sorted(KNOWN)))
    node = doc if not block else doc.get(block)
    if not isinstance(node, dict):
        return block
    key = draw(st.sampled_from(KNOWN[block]))
    node[key] = draw(st.one_of(st.sampled_from(SPECIAL), _values))
    return block or key


def _new_param(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    """A search-space entry at a path of the config (a value, inside a value, a class_path, a list item)."""
    config = {k: v for k, v in doc.items() if k not in ("study", "search_space")}
    path = ".".join(map(str, draw(st.sampled_from(_paths(config) or [("model", "x")]))))
    path += draw(st.sampled_from(["", ".x", ".0", ".init_args.y"]))
    dist = draw(
        st.sampled_from(
            [
                {"type": "int", "low": 1, "high": 2 * 10**6},  # a GridSampler refuses more than 10**6 points
                {"type": "float", "low": 0.0, "high": 1.0, "step": 1e-300},
                {"type": "categorical", "choices": [1, 2]},
                {"type": "categorical", "choices": ["lightstudy.examples.ConvNet", "torch.nn.Linear"]},
                {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
            ]
        )
    )
    if isinstance(doc.get("search_space"), dict):
        doc["search_space"][path] = dist
    return "search_space"


def _edge_number(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    leaves = [p for p in _paths(doc) if isinstance(_parent(doc, p)[p[-1]], (int, float))]
    path = draw(st.sampled_from(leaves))
    edge = st.sampled_from([0, -1, 1, 2, -0.5, 0.5, 1e-12, 10**12, float("nan"), float("inf"), True, "3", None])
    _parent(doc, path)[path[-1]] = draw(edge)
    return str(path[0])


def _distribution(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    space = doc.setdefault("search_space", {})
    if not isinstance(space, dict) or not space:
        return "search_space"
    dist = space[draw(st.sampled_from(sorted(space, key=str)))]
    if not isinstance(dist, dict):
        return "search_space"
    key = draw(st.sampled_from(["low", "high", "log", "step", "type", "choices"]))
    dist[key] = draw(
        st.sampled_from(
            [0, 1, -1, 0.0, 1e-5, 1e-300, 2.5, 100, 10**5, True, False, None, "int", "float", [], [1, 1], [1, True]]
        )
    )
    return "search_space"


def _when(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    space = doc.get("search_space")
    if not isinstance(space, dict) or not space:
        return "search_space"
    names = sorted(space, key=str)
    target = draw(st.sampled_from(names))
    parent = draw(st.sampled_from([*names, "model.init_args.nowhere"]))
    value = draw(st.one_of(_scalars, st.lists(_scalars, max_size=2), st.sampled_from(["adam", "sgd", 6, 64])))
    if isinstance(space[target], dict):
        space[target]["when"] = draw(st.sampled_from([{parent: value}, value, {}]))
    return "search_space"


def _enqueue(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    study = doc.get("study")
    if not isinstance(study, dict):
        return "study"
    space = doc.get("search_space") if isinstance(doc.get("search_space"), dict) else {}
    names = [*sorted(space, key=str), "model.init_args.nowhere"]
    picked = draw(st.lists(st.sampled_from(names), min_size=0, max_size=3, unique=True))
    values = st.one_of(st.sampled_from([0, 6, 7, 64, 128, 1e-3, 0.5, 2.0, "adam", "sgd", True, None]), _scalars)
    study["enqueue"] = [{name: draw(values) for name in picked}]
    return "study"


def _shape(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    key = draw(st.sampled_from(sorted(doc, key=str)))
    value = doc[key]
    doc[key] = draw(
        st.sampled_from([list(value.values()) if isinstance(value, dict) else [value], str(value), None, 3])
    )
    return key


MUTATIONS: list[Mutation] = [
    _replace,
    _new_param,
    _delete,
    _add_or_rename,
    _known_key,
    _edge_number,
    _distribution,
    _when,
    _enqueue,
    _shape,
]


@st.composite
def mutants(draw: st.DrawFn) -> tuple[str, set[str]]:
    """A mutated study file's text and the top-level keys the mutations touched ("": anywhere)."""
    doc = copy.deepcopy(draw(st.sampled_from(BASES)))
    touched = set()
    for _ in range(draw(st.integers(1, 2))):
        touched.add(draw(st.sampled_from(MUTATIONS))(draw, doc))
    text = yaml.safe_dump(doc, sort_keys=False)
    if draw(st.integers(0, 9)) == 0:  # the YAML itself: cut short, or a stray character
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(
            st.sampled_from(["", ":", "[", "{", "- ", "&", "*x", "\t", "'", "!!python/object:os.system "])
        )
        touched.add("")
    return text, touched


def _validate(text: str) -> tuple[int, str, Path]:
    """``lightstudy validate`` on the text in an empty folder; asserts it wrote nothing."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "study.yaml"
        path.write_text(text, encoding="utf-8")
        result = run_cli("validate", str(path), cwd=Path(folder), env={"LIGHTSTUDY_STORAGE": ""})
        left = sorted(p.name for p in Path(folder).rglob("*"))
        assert left == ["study.yaml"], f"validate wrote {left}"
        return result.returncode, result.stderr.strip(), path


def _check_refusal(code: int, err: str, path: Path, touched: set[str], text: str) -> None:
    assert code == 2, f"exit {code}\n{err}\n---\n{text}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"{err}\n---\n{text}"
    assert lines[0].startswith(f"error: {path}: "), err
    assert "; fix: " in lines[0], err
    where = lines[0].removeprefix(f"error: {path}: ")
    if "" in touched or re.match(r"line \d+, column \d+: |is empty;|must be a YAML mapping", where):
        return  # the file as a whole, or a place in its text
    # The key named is in a block the mutation touched (an unknown top-level key is named as
    # written), or where that block's change shows: queued values and a grid live in the study
    # block, a class's arguments are checked against the search space's values.
    allowed = {prefix for t in touched for prefix in (t, *RELATED.get(t, ()))}
    assert where.startswith(tuple(allowed)), f"names {where!r} for a change in {touched}\n---\n{text}"


def _grid_sampler_on_a_continuous_space() -> tuple[str, set[str]]:
    doc = _bases()[0]
    doc["study"]["sampler"] = {"name": "GridSampler"}
    return yaml.safe_dump(doc, sort_keys=False), {"study"}


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis folder in the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutants())
# Drawn in a CI run: the sampler made GridSampler, refused at the search space's float (no step).
@example(_grid_sampler_on_a_continuous_space())
def test_validate_accepts_or_refuses_in_one_line(case: tuple[str, set[str]]) -> None:
    text, touched = case
    code, err, path = _validate(text)
    event("accepted" if code == 0 else "refused")  # --hypothesis-show-statistics shows the split
    if code != 0:
        _check_refusal(code, err, path, touched, text)
        if os.environ.get("LIGHTSTUDY_FUZZ_LOG"):
            with open(os.environ["LIGHTSTUDY_FUZZ_LOG"], "a") as log:
                log.write(err.removeprefix(f"error: {path}: ") + "\n")


@pytest.mark.slow
def test_the_real_script_refuses_without_a_traceback(tmp_path: Path) -> None:
    """The installed entry point, in its own interpreter, for a few mutants (one of each kind of failure)."""
    cases = {
        "empty.yaml": "",
        "yaml.yaml": "study: {name: x\n",
        "range.yaml": yaml.safe_dump(
            {**BASES[0], "search_space": {"model.init_args.lr": {"type": "float", "low": 0.0, "high": 1, "log": True}}}
        ),
        "when.yaml": yaml.safe_dump(
            {
                **BASES[1],
                "search_space": {
                    **BASES[1]["search_space"],
                    "model.init_args.dropout": {
                        "type": "float",
                        "low": 0,
                        "high": 1,
                        "when": {"model.init_args.optimizer": "rmsprop"},
                    },
                },
            }
        ),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    for name in cases:
        result = cli("validate", name, cwd=tmp_path)
        assert result.returncode == 2, result
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith(f"error: {name}: "), result.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cases), "validate wrote something"


@st.composite
def accepted(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """Mutants that stay valid: other samplers, pruners, spaces, conditions and queued values."""
    doc = copy.deepcopy(base)
    study = doc["study"]
    if "directions" not in study:
        study["pruner"] = draw(st.sampled_from([None, "MedianPruner", {"name": "HyperbandPruner", "min_resource": 1}]))
        study["sampler"] = draw(st.sampled_from(["TPESampler", "RandomSampler", {"name": "QMCSampler", "seed": 2}]))
    low = draw(st.floats(1e-4, 1e-2))
    doc["search_space"]["model.init_args.lr"] = {"type": "float", "low": low, "high": low * 10, "log": True}
    study["enqueue"] = [{"model.init_args.lr": low * 2}]
    return doc


@pytest.mark.slow
@pytest.mark.parametrize("base", range(len(BASES)), ids=["plain", "conditional", "several"])
@settings(max_examples=1, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_an_accepted_mutant_is_a_study_that_runs_to_the_end(base: int, data: st.DataObject) -> None:
    """One mutant of each base (a run costs a worker's start): create, then run to the end."""
    from optuna.trial import TrialState

    from lightstudy.study import load_study

    doc = data.draw(accepted(BASES[base]))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "study.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        assert run_cli("validate", str(path), cwd=Path(folder)).returncode == 0
        run_cli("create", str(path), cwd=Path(folder), check=True)
        run_cli("run", str(path), "--workers", "1", cwd=Path(folder), check=True)
        study, _ = load_study(f"sqlite:///{Path(folder) / 'runs/fuzz/study.db'}", "fuzz")
        states = [t.state for t in study.get_trials()]
        assert len(states) == doc["study"]["n_trials"]
        assert all(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states), states

"""Write a pip constraints file that pins each main dependency to its declared floor.

CI installs the package with it in a second venv and runs the fast tests there, so the floors in
pyproject.toml's [project.dependencies] are versions that were tested, not guesses:

    python .ci/min_constraints.py > /tmp/min.txt
    pip install -c /tmp/min.txt torch==2.14.1 torchvision==0.29.1 -e ".[test]"

torch and torchvision are left out: this project's machines have only 2.14.1 / 0.29.1 on disk,
and CI installs those on the command line. Every other dependency must declare a floor (`>=`).
Needs Python 3.11 or later (tomllib).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# Installed at fixed versions by CI itself (see the module docstring).
UNPINNED = {"torch", "torchvision"}
# Not our dependencies, pinned because pip backtracks over them at our floors: moto[server] (test
# extra) needs cfn-lint, whose latest releases need an aws-sam-translator that needs a newer
# pydantic than our floor; pip then walks back through dozens of releases of both (minutes).
# These are the releases pip settles on; raise them together with the pydantic floor.
TRANSITIVE = {"cfn-lint": "1.47.1", "aws-sam-translator": "1.106.0"}


def floors(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """``{requirement name with extras: floor}`` for each main dependency (torch aside)."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out: dict[str, str] = {}
    for dep in deps:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)\s*", dep)
        if not match:
            raise SystemExit(f"{pyproject}: dependency {dep!r} has no plain `>=` floor; declare one (e.g. 'name>=1.2')")
        name = match[1]
        if name.lower() not in UNPINNED:
            out[name] = match[3]
    return out


def main() -> None:
    lines = [f"{name}=={version}" for name, version in floors().items()]
    lines += [f"{name}=={version}" for name, version in TRANSITIVE.items()]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

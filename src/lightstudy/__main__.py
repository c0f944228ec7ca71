"""``python -m lightstudy``."""

from __future__ import annotations

from lightstudy.cli import script

if __name__ == "__main__":
    script()

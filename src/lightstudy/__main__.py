"""``python -m lightstudy``."""

from __future__ import annotations

from lightstudy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

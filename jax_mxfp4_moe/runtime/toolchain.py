"""Locations of external tools the kernel compilers need."""

from __future__ import annotations

import os
from pathlib import Path

# Set up by install.sh: <repo>/.rocm/llvm/bin/ld.lld -> the system lld-19.
REPO_ROCM_DIR = Path(__file__).resolve().parents[2] / ".rocm"
_LLD = Path("llvm") / "bin" / "ld.lld"


def rocm_path() -> str | None:
    """A folder usable as ROCM_PATH for linking gfx950 code objects.

    FlyDSL links with ``$ROCM_PATH/llvm/bin/ld.lld``: returns ``$ROCM_PATH``
    if it holds that linker, else the repository's ``.rocm`` folder made by
    install.sh if it does, else None.
    """
    env = os.environ.get("ROCM_PATH")
    if env and (Path(env) / _LLD).exists():
        return env
    if (REPO_ROCM_DIR / _LLD).exists():
        return str(REPO_ROCM_DIR)
    return None

"""The versions the kernel backends were tested with, and one warning for others.

The pins of pyproject.toml's extras allow these ranges; a version outside
them can still be installed by hand (or come with a GPU image), so a kernel
backend that compiles with one says so once per process.
"""

from __future__ import annotations

import warnings

# package -> {major.minor: where it was tested}
TESTED = {
    "jax": {"0.10": "CI (CPU): every CPU test, the kernels compiled for sm_90a and gfx950",
            "0.11": "the NVIDIA H100/H200 runs in bench/NOTES.md (jax 0.11.2)"},
    "triton": {"3.6": "the NVIDIA H100/H200 runs in bench/NOTES.md",
               "3.9": "CI: sm_90a compile tests, SASS checks and triton's interpreter"},
    "flydsl": {"0.5": "CI: gfx950 compile and ISA tests (no AMD GPU has run the kernels)"},
}


class UntestedVersionWarning(UserWarning):
    """A kernel backend runs with a package version this project has not tested."""


_warned: set = set()


def major_minor(version: str) -> str:
    parts = str(version).split("+")[0].split(".")
    return ".".join(parts[:2])


def is_tested(package: str, version: str) -> bool:
    return major_minor(version) in TESTED[package]


def check(package: str, version: str | None, *, backend: str) -> bool:
    """Warn once (per package and version) when ``version`` is untested;
    True when it is tested or unknown (None: not installed)."""
    if version is None or is_tested(package, version):
        return True
    if (package, version) not in _warned:
        _warned.add((package, version))
        tested = "; ".join(f"{v}.x: {where}" for v, where in TESTED[package].items())
        warnings.warn(
            f"jax_mxfp4_moe: the {backend} backend runs with {package} {version}, a version this "
            f"project has not tested (tested: {tested}). Run `python -m jax_mxfp4_moe.selfcheck` "
            f"to check the kernels on this machine against the reference.",
            UntestedVersionWarning, stacklevel=3)
    return False


def check_jax(*, backend: str) -> bool:
    import jax
    return check("jax", jax.__version__, backend=backend)

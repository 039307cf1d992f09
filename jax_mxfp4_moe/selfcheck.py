"""``python -m jax_mxfp4_moe.selfcheck``: the kernels on this machine's GPU against
the reference (jax_mxfp4_moe.tools.selfcheck says what it checks)."""

import sys

from jax_mxfp4_moe.tools.selfcheck import NO_GPU_EXIT, main, plan  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())

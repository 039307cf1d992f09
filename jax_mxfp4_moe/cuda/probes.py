"""The device's ceilings measured with this backend's own kernels (the
bench takes the best of these and XLA's): HBM read rate by a streaming
read, and the bf16 tensor rate by a tuned dense matmul
(cuda/kernels/probes.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_mxfp4_moe.cuda import config
from jax_mxfp4_moe.cuda.compile import kernel, launch
from jax_mxfp4_moe.runtime import ffi

# 8 programs of 8 warps per SM, each step 4 x 4096 f32 (16-byte loads).
_READ_BLOCK, _READ_UNROLL, _READ_PROGRAMS_PER_SM = 4096, 4, 8
# 128 x 256 x 64 tiles, 8 warps, 3-deep pipeline: triton's Hopper matmul
# configuration for large bf16 products.
_MM = dict(BM=128, BN=256, BK=64, GROUP_M=8)


def stream_read(n: int):
    """A jitted fn(x f32 [n]) -> per-program sums that reads x once."""
    k = kernel("probes", "stream_read", num_warps=8, num_stages=1, BLOCK=_READ_BLOCK,
               UNROLL=_READ_UNROLL)
    programs = config.NUM_SMS * _READ_PROGRAMS_PER_SM
    return jax.jit(lambda x: launch(k, (programs, 1, 1), [x, ffi.Out(0), n],
                                    [jax.ShapeDtypeStruct((programs,), jnp.float32)],
                                    name="stream_read")[0])


def matmul_bf16(size: int):
    """A jitted fn(a, b) -> a @ b for bf16 [size, size] operands (size a multiple of 256)."""
    if size % _MM["BN"]:
        raise ValueError(f"size: expected a multiple of {_MM['BN']}, got {size}")
    k = kernel("probes", "matmul_bf16", num_warps=8, num_stages=3, **_MM)
    grid = (size // _MM["BM"]) * (size // _MM["BN"])
    return jax.jit(lambda a, b: launch(k, (grid, 1, 1), [a, b, ffi.Out(0), size, size, size],
                                       [jax.ShapeDtypeStruct((size, size), jnp.bfloat16)],
                                       name="matmul_bf16")[0])

"""Where an expert's weight rows and K steps live, in either weight layout.

Both layouts are read through these helpers: the canonical one and the sm90
one (cuda/layout.py: contiguous tiles of TILE_N rows x TILE_K K elements).
"""

import triton
import triton.language as tl

from jax_mxfp4_moe import spec
from jax_mxfp4_moe.cuda import layout

TILE_N: tl.constexpr = tl.constexpr(layout.TILE_N)
TILE_K: tl.constexpr = tl.constexpr(layout.TILE_K)


# Weight addressing, of the packed values (ROW_BYTES = VALUE_BYTES per TILE_K
# of a row) and of the scales (SCALE_BYTES). Canonical: W [E, N, K/2],
# scales [E, N, K/32]. TILED (the sm90 layout):
# W [E, N/64, K/128, 64, 64] and scales [E, N/64, K/128, 64, 4], zero-padded
# to whole 64 x 128 tiles, so a K step over 64 rows is one contiguous block
# (K steps of at most 128). Canonical row lengths are written (K/32) * (bytes
# per 32 K) so that triton knows the rows' alignment (K is a multiple of 32)
# and copies 16 bytes at a time.
VALUE_BYTES: tl.constexpr = tl.constexpr(layout.TILE_K // 2)
SCALE_BYTES: tl.constexpr = tl.constexpr(layout.TILE_K // spec.MX_BLOCK)


@triton.jit
def expert_bytes(N, K, ROW_BYTES: tl.constexpr, TILED: tl.constexpr):
    """Bytes of one expert's values or scales (N rows of K)."""
    if TILED:
        return tl.cdiv(N, TILE_N) * tl.cdiv(K, TILE_K) * (TILE_N * ROW_BYTES)
    else:
        return N * (K // 32 * (ROW_BYTES // 4))


@triton.jit
def row_offsets(w_row, K, ROW_BYTES: tl.constexpr, TILED: tl.constexpr):
    """Where each W row's values or scales start (TILED: in its first tile)."""
    if TILED:
        return ((w_row // TILE_N) * (tl.cdiv(K, TILE_K) * (TILE_N * ROW_BYTES))
                + (w_row % TILE_N) * ROW_BYTES)
    else:
        return w_row * (K // 32 * (ROW_BYTES // 4))


@triton.jit
def step_offset(k0, BK: tl.constexpr, ROW_BYTES: tl.constexpr, TILED: tl.constexpr):
    """Where a row's values or scales of the K step at k0 (a multiple of BK)
    start, from the row's start."""
    if TILED:
        tl.static_assert(TILE_K % BK == 0, "the sm90 layout's K steps are at most TILE_K")
        if BK == TILE_K:
            return k0 // TILE_K * (TILE_N * ROW_BYTES)
        else:
            return (k0 // TILE_K * (TILE_N * ROW_BYTES)
                    + (k0 // BK % (TILE_K // BK)) * (BK * ROW_BYTES // TILE_K))
    else:
        return k0 // (TILE_K // ROW_BYTES)

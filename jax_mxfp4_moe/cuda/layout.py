"""The sm90 weight layout: MXFP4 values and scales in contiguous tiles of 64
weight rows x 128 K elements.

An expert's W [N, K/2] (packed fp4) becomes [N/64, K/128, 64, 64] bytes and
its scales [N, K/32] become [N/64, K/128, 64, 4], both zero-padded to whole
tiles (N to a multiple of 64, K to one of 128). A kernel's K step over 64
rows then reads one contiguous 4 KB block of values and 256 bytes of scales,
where the canonical layout scatters the same bytes over 64 rows (64 bytes
every K/2): at decode, with ~1000 programs streaming at once, the scattered
reads held HBM to ~60% of what contiguous ones reach (gpt-oss-120b T=8 on
an H100: 203 -> 164 us, bench/NOTES.md). Rows and K steps past the logical
N and K read the padding (zeros) and meet zero weights or masked-off x.
The biases stay canonical. cuda/kernels/moe_gemm.py (TILED) computes the
same offsets.
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_mxfp4_moe.numerics import formats
from jax_mxfp4_moe.layer import layouts

NAME = "sm90"
TILE_N = 64    # weight rows per tile
TILE_K = 128   # K elements per tile: 64 bytes of fp4 values, 4 scale bytes per row


def tiles(n: int, k: int) -> tuple[int, int]:
    """Tiles along N and along K of an [n, k] weight matrix."""
    return -(-n // TILE_N), -(-k // TILE_K)


def _tile(a, n: int, k_bytes: int, row_bytes: int):
    """[E, n, k_bytes] -> [E, N/64, K/128, 64, row_bytes] (zero-padded)."""
    E = a.shape[0]
    nt = -(-n // TILE_N)
    kt = -(-k_bytes // row_bytes)
    a = jnp.pad(jnp.asarray(a), ((0, 0), (0, nt * TILE_N - n), (0, kt * row_bytes - k_bytes)))
    return a.reshape(E, nt, TILE_N, kt, row_bytes).transpose(0, 1, 3, 2, 4)


def _untile(a, n: int, k_bytes: int):
    """The inverse of _tile."""
    E, nt, kt, _, row_bytes = a.shape
    a = jnp.asarray(a).transpose(0, 1, 3, 2, 4).reshape(E, nt * TILE_N, kt * row_bytes)
    return a[:, :n, :k_bytes]


# (array, rows, K) of each tiled weight matrix, from (hidden H, intermediate I)
def _matrices(H: int, I: int):
    return (("w1", 2 * I, H), ("w2", H, I))


class Sm90Layout:
    name = NAME

    def shapes(self, *, num_experts, hidden, intermediate):
        from jax_mxfp4_moe.layer.weights import canonical_shapes
        out = canonical_shapes(num_experts, hidden, intermediate)
        for name, n, k in _matrices(hidden, intermediate):
            nt, kt = tiles(n, k)
            out[name] = ((num_experts, nt, kt, TILE_N, TILE_K // 2), "uint8")
            out[name + "_scale"] = ((num_experts, nt, kt, TILE_N, TILE_K // formats.MX_BLOCK),
                                    "uint8")
        return out

    def pack(self, canon, *, num_experts, hidden, intermediate):
        out = {k: v for k, v in canon.items() if v is not None}
        for name, n, k in _matrices(hidden, intermediate):
            out[name] = _tile(out[name], n, k // 2, TILE_K // 2)
            out[name + "_scale"] = _tile(out[name + "_scale"], n, k // formats.MX_BLOCK,
                                         TILE_K // formats.MX_BLOCK)
        return out

    def unpack(self, arrays, *, num_experts, hidden, intermediate):
        out = {k: v for k, v in arrays.items() if v is not None}
        for name, n, k in _matrices(hidden, intermediate):
            if name not in out:  # one matrix alone unpacks too
                continue
            out[name] = _untile(out[name], n, k // 2)
            out[name + "_scale"] = _untile(out[name + "_scale"], n, k // formats.MX_BLOCK)
        return out


LAYOUT = Sm90Layout()
layouts.register(LAYOUT)

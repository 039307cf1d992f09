"""The gfx950 weight layout: MXFP4 tiles pre-shuffled for the scaled MFMA.

Each weight matrix [N, K] (W1: N = 2I rows, K = H; W2: N = H, K = I) is
zero-padded to N, K multiples of 128 (``geometry.padded_dims``; W1's 2I
rows grow at the end, to 2 * Ip) and stored as tiles of 16 rows x 128 K.
Within a tile, lane slot ``l`` holds the 16 bytes lane ``l`` feeds the MFMA
(``geometry.tile_source``), so a wave's B load is one contiguous 1 KiB.
Scales are packed per 16-row tile and chunk of four 128-K steps: lane slot
``l`` holds its four scale bytes (one per step) as one dword
(``geometry.tile_scale_offset``; steps past K are zero).  Biases are
zero-padded the same way.  ``unpack`` inverts ``pack`` exactly (padding
dropped).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_mxfp4_moe.layer import layouts
from jax_mxfp4_moe.rocm import geometry as ix

NAME = "gfx950"
_G = ix.WAVE // ix.MFMA_N  # 4 K-block groups of lanes


def shuffle(w, s):
    """w [E, N, K/2], s [E, N, K/32] -> tiles [E, N/16, K/128, 64, 16], [E, N/16, Q, 64, 4]
    with Q = ceil(K/512) chunks of four steps (byte j of a lane's dword = step 4q + j)."""
    E, N, Kh = w.shape
    K = 2 * Kh
    nb, kb = N // ix.MFMA_N, K // ix.MFMA_K
    q = ix.scale_chunks(kb)
    # row = nb*16 + r, byte = kb*64 + g*16 + j, lane = g*16 + r
    wt = w.reshape(E, nb, ix.MFMA_N, kb, _G, ix.LANE_BYTES).transpose(0, 1, 3, 4, 2, 5)
    # scale column = kb*4 + g = (4q + j)*4 + g -> [E, nb, q, lane = g*16 + r, j]
    s = jnp.pad(s, ((0, 0), (0, 0), (0, (q * ix.SCALE_STEPS - kb) * _G)))
    st = s.reshape(E, nb, ix.MFMA_N, q, ix.SCALE_STEPS, _G).transpose(0, 1, 3, 5, 2, 4)
    return wt.reshape(E, nb, kb, ix.WAVE, ix.LANE_BYTES), st.reshape(E, nb, q, ix.WAVE, ix.SCALE_STEPS)


def unshuffle(wt, st):
    E, nb, kb = wt.shape[:3]
    q = st.shape[2]
    w = wt.reshape(E, nb, kb, _G, ix.MFMA_N, ix.LANE_BYTES).transpose(0, 1, 4, 2, 3, 5)
    s = st.reshape(E, nb, q, _G, ix.MFMA_N, ix.SCALE_STEPS).transpose(0, 1, 4, 2, 5, 3)
    s = s.reshape(E, nb * ix.MFMA_N, q * ix.SCALE_STEPS * _G)[:, :, : kb * _G]
    return w.reshape(E, nb * ix.MFMA_N, kb * ix.MFMA_K // 2), s


def _pad(a, rows, cols):
    a = jnp.asarray(a)
    return jnp.pad(a, ((0, 0), (0, rows - a.shape[1]), (0, cols - a.shape[2])))


@functools.partial(jax.jit, static_argnames=("num_experts", "hidden", "intermediate"))
def _pack(canon, *, num_experts, hidden, intermediate):
    Hp, Ip = ix.padded_dims(hidden, intermediate)
    w1, w1s = shuffle(_pad(canon["w1"], 2 * Ip, Hp // 2), _pad(canon["w1_scale"], 2 * Ip, Hp // ix.MX_BLOCK))
    w2, w2s = shuffle(_pad(canon["w2"], Hp, Ip // 2), _pad(canon["w2_scale"], Hp, Ip // ix.MX_BLOCK))
    out = {"w1": w1, "w1_scale": w1s, "w2": w2, "w2_scale": w2s}
    if "b1" in canon:
        b1 = jnp.asarray(canon["b1"], jnp.float32)
        out["b1"] = jnp.pad(b1, ((0, 0), (0, 2 * Ip - b1.shape[1])))
    if "b2" in canon:
        b2 = jnp.asarray(canon["b2"], jnp.float32)
        out["b2"] = jnp.pad(b2, ((0, 0), (0, Hp - b2.shape[1])))
    return out


@functools.partial(jax.jit, static_argnames=("num_experts", "hidden", "intermediate"))
def _unpack(arrays, *, num_experts, hidden, intermediate):
    H, I = hidden, intermediate
    out = {}
    for name, n, k in (("w1", 2 * I, H), ("w2", H, I)):  # one matrix alone unpacks too
        if name in arrays:
            w, s = unshuffle(jnp.asarray(arrays[name]), jnp.asarray(arrays[name + "_scale"]))
            out[name], out[name + "_scale"] = w[:, :n, : k // 2], s[:, :n, : k // ix.MX_BLOCK]
    if "b1" in arrays:
        out["b1"] = jnp.asarray(arrays["b1"])[:, : 2 * I]
    if "b2" in arrays:
        out["b2"] = jnp.asarray(arrays["b2"])[:, :H]
    return out


class Gfx950Layout:
    """Registered layout object; pack/unpack are jitted (one compile per shape)."""

    name = NAME

    def pack(self, canon, *, num_experts, hidden, intermediate):
        canon = {k: v for k, v in canon.items() if v is not None}
        return _pack(canon, num_experts=num_experts, hidden=hidden, intermediate=intermediate)

    def unpack(self, arrays, *, num_experts, hidden, intermediate):
        arrays = {k: v for k, v in arrays.items() if v is not None}
        return _unpack(arrays, num_experts=num_experts, hidden=hidden, intermediate=intermediate)


LAYOUT = Gfx950Layout()
layouts.register(LAYOUT)


# ------------------------------------------------- packed activation scales
# The quant kernel writes, and gemm1 reads, the activation scales packed as
# the MFMA lanes load them (``geometry.act_scale_offset``); gemm1 writes
# gemm2's the same way.  These convert from / to [rows, K/32] (NumPy or jnp).
def act_scale_positions(k):
    """Byte offsets (within a packed row) of MX blocks 0 .. k/32 - 1."""
    import numpy as np

    return np.array([ix.act_scale_offset(0, b, k) for b in range(k // ix.MX_BLOCK)], np.int64)


def unpack_act_scales(packed, k):
    """[rows, act_scale_row_bytes(k)] -> [rows, k/32]."""
    return packed[..., act_scale_positions(k)]


def pack_act_scales(scales, k):
    """[rows, k/32] -> [rows, act_scale_row_bytes(k)] (unused bytes 0)."""
    import numpy as np

    xp = jnp if isinstance(scales, jax.Array) else np
    out = xp.zeros(scales.shape[:-1] + (ix.act_scale_row_bytes(k),), xp.uint8)
    if xp is np:
        out[..., act_scale_positions(k)] = scales
        return out
    return out.at[..., act_scale_positions(k)].set(scales)

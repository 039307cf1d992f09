"""The gfx950 weight layout: MXFP4 tiles pre-shuffled for the scaled MFMA.

Each weight matrix [N, K] (W1: N = 2I rows, K = H; W2: N = H, K = I) is
zero-padded to N, K multiples of 128 (``rocm_index.padded_dims``; W1's 2I
rows grow at the end, to 2 * Ip) and stored as tiles of 16 rows x 128 K.
Within a tile, lane slot ``l`` holds the 16 bytes and the one scale byte
lane ``l`` feeds the MFMA (``rocm_index.tile_source``), so a wave's B load
is one contiguous 1 KiB (64 B of scales).  Biases are zero-padded the same
way.  ``unpack`` inverts ``pack`` exactly (padding dropped).
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
    """w [E, N, K/2], s [E, N, K/32] -> tiles [E, N/16, K/128, 64, 16], [E, N/16, K/128, 64]."""
    E, N, Kh = w.shape
    K = 2 * Kh
    nb, kb = N // ix.MFMA_N, K // ix.MFMA_K
    # row = nb*16 + r, byte = kb*64 + g*16 + j, lane = g*16 + r
    wt = w.reshape(E, nb, ix.MFMA_N, kb, _G, ix.LANE_BYTES).transpose(0, 1, 3, 4, 2, 5)
    st = s.reshape(E, nb, ix.MFMA_N, kb, _G).transpose(0, 1, 3, 4, 2)
    return wt.reshape(E, nb, kb, ix.WAVE, ix.LANE_BYTES), st.reshape(E, nb, kb, ix.WAVE)


def unshuffle(wt, st):
    E, nb, kb = wt.shape[:3]
    w = wt.reshape(E, nb, kb, _G, ix.MFMA_N, ix.LANE_BYTES).transpose(0, 1, 4, 2, 3, 5)
    s = st.reshape(E, nb, kb, _G, ix.MFMA_N).transpose(0, 1, 4, 2, 3)
    return (w.reshape(E, nb * ix.MFMA_N, kb * ix.MFMA_K // 2),
            s.reshape(E, nb * ix.MFMA_N, kb * ix.MFMA_K // ix.MX_BLOCK))


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

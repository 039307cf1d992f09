"""The whole MoE pipeline in jnp: the CPU path and the fallback on any platform.

sort -> quantise x -> gemm1 (gather, act, requantise) -> gemm2 (weighted,
written per (token, slot)) -> sum over slots in slot order (deterministic).
The grouped matmuls are ``jax.lax.ragged_dot`` over the sorted rows with the
MXFP4 weights dequantised to bf16 (exact: fp4 values times powers of two).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_mxfp4_moe.numerics import formats, sorting

# Rows per sorted block; any of sorting.BLOCK_SIZES gives the same result here.
BLOCK_M = 32
_MX_FORMAT = {"a4w4": "mxfp4", "a8w4": "mxfp8"}


def quantize_dequantize(v: jax.Array, quant: str) -> jax.Array:
    """Round activations through the mode's format; float32 result."""
    v = v.astype(jnp.float32)
    if quant == "a16w4":
        return v.astype(jnp.bfloat16).astype(jnp.float32)
    fmt = _MX_FORMAT[quant]
    q, s = formats.quantize(v, fmt)
    return formats.dequantize(q, s, fmt)


def activation_fn(h: jax.Array, activation: str, gate_up: str, alpha: float, limit: float) -> jax.Array:
    """[..., 2I] -> [..., I]: silu(g) * u, or gpt-oss's clamped swiglu."""
    I = h.shape[-1] // 2
    if gate_up == "separated":
        g, u = h[..., :I], h[..., I:]
    else:
        g, u = h[..., 0::2], h[..., 1::2]
    if activation == "silu":
        return jax.nn.silu(g) * u
    g = jnp.minimum(g, limit)
    u = jnp.clip(u, -limit, limit)
    return g * jax.nn.sigmoid(alpha * g) * (u + 1.0)


def _grouped_matmul(lhs, w_packed, w_scale, group_sizes):
    """lhs [P, K] @ dequant(w)[e]^T for each row's group -> [P, N] float32.

    Both operands are exact in bf16: MXFP4 weights and MXFP8/MXFP4 activations
    are few-bit mantissas times powers of two, and a16w4 rounds activations
    to bf16 first.  So the products are computed in bf16 with float32
    accumulation, as the GPU kernels do, at half the memory of float32 weights
    (this path also serves as the fallback on GPUs)."""
    w = formats.dequantize_mxfp4(w_packed, w_scale, jnp.bfloat16)  # [E, N, K]
    return jax.lax.ragged_dot(lhs.astype(jnp.bfloat16), jnp.swapaxes(w, 1, 2), group_sizes,
                              preferred_element_type=jnp.float32)


def moe(x, weights, topk_weights, topk_ids, *, activation, quant, deterministic=True,
        expert_mask=None, swiglu_alpha=1.702, swiglu_limit=7.0):
    del deterministic  # this path always reduces in slot order
    w = weights.canonical()
    T, H = x.shape
    k = topk_ids.shape[1]
    E = w.num_experts
    n_sort = E if expert_mask is None else expert_mask.shape[0]
    s = sorting.moe_sort(topk_ids, topk_weights, num_experts=n_sort, block_m=BLOCK_M,
                         expert_mask=expert_mask)
    # Local expert ids index the E experts these weights hold.
    block_expert = jnp.where(s.sorted_expert_ids < E, s.sorted_expert_ids, -1)
    sizes = sorting.group_sizes(block_expert, E, BLOCK_M)
    row_expert = jnp.repeat(block_expert, BLOCK_M)[: s.sorted_token_ids.shape[0]]
    token, slot = sorting.unpack_entry(s.sorted_token_ids)

    xq = quantize_dequantize(x, quant)
    a = jnp.take(xq, token, axis=0, mode="fill", fill_value=0)  # padding token T -> 0
    h = _grouped_matmul(a, w.w1, w.w1_scale, sizes)
    if w.b1 is not None:
        h = h + jnp.where(row_expert[:, None] >= 0, w.b1[jnp.maximum(row_expert, 0)], 0)
    inter = quantize_dequantize(activation_fn(h, activation, w.gate_up, swiglu_alpha, swiglu_limit), quant)
    o = _grouped_matmul(inter, w.w2, w.w2_scale, sizes)
    if w.b2 is not None:
        o = o + jnp.where(row_expert[:, None] >= 0, w.b2[jnp.maximum(row_expert, 0)], 0)
    o = o * s.sorted_weights[:, None]

    # Each (token, slot) appears once: write it to its own row, then sum slots.
    valid = (token < T) & (row_expert >= 0)
    dest = jnp.where(valid, token * k + slot, T * k)
    per_slot = jnp.zeros((T * k, H), jnp.float32).at[dest].set(o, mode="drop")
    return per_slot.reshape(T, k, H).sum(axis=1).astype(x.dtype)

"""The whole MoE layer in jnp: the CPU path, and the fallback on any platform.

quantise x -> gemm1 (+ b1, act, requantise) -> gemm2 (+ b2, routing weight)
-> one output per (token, slot), summed over slots in slot order (so the
result is deterministic).  Operands are exact in bf16 (MXFP4 weights and
MXFP8/MXFP4 activations are few-bit mantissas times powers of two; a16w4
rounds activations to bf16 first), so the products run in bf16 with float32
accumulation, as the GPU kernels do.

A grouped matmul (each routed row times its expert's weights) takes one of
three forms, chosen by ``strategy`` from the shapes:

- "blocks": the rows sorted by expert into blocks of BM rows (the sort
  contract with block size BM; BM = 1 is a per-(token, slot) gather), each
  block's weights gathered and dequantised in one fused gather, and one
  batched matmul over the blocks;
- "dense": every token through every expert (experts it did not pick get
  routing weight 0);
- "ragged": the sorted rows through ``jax.lax.ragged_dot`` over all experts'
  dequantised weights: the form accelerators run well.  XLA:CPU runs
  ragged_dot as a dense product per group, so CPUs take the other two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_mxfp4_moe.numerics import formats, sorting
from jax_mxfp4_moe.spec import split_gate_up

STRATEGIES = ("blocks", "dense", "ragged")

# CPU cost model of the two CPU forms, in units of one row through one weight
# matrix (both gemms scale alike).  "blocks" with BM rows per block costs
# blocks * (BLOCK_WEIGHT_COST + BM); "dense" costs E * (DENSE_WEIGHT_COST +
# T) * DENSE_ROW_COST.  Fitted to process CPU time of jit calls at E=32 k=4
# H=I=512 for T = 1 and 64 and BM = 1..64 on the 2-core CI machine
# (bench/NOTES.md): the weight terms are the dequantisation of one expert's
# matrix, fused into the gather for "blocks" and of every expert for "dense".
BLOCK_WEIGHT_COST = 53.0
DENSE_WEIGHT_COST = 82.5
DENSE_ROW_COST = 1.29
CPU_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def choose_strategy(tokens: int, top_k: int, num_experts: int, platform: str = "cpu"):
    """(strategy, block rows) for a call: the cheaper CPU form by the cost
    model above, "ragged" elsewhere."""
    if platform != "cpu":
        return "ragged", 1
    n = tokens * top_k
    bm = min(CPU_BLOCK_SIZES, key=lambda b: (sorting.max_blocks(n, num_experts, b)
                                             * (BLOCK_WEIGHT_COST + b), b))
    blocks = sorting.max_blocks(n, num_experts, bm) * (BLOCK_WEIGHT_COST + bm)
    dense = num_experts * (DENSE_WEIGHT_COST + tokens) * DENSE_ROW_COST
    return ("dense", 0) if dense < blocks else ("blocks", bm)


def quantize_dequantize(v: jax.Array, quant) -> jax.Array:
    """Round activations through the mode's format (``spec.QuantMode``); float32."""
    v = v.astype(jnp.float32)
    if quant.act_format is None:
        # (XLA:GPU may drop this f32 -> bf16 -> f32 pair; every consumer
        # rounds its operand to bf16 again, so the result is the same.)
        return v.astype(jnp.bfloat16).astype(jnp.float32)
    q, s = formats.quantize(v, quant.act_format)
    # The barrier keeps the rounding: XLA:GPU folds the E4M3 codes' bitcast
    # pair and then, allowing excess precision (SimplifyFPConversions), the
    # f32 -> f8e4m3fn -> f32 converts, so mxfp8 would not round at all there.
    q, s = jax.lax.optimization_barrier((q, s))
    return formats.dequantize(q, s, quant.act_format)


def activation_fn(h: jax.Array, activation, gate_up: str) -> jax.Array:
    """[..., 2I] pre-activations -> [..., I] (``spec.Activation``)."""
    g, u = split_gate_up(h, gate_up)
    return activation(g, u)


def _dequantized(w, scale):
    return formats.dequantize_mxfp4(w, scale, jnp.bfloat16)


def _dot(a, w, spec_):
    return jnp.einsum(spec_, a.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)


def _bias(b, expert):
    """Each row's expert's bias (0 where the expert is -1: no expert)."""
    return jnp.where((expert >= 0)[..., None], b[jnp.maximum(expert, 0)], 0.0)


def _mlp(a, experts, w, spec, w1, w2):
    """gemm1 -> act -> requantise -> gemm2 for rows ``a`` whose experts are
    ``experts``, through ``w1(a)`` and ``w2(inter)``."""
    h = w1(a)
    if w.b1 is not None:
        h = h + _bias(w.b1, experts)
    inter = quantize_dequantize(activation_fn(h, spec.activation, w.gate_up), spec.mode)
    o = w2(inter)
    if w.b2 is not None:
        o = o + _bias(w.b2, experts)
    return o


def _per_slot_sorted(o, entries, rows_expert, sorted_weights, T, k):
    """[T, k, H] outputs from sorted rows: each (token, slot) appears once."""
    token, slot = sorting.unpack_entry(entries)
    valid = (token < T) & (rows_expert >= 0)
    dest = jnp.where(valid, token * k + slot, T * k)
    o = o * sorted_weights[:, None]
    return jnp.zeros((T * k, o.shape[-1]), jnp.float32).at[dest].set(o, mode="drop").reshape(T, k, -1)


def _blocks(xq, w, topk_weights, topk_ids, mask, spec, block_m):
    T, k = topk_ids.shape
    E = w.num_experts
    n_sort = E if mask is None else mask.shape[0]
    s = sorting.moe_sort(topk_ids, topk_weights, num_experts=n_sort, block_m=block_m,
                         expert_mask=mask)
    nb = sorting.max_blocks(T * k, E, block_m)  # blocks past it are never used
    block_expert = s.sorted_expert_ids[:nb]
    block_expert = jnp.where(block_expert < E, block_expert, -1)
    entries = s.sorted_token_ids[: nb * block_m]
    token, _ = sorting.unpack_entry(entries)
    a = jnp.take(xq, token, axis=0, mode="fill", fill_value=0).reshape(nb, block_m, -1)
    e = jnp.maximum(block_expert, 0)
    # Indexing the dequantised arrays lets XLA dequantise only the gathered experts.
    o = _mlp(a, block_expert[:, None], w, spec,
             lambda a: _dot(a, _dequantized(w.w1, w.w1_scale)[e], "bmh,bnh->bmn"),
             lambda a: _dot(a, _dequantized(w.w2, w.w2_scale)[e], "bmi,bhi->bmh"))
    return _per_slot_sorted(o.reshape(nb * block_m, -1), entries, jnp.repeat(block_expert, block_m),
                            s.sorted_weights[: nb * block_m], T, k)


def _dense(xq, w, topk_weights, topk_ids, mask, spec):
    T, k = topk_ids.shape
    E = w.num_experts
    n_sort = E if mask is None else mask.shape[0]
    local = sorting.local_expert_ids(topk_ids, n_sort, mask)  # n_sort: not here
    local = jnp.where(local < E, local, -1)
    experts = jnp.arange(E, dtype=jnp.int32)[None, :]
    o = _mlp(jnp.broadcast_to(xq[:, None, :], (T, E, xq.shape[-1])), experts, w, spec,
             lambda a: _dot(a, _dequantized(w.w1, w.w1_scale), "teh,enh->ten"),
             lambda a: _dot(a, _dequantized(w.w2, w.w2_scale), "tei,ehi->teh"))  # [T, E, H]
    picked = jnp.take_along_axis(o, jnp.maximum(local, 0)[:, :, None], axis=1)  # [T, k, H]
    weight = jnp.where(local >= 0, topk_weights.astype(jnp.float32), 0.0)
    return picked * weight[:, :, None]


def _ragged(xq, w, topk_weights, topk_ids, mask, spec):
    T, k = topk_ids.shape
    E = w.num_experts
    n_sort = E if mask is None else mask.shape[0]
    s = sorting.moe_sort(topk_ids, topk_weights, num_experts=n_sort, block_m=1, expert_mask=mask)
    row_expert = jnp.where(s.sorted_expert_ids < E, s.sorted_expert_ids, -1)
    sizes = sorting.group_sizes(row_expert, E, 1)
    token, _ = sorting.unpack_entry(s.sorted_token_ids)
    a = jnp.take(xq, token, axis=0, mode="fill", fill_value=0)

    def grouped(w_packed, w_scale):
        wt = jnp.swapaxes(_dequantized(w_packed, w_scale), 1, 2)
        return lambda a: jax.lax.ragged_dot(a.astype(jnp.bfloat16), wt, sizes,
                                            preferred_element_type=jnp.float32)

    o = _mlp(a, row_expert, w, spec, grouped(w.w1, w.w1_scale), grouped(w.w2, w.w2_scale))
    return _per_slot_sorted(o, s.sorted_token_ids, row_expert, s.sorted_weights, T, k)


def moe(x, weights, topk_weights, topk_ids, expert_mask=None, *, spec, platform: str = "cpu",
        strategy: str | None = None, block_m: int | None = None):
    """y [T, H] in x's dtype for canonical or any registered layout of
    ``weights`` (converted to canonical, traceably).  ``strategy`` / ``block_m``
    override ``choose_strategy`` (tests compare the forms)."""
    w = weights.canonical()
    T, _ = x.shape
    if strategy is None:
        strategy, block_m = choose_strategy(T, topk_ids.shape[1], w.num_experts, platform)
    xq = quantize_dequantize(x, spec.mode)
    if strategy == "blocks":
        per_slot = _blocks(xq, w, topk_weights, topk_ids, expert_mask, spec, block_m or 1)
    elif strategy == "dense":
        per_slot = _dense(xq, w, topk_weights, topk_ids, expert_mask, spec)
    elif strategy == "ragged":
        per_slot = _ragged(xq, w, topk_weights, topk_ids, expert_mask, spec)
    else:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    # Slots summed in order: the same result whatever the form.
    y = per_slot[:, 0]
    for j in range(1, per_slot.shape[1]):
        y = y + per_slot[:, j]
    return y.astype(x.dtype)

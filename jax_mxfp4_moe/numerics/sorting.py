"""The sort contract (docs/DESIGN.md §3) in jnp: route (token, slot) pairs to expert blocks.

Output for block size BM, T tokens, top-k k and E experts
(``P = sorted_size(T, k, E, BM)``):

- ``sorted_token_ids[P]`` int32: entries grouped by expert in expert order,
  within an expert by (token, slot); each expert's group padded to a multiple
  of BM.  An entry packs ``(slot << 24) | token`` (``spec.pack_entry``);
  padding and unused entries hold ``(k << 24) | T``.
- ``sorted_weights[P]`` f32: ``topk_weights[token, slot]``, 0 for padding.
- ``sorted_expert_ids[ceil(P / BM)]`` int32: the (local) expert of each block,
  -1 past the used blocks.
- ``num_valid[2]`` int32: used entries (a multiple of BM), and T.

Ids outside ``[0, E)`` are dropped.  With ``expert_mask`` ([E] bool/int),
masked-out experts are dropped too and the kept ones are renumbered to local
ids ``0 .. sum(mask) - 1`` in expert order (expert parallelism).

This statement follows FlyDSL's ``moe_sorting_torch_native`` and aiter's
``moe_sorting_native``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_mxfp4_moe.spec import BLOCK_SIZES, MAX_TOKENS, pack_entry, padding_entry, unpack_entry

# The sort's stages on both kernel backends: one launch up to a backend's
# SORT_ONESHOT_MAX_ENTRIES routed entries, else count (per-chunk histograms) ->
# offsets (expert offsets, block expert ids, per-chunk bases) -> scatter.
SORT_STAGES = ("oneshot", "count", "offsets", "scatter")

__all__ = ["SORT_STAGES", "SortResult", "sorted_size", "num_blocks", "max_blocks", "moe_sort", "group_sizes",
           "local_expert_ids", "BLOCK_SIZES", "MAX_TOKENS", "pack_entry", "padding_entry",
           "unpack_entry"]


class SortResult(NamedTuple):
    sorted_token_ids: jax.Array
    sorted_weights: jax.Array
    sorted_expert_ids: jax.Array
    num_valid: jax.Array


def sorted_size(num_tokens: int, top_k: int, num_experts: int, block_m: int) -> int:
    """P: the static length of ``sorted_token_ids`` (an upper bound on use)."""
    return num_tokens * top_k + num_experts * block_m - top_k


def num_blocks(num_tokens: int, top_k: int, num_experts: int, block_m: int) -> int:
    """Length of ``sorted_expert_ids``: the BM-row blocks of P."""
    return -(-sorted_size(num_tokens, top_k, num_experts, block_m) // block_m)


def max_blocks(entries: int, num_experts: int, block_m: int) -> int:
    """The most BM-row blocks ``entries`` routed entries over E experts can
    fill (every block past it is unused): with u experts in use,
    sum(ceil(c_e / BM)) <= u + (n - u) // BM, largest at u = min(E, n)."""
    used = min(num_experts, entries)
    return used + (entries - used) // block_m


def local_expert_ids(topk_ids: jax.Array, num_experts: int, expert_mask=None) -> jax.Array:
    """Map global ids to local ids; ids not handled here become ``num_experts``."""
    ids = topk_ids.astype(jnp.int32)
    valid = (ids >= 0) & (ids < num_experts)
    safe = jnp.where(valid, ids, 0)
    if expert_mask is not None:
        keep = jnp.asarray(expert_mask).astype(bool)
        valid = valid & keep[safe]
        safe = jnp.cumsum(keep.astype(jnp.int32))[safe] - 1
    return jnp.where(valid, safe, num_experts)


def moe_sort(topk_ids: jax.Array, topk_weights: jax.Array, *, num_experts: int,
             block_m: int, expert_mask=None) -> SortResult:
    if not isinstance(block_m, int) or block_m < 1:
        raise ValueError(f"block_m: expected a positive int (the kernels use {BLOCK_SIZES}), "
                         f"got {block_m!r}")
    if topk_ids.ndim != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_ids/topk_weights: expected equal [T, k] shapes, got "
            f"{topk_ids.shape} and {topk_weights.shape}")
    if expert_mask is not None and jnp.shape(expert_mask) != (num_experts,):
        raise ValueError(f"expert_mask: expected shape ({num_experts},), got {jnp.shape(expert_mask)}")
    T, k = topk_ids.shape
    if T >= MAX_TOKENS:
        raise ValueError(f"topk_ids: at most {MAX_TOKENS - 1} tokens, got {T}")
    E, BM = num_experts, block_m
    P = sorted_size(T, k, E, BM)
    n_blocks = num_blocks(T, k, E, BM)

    key = local_expert_ids(topk_ids, E, expert_mask).reshape(-1)  # [T*k], E = dropped
    counts = jnp.zeros(E + 1, jnp.int32).at[key].add(1)[:E]
    padded = (counts + BM - 1) // BM * BM
    padded_end = jnp.cumsum(padded)
    padded_start = padded_end - padded
    start = jnp.cumsum(counts) - counts

    # A stable sort by expert keeps (token, slot) order inside each expert.
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    key_sorted = key[order]
    valid = key_sorted < E
    e = jnp.where(valid, key_sorted, 0)
    rank = jnp.arange(T * k, dtype=jnp.int32) - start[e]
    dest = jnp.where(valid, padded_start[e] + rank, P)  # P: dropped by mode="drop"

    entries = pack_entry(order // k, order % k)
    sorted_ids = jnp.full((P,), padding_entry(T, k), jnp.int32).at[dest].set(entries, mode="drop")
    sorted_w = jnp.zeros((P,), jnp.float32).at[dest].set(
        topk_weights.reshape(-1).astype(jnp.float32)[order], mode="drop")

    used = padded_end[-1] if E else jnp.int32(0)
    block_start = jnp.arange(n_blocks, dtype=jnp.int32) * BM
    block_expert = jnp.searchsorted(padded_end, block_start, side="right").astype(jnp.int32)
    sorted_expert_ids = jnp.where(block_start < used, block_expert, -1)
    num_valid = jnp.stack([used, jnp.int32(T)]).astype(jnp.int32)
    return SortResult(sorted_ids, sorted_w, sorted_expert_ids, num_valid)


def group_sizes(sorted_expert_ids: jax.Array, num_experts: int, block_m: int) -> jax.Array:
    """Rows per expert (padded) in sorted order, from the block expert ids."""
    ids = jnp.where(sorted_expert_ids >= 0, sorted_expert_ids, num_experts)
    return (jnp.zeros(num_experts + 1, jnp.int32).at[ids].add(block_m))[:num_experts]

"""Routing helpers: router logits -> (topk_weights f32 [T, k], topk_ids int32 [T, k]).

Not part of the layer itself; they produce its inputs the way the model
families do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(logits, k, name="logits"):
    if logits.ndim != 2:
        raise ValueError(f"{name}: expected [T, E], got shape {logits.shape}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k: expected 1 <= k <= E = {logits.shape[1]}, got {k}")


def softmax_topk(logits: jax.Array, k: int, *, renormalize: bool = False):
    """Softmax over all experts, then the top k (Mixtral, Qwen-MoE).

    ``renormalize`` rescales the k kept probabilities to sum to one."""
    _check(logits, k)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


def topk_softmax(logits: jax.Array, k: int):
    """Top k logits, then a softmax over those k (gpt-oss)."""
    _check(logits, k)
    vals, ids = jax.lax.top_k(logits.astype(jnp.float32), k)
    return jax.nn.softmax(vals, axis=-1), ids.astype(jnp.int32)


def sigmoid_group_topk(logits: jax.Array, k: int, *, bias: jax.Array, num_groups: int,
                       topk_groups: int, routed_scaling_factor: float = 1.0,
                       renormalize: bool = True):
    """DeepSeek-V3 / Kimi-K2 routing.

    Scores are ``sigmoid(logits)``; experts are *chosen* by ``scores + bias``
    (the load-balancing bias), restricted to the ``topk_groups`` groups whose
    two best biased scores sum highest; the weights are the unbiased scores of
    the chosen experts, renormalised to sum to one and multiplied by
    ``routed_scaling_factor``."""
    _check(logits, k)
    T, E = logits.shape
    if bias.shape != (E,):
        raise ValueError(f"bias: expected shape ({E},), got {bias.shape}")
    if num_groups < 1 or E % num_groups:
        raise ValueError(f"num_groups: must divide E = {E}, got {num_groups}")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"topk_groups: expected 1..{num_groups}, got {topk_groups}")
    per_group = E // num_groups
    if per_group < 2:
        raise ValueError(f"num_groups: each group needs >= 2 experts, got {per_group}")
    if k > topk_groups * per_group:
        raise ValueError(f"k: at most topk_groups * experts per group = {topk_groups * per_group}, got {k}")
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice = scores + bias.astype(jnp.float32)[None, :]
    grouped = choice.reshape(T, num_groups, per_group)
    group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [T, G]
    _, top_groups = jax.lax.top_k(group_score, topk_groups)
    group_keep = jnp.zeros((T, num_groups), bool).at[jnp.arange(T)[:, None], top_groups].set(True)
    expert_keep = jnp.repeat(group_keep, per_group, axis=1)
    masked = jnp.where(expert_keep, choice, -jnp.inf)
    _, ids = jax.lax.top_k(masked, k)
    weights = jnp.take_along_axis(scores, ids, axis=1)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights * routed_scaling_factor, ids.astype(jnp.int32)

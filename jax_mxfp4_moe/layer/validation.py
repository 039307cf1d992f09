"""Argument checks for ``moe``: misuse fails at trace time, naming the argument."""

from __future__ import annotations

import jax.numpy as jnp

from jax_mxfp4_moe import spec as layer_spec
from jax_mxfp4_moe.layer.primitive import BACKENDS
from jax_mxfp4_moe.layer.weights import MoEWeights

X_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def check_moe_args(x, weights, topk_weights, topk_ids, *, activation, quant, expert_mask, backend):
    if not isinstance(weights, MoEWeights):
        raise TypeError(f"weights: expected MoEWeights, got {type(weights).__name__}")
    weights.validate()
    layer_spec.as_activation(activation)  # names the argument when unknown
    layer_spec.quant_mode(quant)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) < 2:
        raise ValueError(f"x: expected [T, H] (or [..., T, H]), got shape {shape}")
    if not any(jnp.dtype(x.dtype) == jnp.dtype(d) for d in X_DTYPES):
        raise TypeError(f"x: expected dtype bfloat16, float16 or float32, got {x.dtype}")
    *lead, H = shape
    if H != weights.hidden:
        raise ValueError(f"x: hidden size {H} does not match weights.hidden = {weights.hidden}")
    T = 1
    for d in lead:
        T *= d
    if T >= layer_spec.MAX_TOKENS:
        raise ValueError(f"x: at most {layer_spec.MAX_TOKENS - 1} tokens (the sort entry's "
                         f"{layer_spec.TOKEN_BITS}-bit token field), got {T}")
    ids_shape = getattr(topk_ids, "shape", None)
    if ids_shape is None or tuple(ids_shape[:-1]) != tuple(lead) or len(ids_shape) != len(shape):
        raise ValueError(f"topk_ids: expected [{', '.join(map(str, lead))}, k] like x's leading "
                         f"axes, got shape {ids_shape}")
    if not jnp.issubdtype(topk_ids.dtype, jnp.integer):
        raise TypeError(f"topk_ids: expected an integer dtype, got {topk_ids.dtype}")
    k = ids_shape[-1]
    if not 1 <= k <= layer_spec.MAX_TOP_K:
        raise ValueError(f"topk_ids: k must be in 1..{layer_spec.MAX_TOP_K}, got {k}")
    if getattr(topk_weights, "shape", None) != tuple(ids_shape):
        raise ValueError(f"topk_weights: expected shape {tuple(ids_shape)} like topk_ids, "
                         f"got {getattr(topk_weights, 'shape', None)}")
    if not jnp.issubdtype(topk_weights.dtype, jnp.floating):
        raise TypeError(f"topk_weights: expected a float dtype, got {topk_weights.dtype}")
    if expert_mask is not None:
        mask_shape = jnp.shape(expert_mask)
        if len(mask_shape) != 1 or mask_shape[0] < weights.num_experts:
            raise ValueError(f"expert_mask: expected [E_global] with E_global >= "
                             f"weights.num_experts = {weights.num_experts}, got shape {mask_shape}")
        dt = jnp.asarray(expert_mask).dtype
        if not (jnp.issubdtype(dt, jnp.integer) or dt == jnp.bool_):
            raise TypeError(f"expert_mask: expected a bool or integer dtype, got {dt}")

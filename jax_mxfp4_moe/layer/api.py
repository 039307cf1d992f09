"""``moe``: the public entry point; validates, then binds the primitive."""

from __future__ import annotations

import jax.numpy as jnp

from jax_mxfp4_moe import spec as layer_spec
from jax_mxfp4_moe.layer import primitive
from jax_mxfp4_moe.layer.validation import check_moe_args


def moe(x, weights, topk_weights, topk_ids, *, activation="silu", quant: str = layer_spec.DEFAULT_QUANT,
        deterministic: bool = False, expert_mask=None, backend: str = "auto"):
    """One MoE FFN layer with MXFP4 expert weights (docs/DESIGN.md §1).

    x [..., H] (bf16/f16/f32; any leading axes are tokens); weights:
    MoEWeights; topk_weights [..., k] float and topk_ids [..., k] int with
    x's leading axes (ids outside [0, E) contribute nothing).
    activation: "silu" | "swiglu_oai" (published parameters) or a
    ``spec.Activation`` with its own; quant: "a16w4" | "a8w4" | "a4w4".
    deterministic: reduce the k contributions of a token in slot order
    (kernel backends otherwise add them atomically).
    expert_mask: optional [E_global] bool/int; masked-out experts are skipped
    and the kept ones renumbered 0..E-1 for the E experts ``weights`` holds.
    backend: "auto" (the kernels of the platform the computation is placed
    on, else jnp), "jnp", "cuda" or "rocm" (forced; an error where it cannot
    run).  Returns y with x's shape and dtype.  A JAX primitive
    (``layer.primitive.moe_p``): jit, vmap and jax.export work; it has no
    derivative yet.
    """
    check_moe_args(x, weights, topk_weights, topk_ids, activation=activation, quant=quant,
                   expert_mask=expert_mask, backend=backend)
    *lead, H = x.shape
    k = topk_ids.shape[-1]
    spec = layer_spec.LayerSpec.for_weights(weights, k, activation=activation, quant=quant)
    mask = None if expert_mask is None else jnp.asarray(expert_mask).astype(jnp.int32)
    y = primitive.bind(x.reshape(-1, H), topk_weights.reshape(-1, k).astype(jnp.float32),
                       topk_ids.reshape(-1, k).astype(jnp.int32), weights, mask, spec=spec,
                       deterministic=deterministic, backend=backend)
    return y.reshape(*lead, H)

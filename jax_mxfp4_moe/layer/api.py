"""``moe``: the public entry point; validates, then dispatches by platform."""

from __future__ import annotations

import importlib
import warnings

import jax
import jax.numpy as jnp

from jax_mxfp4_moe.numerics import jnp_layer as jnp_impl
from jax_mxfp4_moe.layer.validation import check_moe_args

# backend name -> module implementing available(), supports(quant, activation), moe(...)
_BACKEND_MODULES = {"triton": "jax_mxfp4_moe.cuda.backend", "flydsl": "jax_mxfp4_moe.rocm.backend"}
_warned: set = set()


def _kernel_backend(name: str):
    try:
        return importlib.import_module(_BACKEND_MODULES[name])
    except ImportError as e:
        raise ValueError(f"backend: {name!r} is not usable here ({e})") from e


def _select(backend: str, quant: str, activation: str):
    """The module that runs this call: a kernel backend or jnp_impl."""
    if backend == "jnp":
        return jnp_impl
    if backend != "auto":
        mod = _kernel_backend(backend)
        if not mod.available():
            raise ValueError(f"backend: {backend!r} needs its GPU, but the default device is "
                             f"{jax.default_backend()!r}")
        candidates = [mod]
    else:
        candidates = []
        if jax.default_backend() == "gpu":
            for name in _BACKEND_MODULES:
                try:
                    mod = importlib.import_module(_BACKEND_MODULES[name])
                except ImportError:
                    continue
                if mod.available():
                    candidates.append(mod)
    for mod in candidates:
        if mod.supports(quant, activation):
            return mod
        key = (mod.__name__, quant, activation)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"{mod.__name__} has no kernels for quant={quant!r}, "
                          f"activation={activation!r}; using the jnp path", stacklevel=3)
    return jnp_impl


def moe(x, weights, topk_weights, topk_ids, *, activation: str = "silu", quant: str = "a16w4",
        deterministic: bool = False, expert_mask=None, swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0, backend: str = "auto"):
    """One MoE FFN layer with MXFP4 expert weights (docs/DESIGN.md §1).

    x [T, H] (bf16/f16/f32); weights: MoEWeights; topk_weights [T, k] float;
    topk_ids [T, k] int (ids outside [0, E) contribute nothing).
    activation: "silu" | "swiglu_oai"; quant: "a16w4" | "a8w4" | "a4w4".
    deterministic: reduce the k contributions of a token in slot order
    (kernel backends otherwise add them atomically).
    expert_mask: optional [E_global] bool/int; masked-out experts are skipped
    and the kept ones renumbered 0..E-1 for the E experts ``weights`` holds.
    Returns y [T, H] in x's dtype.  Traceable under jax.jit."""
    check_moe_args(x, weights, topk_weights, topk_ids, activation=activation, quant=quant,
                   expert_mask=expert_mask, backend=backend)
    if x.shape[0] == 0:
        return jnp.zeros(x.shape, x.dtype)
    impl = _select(backend, quant, activation)
    return impl.moe(x, weights, topk_weights, topk_ids.astype(jnp.int32), activation=activation,
                    quant=quant, deterministic=deterministic,
                    expert_mask=None if expert_mask is None else jnp.asarray(expert_mask),
                    swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)

"""The ``moe`` primitive: one MoE layer call as a JAX primitive.

``moe_p`` takes the arrays of one layer call,

    x [T, H], topk_weights [T, k] f32, topk_ids [T, k] i32,
    w1, w1_scale, w2, w2_scale (MXFP4, in ``layout``), [b1], [b2], [expert_mask i32],

and the parameters ``spec`` (a hashable ``spec.LayerSpec``: dims, activation,
gate/up placement, quant mode, which biases exist), ``layout`` and
``scale_max`` (the weights' static metadata), ``has_mask``, ``deterministic``
and ``backend``.  It returns y [T, H] in x's dtype.

- Lowering follows where the computation is placed: on ``cuda`` the Triton
  pipeline, on ``rocm`` the FlyDSL one, on any other platform (and wherever a
  kernel backend has no kernels for the call) the jnp path, each lowered
  through ``mlir.lower_fun``.  One ``jax.export`` artifact can carry all
  three.  ``backend`` other than "auto" forces one path; a kernel backend
  forced onto another platform is an error naming both.
- Batching: batch axes of x / topk_weights / topk_ids fold into T (each
  (batch, token) pair is one more token); batched weights (a stack of layers)
  run one layer call per batch entry (``lax.map``).
- Differentiation: a JVP rule built from linear primitives (the grouped
  matmul through the frozen MXFP4 experts, with its transpose rule) and jnp,
  so jvp, grad, vjp and linearize work, in x, topk_weights, b1 and b2
  (layer/autodiff.py; quantised modes straight-through).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

TOKEN_OPERANDS = ("x", "topk_weights", "topk_ids")
WEIGHT_OPERANDS = ("w1", "w1_scale", "w2", "w2_scale")
BACKENDS = ("auto", "jnp", "cuda", "rocm")
# The platform each kernel backend runs on (its name).
KERNEL_PLATFORMS = ("cuda", "rocm")

moe_p = Primitive("mxfp4_moe")


def operand_names(spec, has_mask: bool) -> tuple[str, ...]:
    """The primitive's operands, in order, for a spec (optional ones included
    when present)."""
    return (TOKEN_OPERANDS + WEIGHT_OPERANDS + (("b1",) if spec.has_b1 else ())
            + (("b2",) if spec.has_b2 else ()) + (("expert_mask",) if has_mask else ()))


def bind(x, topk_weights, topk_ids, weights, expert_mask, *, spec, deterministic: bool,
         backend: str):
    """``moe_p`` applied to one layer call (``weights``: MoEWeights)."""
    args = [x, topk_weights, topk_ids, weights.w1, weights.w1_scale, weights.w2, weights.w2_scale]
    args += [b for b in (weights.b1, weights.b2) if b is not None]
    if expert_mask is not None:
        args.append(expert_mask)
    return moe_p.bind(*args, spec=spec, layout=weights.layout, scale_max=weights.scale_max,
                      has_mask=expert_mask is not None, deterministic=bool(deterministic),
                      backend=backend)


def _unpack(args, params):
    """(x, topk_weights, topk_ids, MoEWeights, expert_mask or None) of the operands."""
    from jax_mxfp4_moe.layer.weights import MoEWeights

    spec = params["spec"]
    ops = dict(zip(operand_names(spec, params["has_mask"]), args))
    weights = MoEWeights(ops["w1"], ops["w1_scale"], ops["w2"], ops["w2_scale"], ops.get("b1"),
                         ops.get("b2"), num_experts=spec.num_experts, hidden=spec.hidden,
                         intermediate=spec.intermediate, gate_up=spec.gate_up,
                         layout=params["layout"], scale_max=params["scale_max"])
    return ops["x"], ops["topk_weights"], ops["topk_ids"], weights, ops.get("expert_mask")


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def _abstract_eval(x, *avals, **params):
    return jax.core.ShapedArray(x.shape, x.dtype)


@functools.lru_cache(maxsize=None)
def _jitted(**params):
    return jax.jit(lambda *args: moe_p.bind(*args, **params))


moe_p.def_abstract_eval(_abstract_eval)
moe_p.def_impl(lambda *args, **params: _jitted(**params)(*args))


# ---------------------------------------------------------------------------
# Lowering: the path follows the platform
# ---------------------------------------------------------------------------

_warned: set = set()


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=2)


def kernel_backend(name: str):
    """The module of kernel backend ``name`` ("cuda" or "rocm")."""
    if name == "cuda":
        from jax_mxfp4_moe.cuda import backend
    elif name == "rocm":
        from jax_mxfp4_moe.rocm import backend
    else:
        raise ValueError(f"backend: expected one of {KERNEL_PLATFORMS}, got {name!r}")
    return backend


def device_platform(device=None) -> str:
    """The lowering platform of a device ("cpu", "cuda", "rocm", ...): jax
    names NVIDIA and AMD devices' platform "gpu"; their client says which."""
    device = device or jax.devices()[0]
    if device.platform != "gpu":
        return device.platform
    client = getattr(device, "client", None)
    names = f"{getattr(client, 'platform', '')} {getattr(client, 'platform_version', '')}".lower()
    return "rocm" if "rocm" in names or "hip" in names else "cuda"


def choose_path(platform: str, spec, backend: str) -> str:
    """The path ("jnp", "cuda" or "rocm") that runs a call placed on ``platform``.

    "auto" takes the platform's kernel backend where it can run the call and
    the jnp path otherwise (with a one-time warning saying why); a forced
    backend that cannot run raises."""
    native = platform if platform in KERNEL_PLATFORMS else None
    if backend == "jnp":
        return "jnp"
    if backend != "auto" and backend != native:
        raise ValueError(f"backend: {backend!r} runs on {backend} devices, but this computation "
                         f"is placed on {platform!r}; use backend='auto' or 'jnp' there")
    if native is None:
        return "jnp"
    try:
        why = kernel_backend(native).unsupported(spec)
    except ImportError as e:  # a piece of the backend is not installed
        why = f"the {native} backend is not usable here ({e})"
    if why:
        if backend != "auto":
            raise ValueError(f"backend: {backend!r} cannot run this layer: {why}")
        _warn_once((native, why), f"jax_mxfp4_moe.moe: {why}; the layer runs as jnp on {platform}")
        return "jnp"
    return native


def run_path(path: str, platform: str, args, params):
    """The layer on one path, as traceable jnp / FFI calls, for ``platform``."""
    x, topk_weights, topk_ids, weights, expert_mask = _unpack(args, params)
    if x.shape[0] == 0:
        return jnp.zeros(x.shape, x.dtype)
    spec = params["spec"]
    if path == "jnp":
        from jax_mxfp4_moe.numerics import jnp_layer
        return jnp_layer.moe(x, weights, topk_weights, topk_ids, expert_mask, spec=spec,
                             platform=platform)
    return kernel_backend(path).moe(x, weights, topk_weights, topk_ids, expert_mask, spec=spec,
                                    deterministic=params["deterministic"])


def _lowering(platform):
    def lower(ctx, *args, **params):
        # A rule registered for all other platforms names the first it lowers for.
        where = platform or ctx.module_context.platforms[0]
        path = choose_path(where, params["spec"], params["backend"])
        return mlir.lower_fun(lambda *ops: run_path(path, where, ops, params),
                              multiple_results=False)(ctx, *args)
    return lower


mlir.register_lowering(moe_p, _lowering(None))  # every platform without its own rule
for _platform in KERNEL_PLATFORMS:
    mlir.register_lowering(moe_p, _lowering(_platform), platform=_platform)


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------


def _batch(args, dims, **params):
    mapped = [d is not None for d in dims]
    size = next(a.shape[d] for a, d, m in zip(args, dims, mapped) if m)
    front = [jnp.moveaxis(a, d, 0) if m else a for a, d, m in zip(args, dims, mapped)]
    n_tok = len(TOKEN_OPERANDS)
    if not any(mapped[n_tok:]):
        # Fold the batch into T.
        tokens = []
        for a, m in zip(front[:n_tok], mapped[:n_tok]):
            a = a if m else jnp.broadcast_to(a, (size, *a.shape))
            tokens.append(a.reshape(size * a.shape[1], *a.shape[2:]))
        y = moe_p.bind(*tokens, *front[n_tok:], **params)
        return y.reshape(size, -1, *y.shape[1:]), 0

    # A stack of layers: one layer call per batch entry.
    def one_layer(batched):
        it = iter(batched)
        return moe_p.bind(*[next(it) if m else a for a, m in zip(front, mapped)], **params)

    return jax.lax.map(one_layer, [a for a, m in zip(front, mapped) if m]), 0


batching.primitive_batchers[moe_p] = _batch


# ---------------------------------------------------------------------------
# Differentiation: JVP rules on linear primitives (layer/autodiff.py)
# ---------------------------------------------------------------------------


def _jvp(primals, tangents, **params):
    from jax_mxfp4_moe.layer import autodiff

    return autodiff.moe_jvp(primals, tangents, unpack=lambda args: _unpack(args, params), **params)


ad.primitive_jvps[moe_p] = _jvp

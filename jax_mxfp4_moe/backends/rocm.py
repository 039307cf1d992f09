"""ROCm backend (gfx950): FlyDSL kernels launched through the FFI launcher.

Pipeline (DESIGN section 3), four launches on XLA's stream:

    sort (one wave)  ->  quant x -> MXFP4/MXFP8  ->  gemm1 (gather, scaled
    MFMA, act, requant, sorted order)  ->  gemm2 (scaled MFMA, weighted bf16
    atomics into y [T, Hp], zeroed by the launcher)

Kernels are compiled at trace time for the device's arch, or taken from the
on-disk cache (``rocm_compile``); with a warm cache neither flydsl nor torch
is imported.  Weights must be (or are converted, traceably, to) the
``gfx950`` layout (``rocm_layout``).  a16w4 and the deterministic reduction
have no gfx950 kernels: ``supports`` says so and the dispatcher falls back.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from .. import sorting
from . import rocm_index as ix
from .rocm_layout import LAYOUT, NAME as LAYOUT_NAME  # noqa: F401  (registers the layout)

ARCHS = ("gfx950",)
QUANTS = ("a4w4", "a8w4")
ACTIVATIONS = ("silu", "swiglu_oai")
SORT_BLOCK_M = ix.BM
# Non-temporal weight loads when the weights are streamed once per call:
# with few tokens each expert has about one row block, so W tiles are not
# re-read.  A rule of thumb, not a measurement (no MI355X was available).
NT_MAX_TOKENS = 64

# Model shapes whose kernels are compiled and checked in CI.
PRESETS = {
    "gpt-oss-120b": dict(num_experts=128, top_k=4, hidden=2880, intermediate=2880,
                         gate_up="interleaved", activation="swiglu_oai", has_bias=True),
    "deepseek-v3": dict(num_experts=256, top_k=8, hidden=7168, intermediate=2048,
                        gate_up="separated", activation="silu", has_bias=False),
}
_A_FMT = {"a4w4": "mxfp4", "a8w4": "mxfp8"}
_warned: set = set()


def _device_arch(device=None) -> str | None:
    try:
        dev = device or jax.devices()[0]
    except RuntimeError:
        return None
    if "rocm" not in str(getattr(dev.client, "platform_version", "")).lower() and dev.platform != "rocm":
        return None
    arch = str(getattr(dev, "compute_capability", "") or "")
    return arch.split(":")[0] or None


def available() -> bool:
    """True on a ROCm device of a supported arch with the FFI launcher built."""
    from .. import ffi

    return _device_arch() in ARCHS and ffi.available()


def supports(quant: str, activation: str) -> bool:
    return quant in QUANTS and activation in ACTIVATIONS


def variants(*, num_experts, top_k, hidden, intermediate, quant, activation, gate_up, has_bias,
             nt, in_dtype="bf16", has_mask=False, sort_experts=None):
    """{stage: (kernel module, builder config)} of one pipeline configuration."""
    E = int(num_experts)
    Hp, _ = ix.padded_dims(hidden, intermediate)
    return {
        "sort": ("sort", dict(num_experts=int(sort_experts or E), top_k=int(top_k),
                              block_m=SORT_BLOCK_M, has_mask=bool(has_mask))),
        "quant": ("quant", dict(cols=Hp, fmt=_A_FMT[quant], in_dtype=in_dtype)),
        "gemm1": ("gemm1", dict(hidden=hidden, intermediate=intermediate, num_experts=E, quant=quant,
                                activation=activation, gate_up=gate_up, has_bias=bool(has_bias), nt=bool(nt))),
        "gemm2": ("gemm2", dict(hidden=hidden, intermediate=intermediate, num_experts=E, quant=quant,
                                has_bias=bool(has_bias), nt=bool(nt))),
    }


def shipped_variants():
    """Every (module, config) compiled for the presets: both quants, cached and nt loads."""
    out = {}
    for preset in PRESETS.values():
        for quant in QUANTS:
            for nt in (False, True):
                for mod, cfg in variants(quant=quant, nt=nt, **preset).values():
                    out[(mod, tuple(sorted(cfg.items())))] = (mod, cfg)
    return list(out.values())


def _kernel(module, config, arch):
    from .. import ffi
    from . import rocm_compile

    co = rocm_compile.compile_kernel(module, arch=arch, **config)
    return co, ffi.Kernel(co.code_hash, co.name, block=co.block, shared_mem=0, params=co.params)


def _with_nulls(kernel, null_params):
    """The same kernel with some "ptr" parameters passed as NULL."""
    from .. import ffi

    params = tuple("null" if i in null_params else p for i, p in enumerate(kernel.params))
    return ffi.Kernel(kernel.code_hash, kernel.name, block=kernel.block, shared_mem=0, params=params)


def moe(x, weights, topk_weights, topk_ids, *, activation="silu", quant="a4w4", deterministic=False,
        expert_mask=None, swiglu_alpha=1.702, swiglu_limit=7.0, arch=None):
    from .. import ffi, jnp_impl

    if not supports(quant, activation) or deterministic:
        key = (quant, activation, bool(deterministic))
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"rocm backend: no gfx950 kernels for quant={quant!r}, activation={activation!r}, "
                          f"deterministic={deterministic}; using the jnp path", stacklevel=2)
        return jnp_impl.moe(x, weights, topk_weights, topk_ids, activation=activation, quant=quant,
                            deterministic=deterministic, expert_mask=expert_mask,
                            swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
    arch = arch or _device_arch() or "gfx950"
    if (swiglu_alpha, swiglu_limit) != (1.702, 7.0) and activation == "swiglu_oai":
        extra = dict(swiglu_alpha=float(swiglu_alpha), swiglu_limit=float(swiglu_limit))
    else:
        extra = {}
    w = weights.to_layout(LAYOUT_NAME)
    T, H = x.shape
    k = topk_ids.shape[1]
    E, I = w.num_experts, w.intermediate
    if T == 0:
        return jnp.zeros((0, H), x.dtype)
    Hp, Ip = ix.padded_dims(H, I)
    sort_E = E if expert_mask is None else int(expert_mask.shape[0])
    P = sorting.sorted_size(T, k, sort_E, SORT_BLOCK_M)
    nblocks = -(-P // SORT_BLOCK_M)
    fmt = _A_FMT[quant]
    in_dtype = "bf16" if x.dtype == jnp.bfloat16 else "f32"
    plan = variants(num_experts=E, top_k=k, hidden=H, intermediate=I, quant=quant, activation=activation,
                    gate_up=w.gate_up, has_bias=w.b1 is not None, nt=T <= NT_MAX_TOKENS, in_dtype=in_dtype,
                    has_mask=expert_mask is not None, sort_experts=sort_E)
    plan["gemm1"][1].update(extra)

    def kern(stage):
        return _kernel(*plan[stage], arch)

    # 1. sort
    co, kernel = kern("sort")
    mask_arg = None
    if expert_mask is None:
        kernel = _with_nulls(kernel, {2})
    else:
        mask_arg = jnp.asarray(expert_mask).astype(jnp.int32)
    sorted_ids, sorted_w, sorted_e, num_valid = ffi.launch(
        kernel, ix.sort_grid(),
        [topk_ids.astype(jnp.int32), topk_weights.astype(jnp.float32), mask_arg,
         ffi.Out(0), ffi.Out(1), ffi.Out(2), ffi.Out(3), T],
        [jax.ShapeDtypeStruct((P,), jnp.int32), jax.ShapeDtypeStruct((P,), jnp.float32),
         jax.ShapeDtypeStruct((nblocks,), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32)],
        name="moe_sort")

    # 2. activation quantisation (x padded to Hp with zeros: whole zero MX blocks)
    xin = x.astype(jnp.bfloat16 if in_dtype == "bf16" else jnp.float32)
    if Hp != H:
        xin = jnp.pad(xin, ((0, 0), (0, Hp - H)))
    co, kernel = kern("quant")
    row_bytes = Hp // 2 if fmt == "mxfp4" else Hp
    xq, xs = ffi.launch(
        kernel, ix.quant_grid(T, Hp), [xin, ffi.Out(0), ffi.Out(1), T],
        [jax.ShapeDtypeStruct((T, row_bytes), jnp.uint8), jax.ShapeDtypeStruct((T, Hp // 32), jnp.uint8)],
        name="moe_quant")

    # 3. gemm1
    co, kernel = kern("gemm1")
    b1 = None
    if w.b1 is None:
        kernel = _with_nulls(kernel, {4})
    else:
        b1 = w.b1.astype(jnp.float32)
    inter_bytes = Ip // 2 if fmt == "mxfp4" else Ip
    inter, inter_s = ffi.launch(
        kernel, ix.gemm1_grid(nblocks, Ip),
        [xq, xs, w.w1, w.w1_scale, b1, sorted_ids, sorted_e, num_valid, ffi.Out(0), ffi.Out(1), T],
        [jax.ShapeDtypeStruct((P, inter_bytes), jnp.uint8), jax.ShapeDtypeStruct((P, Ip // 32), jnp.uint8)],
        name="moe_gemm1")

    # 4. gemm2: atomics into a zeroed [T, Hp] bf16 buffer
    co, kernel = kern("gemm2")
    b2 = None
    if w.b2 is None:
        kernel = _with_nulls(kernel, {4})
    else:
        b2 = w.b2.astype(jnp.float32)
    (y,) = ffi.launch(
        kernel, ix.gemm2_grid(nblocks, Hp),
        [inter, inter_s, w.w2, w.w2_scale, b2, sorted_ids, sorted_w, sorted_e, num_valid, ffi.Out(0), T],
        [jax.ShapeDtypeStruct((T, Hp), jnp.bfloat16)], zero_outputs=(0,), name="moe_gemm2")
    return y[:, :H].astype(x.dtype)

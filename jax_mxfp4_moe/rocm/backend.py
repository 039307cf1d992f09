"""ROCm backend (gfx950): FlyDSL kernels launched through the FFI launcher.

Pipeline (docs/DESIGN.md §3), launches on XLA's stream:

    sort (one wave; three launches for large T)  ->  quant x -> MXFP4/MXFP8
    ->  gemm1 (gather, scaled MFMA, act, requant, sorted order)  ->  gemm2
    (scaled MFMA, weighted bf16 atomics into y [T, Hp], zeroed by the launcher)

Kernels are compiled at trace time for the device's arch, or taken from the
on-disk cache (``rocm_compile``); with a warm cache neither flydsl nor torch
is imported.  Weights must be (or are converted, traceably, to) the
``gfx950`` layout (``rocm_layout``).  a16w4 has no gfx950 kernels:
``supports`` says so and the dispatcher falls back.  ``deterministic=True``
makes gemm2 write one f32 row per (token, slot) and sums the slots in order
instead of adding atomically.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from jax_mxfp4_moe.numerics import sorting
from jax_mxfp4_moe.rocm import geometry as ix
from jax_mxfp4_moe.rocm.layout import LAYOUT, NAME as LAYOUT_NAME  # noqa: F401  (registers the layout)

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
    """The gfx arch of a ROCm device ("gfx950"), or None for any other device.

    ROCm jaxlib reports the arch as ``compute_capability`` (a string such as
    "gfx950:sramecc+:xnack-"), sometimes as ``device_kind``."""
    try:
        dev = device or jax.devices()[0]
    except RuntimeError:
        return None
    client = getattr(dev, "client", None)
    names = (dev.platform, getattr(client, "platform", ""), getattr(client, "platform_version", ""))
    if not any("rocm" in str(n).lower() for n in names):
        return None
    for value in (getattr(dev, "compute_capability", None), getattr(dev, "device_kind", None)):
        if isinstance(value, str) and value.startswith("gfx"):
            return value.split(":")[0]
    return None


def available() -> bool:
    """True on a ROCm device of a supported arch with the FFI launcher built."""
    from jax_mxfp4_moe.runtime import ffi

    return _device_arch() in ARCHS and ffi.available()


def supports(quant: str, activation: str) -> bool:
    return quant in QUANTS and activation in ACTIVATIONS


SORT_STAGES = ("oneshot", "count", "offsets", "scatter")


def sort_config(*, num_experts, top_k, has_mask, stage="oneshot"):
    return dict(num_experts=int(num_experts), top_k=int(top_k), block_m=SORT_BLOCK_M, has_mask=bool(has_mask),
                stage=stage)


def quant_config(*, cols, fmt, in_dtype):
    return dict(cols=int(cols), fmt=fmt, in_dtype=in_dtype)


def gemm1_config(*, hidden, intermediate, num_experts, quant, activation, gate_up, has_bias, nt,
                 swiglu_alpha=1.702, swiglu_limit=7.0):
    cfg = dict(hidden=int(hidden), intermediate=int(intermediate), num_experts=int(num_experts), quant=quant,
               activation=activation, gate_up=gate_up, has_bias=bool(has_bias), nt=bool(nt))
    if activation == "swiglu_oai" and (swiglu_alpha, swiglu_limit) != (1.702, 7.0):
        cfg.update(swiglu_alpha=float(swiglu_alpha), swiglu_limit=float(swiglu_limit))
    return cfg


def gemm2_config(*, hidden, intermediate, num_experts, quant, has_bias, nt, deterministic=False, top_k=None):
    cfg = dict(hidden=int(hidden), intermediate=int(intermediate), num_experts=int(num_experts), quant=quant,
               has_bias=bool(has_bias), nt=bool(nt))
    if deterministic:
        cfg["top_k"] = int(top_k)
    return cfg


def variants(*, num_experts, top_k, hidden, intermediate, quant, activation, gate_up, has_bias,
             nt, in_dtype="bf16", has_mask=False):
    """{stage: (kernel module, builder config)} of one pipeline configuration."""
    Hp, _ = ix.padded_dims(hidden, intermediate)
    dims = dict(hidden=hidden, intermediate=intermediate, num_experts=num_experts, quant=quant,
                has_bias=has_bias, nt=nt)
    return {
        **{f"sort_{st}": ("sort", sort_config(num_experts=num_experts, top_k=top_k, has_mask=has_mask, stage=st))
           for st in SORT_STAGES},
        "quant": ("quant", quant_config(cols=Hp, fmt=_A_FMT[quant], in_dtype=in_dtype)),
        "gemm1": ("gemm1", gemm1_config(activation=activation, gate_up=gate_up, **dims)),
        "gemm2": ("gemm2", gemm2_config(**dims)),
        "gemm2_det": ("gemm2", gemm2_config(deterministic=True, top_k=top_k, **dims)),
    }


def shipped_variants():
    """Every (module, config) compiled for the presets: both quants, cached and nt
    loads, bf16 and f32 activations, atomic and deterministic gemm2."""
    out = {}
    for preset in PRESETS.values():
        for quant in QUANTS:
            for nt in (False, True):
                for in_dtype in ("bf16", "f32"):
                    for mod, cfg in variants(quant=quant, nt=nt, in_dtype=in_dtype, **preset).values():
                        out[(mod, tuple(sorted(cfg.items())))] = (mod, cfg)
    return list(out.values())


def _kernel(module, config, arch):
    from jax_mxfp4_moe.runtime import ffi
    from jax_mxfp4_moe.rocm import compile as rocm_compile

    co = rocm_compile.compile_kernel(module, arch=arch, **config)
    return co, ffi.Kernel(co.code_hash, co.name, block=co.block, shared_mem=0, params=co.params)


def _with_nulls(kernel, null_params):
    """The same kernel with some "ptr" parameters passed as NULL."""
    from jax_mxfp4_moe.runtime import ffi

    params = tuple("null" if i in null_params else p for i, p in enumerate(kernel.params))
    return ffi.Kernel(kernel.code_hash, kernel.name, block=kernel.block, shared_mem=0, params=params)


def sort(topk_ids, topk_weights, *, num_experts, expert_mask=None, arch="gfx950"):
    """Sort kernel(s): sorting.SortResult of the docs/DESIGN.md §3 contract (BM = 32).

    One launch up to ``SORT_ONESHOT_MAX_ENTRIES`` routed entries, else three
    (per-chunk counts, offsets and fills, per-chunk scatter)."""
    from jax_mxfp4_moe.runtime import ffi

    T, k = topk_ids.shape
    E = int(num_experts)
    P = sorting.sorted_size(T, k, E, SORT_BLOCK_M)
    nblocks = -(-P // SORT_BLOCK_M)
    has_mask = expert_mask is not None
    mask = jnp.asarray(expert_mask).astype(jnp.int32) if has_mask else None
    ids = topk_ids.astype(jnp.int32)
    wts = topk_weights.astype(jnp.float32)
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    sorted_types = [i32(P), jax.ShapeDtypeStruct((P,), jnp.float32), i32(nblocks), i32(2)]

    def kernel(stage, mask_param):
        _, kern = _kernel("sort", sort_config(num_experts=E, top_k=k, has_mask=has_mask, stage=stage), arch)
        return kern if has_mask else _with_nulls(kern, {mask_param})

    if T * k <= ix.SORT_ONESHOT_MAX_ENTRIES:
        out = ffi.launch(kernel("oneshot", 2), ix.sort_grid(),
                         [ids, wts, mask, ffi.Out(0), ffi.Out(1), ffi.Out(2), ffi.Out(3), T],
                         sorted_types, name="moe_sort")
        return sorting.SortResult(*out)
    nch = ix.sort_chunks(T, k)
    (counts,) = ffi.launch(kernel("count", 1), ix.sort_chunk_grid(T, k), [ids, mask, ffi.Out(0), T],
                           [i32(nch * E)], name="moe_sort_count")
    sid, sw, se, nv, base = ffi.launch(
        kernel("offsets", 1), ix.sort_grid(),
        [counts, mask, ffi.Out(0), ffi.Out(1), ffi.Out(2), ffi.Out(3), ffi.Out(4), T],
        sorted_types + [i32(nch * E)], name="moe_sort_offsets")
    operands = [ids, wts] + ([mask] if has_mask else []) + [base, sid, sw]
    sid, sw = ffi.launch(
        kernel("scatter", 2), ix.sort_chunk_grid(T, k), [ids, wts, mask, base, sid, sw, T],
        sorted_types[:2], input_output_aliases={len(operands) - 2: 0, len(operands) - 1: 1},
        name="moe_sort_scatter")
    return sorting.SortResult(sid, sw, se, nv)


def quantize(x, fmt, *, arch="gfx950"):
    """Quant kernel: x [T, K] (K a multiple of 32) -> (elements u8, scales u8 [T, K/32])."""
    from jax_mxfp4_moe.runtime import ffi

    T, K = x.shape
    in_dtype = "bf16" if x.dtype == jnp.bfloat16 else "f32"
    xin = x.astype(jnp.bfloat16 if in_dtype == "bf16" else jnp.float32)
    _, kernel = _kernel("quant", quant_config(cols=K, fmt=fmt, in_dtype=in_dtype), arch)
    row_bytes = K // 2 if fmt == "mxfp4" else K
    q, s = ffi.launch(
        kernel, ix.quant_grid(T, K), [xin, ffi.Out(0), ffi.Out(1), T],
        [jax.ShapeDtypeStruct((T, row_bytes), jnp.uint8), jax.ShapeDtypeStruct((T, K // 32), jnp.uint8)],
        name="moe_quant")
    return q, s


def gemm1(xq, xs, w, s, *, tokens, quant, activation, nt, swiglu_alpha=1.702, swiglu_limit=7.0,
          arch="gfx950"):
    """gemm1 kernel: sorted intermediate (elements u8 [P, Ip(/2)], scales u8 [P, Ip/32])."""
    from jax_mxfp4_moe.runtime import ffi

    H, I, E = w.hidden, w.intermediate, w.num_experts
    _, Ip = ix.padded_dims(H, I)
    P = s.sorted_token_ids.shape[0]
    cfg = gemm1_config(hidden=H, intermediate=I, num_experts=E, quant=quant, activation=activation,
                       gate_up=w.gate_up, has_bias=w.b1 is not None, nt=nt, swiglu_alpha=swiglu_alpha,
                       swiglu_limit=swiglu_limit)
    _, kernel = _kernel("gemm1", cfg, arch)
    kernel, b1 = _optional_bias(kernel, w.b1)
    inter_bytes = Ip // 2 if quant == "a4w4" else Ip
    inter, inter_s = ffi.launch(
        kernel, ix.gemm1_grid(s.sorted_expert_ids.shape[0], Ip),
        [xq, xs, w.w1, w.w1_scale, b1, s.sorted_token_ids, s.sorted_expert_ids, s.num_valid,
         ffi.Out(0), ffi.Out(1), tokens],
        [jax.ShapeDtypeStruct((P, inter_bytes), jnp.uint8), jax.ShapeDtypeStruct((P, Ip // 32), jnp.uint8)],
        name="moe_gemm1")
    return inter, inter_s


def _optional_bias(kernel, bias):
    """(kernel, bias operand): an absent bias is passed as a NULL pointer (param 4)."""
    if bias is None:
        return _with_nulls(kernel, {4}), None
    return kernel, bias.astype(jnp.float32)


def gemm2(inter, inter_s, w, s, *, tokens, top_k, quant, nt, deterministic=False, arch="gfx950"):
    """gemm2 kernel: y [T, Hp] (bf16 from atomic adds; f32 summed over slots in order if deterministic)."""
    from jax_mxfp4_moe.runtime import ffi

    H, I, E = w.hidden, w.intermediate, w.num_experts
    Hp, _ = ix.padded_dims(H, I)
    cfg = gemm2_config(hidden=H, intermediate=I, num_experts=E, quant=quant, has_bias=w.b2 is not None, nt=nt,
                       deterministic=deterministic, top_k=top_k)
    _, kernel = _kernel("gemm2", cfg, arch)
    kernel, b2 = _optional_bias(kernel, w.b2)
    out_type = (jax.ShapeDtypeStruct((tokens * top_k, Hp), jnp.float32) if deterministic
                else jax.ShapeDtypeStruct((tokens, Hp), jnp.bfloat16))
    (y,) = ffi.launch(
        kernel, ix.gemm2_grid(s.sorted_expert_ids.shape[0], Hp),
        [inter, inter_s, w.w2, w.w2_scale, b2, s.sorted_token_ids, s.sorted_weights, s.sorted_expert_ids,
         s.num_valid, ffi.Out(0), tokens],
        [out_type], zero_outputs=(0,), name="moe_gemm2")
    if deterministic:  # one row per (token, slot): sum the slots in order
        y = y.reshape(tokens, top_k, Hp).sum(axis=1)
    return y


def moe(x, weights, topk_weights, topk_ids, *, activation="silu", quant="a4w4", deterministic=False,
        expert_mask=None, swiglu_alpha=1.702, swiglu_limit=7.0, arch=None):
    """The shared backend signature; weights in any layout (converted to gfx950's)."""
    from jax_mxfp4_moe.numerics import jnp_layer as jnp_impl

    if not supports(quant, activation):
        key = (quant, activation)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"rocm backend: no gfx950 kernels for quant={quant!r}, activation={activation!r}; "
                          "using the jnp path", stacklevel=2)
        return jnp_impl.moe(x, weights, topk_weights, topk_ids, activation=activation, quant=quant,
                            deterministic=deterministic, expert_mask=expert_mask,
                            swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
    arch = arch or _device_arch() or "gfx950"
    if weights.layout != LAYOUT_NAME and "layout" not in _warned:
        _warned.add("layout")
        warnings.warn(f"rocm backend: weights in layout {weights.layout!r} are re-laid out to "
                      f"{LAYOUT_NAME!r} inside every call; build them once with "
                      f"prepare_weights(..., layout={LAYOUT_NAME!r}) or weights.to_layout({LAYOUT_NAME!r})",
                      stacklevel=2)
    w = weights.to_layout(LAYOUT_NAME)
    T, H = x.shape
    if T == 0:
        return jnp.zeros((0, H), x.dtype)
    Hp, _ = ix.padded_dims(H, w.intermediate)
    nt = T <= NT_MAX_TOKENS
    n_sort = w.num_experts if expert_mask is None else int(jnp.shape(expert_mask)[0])
    s = sort(topk_ids, topk_weights, num_experts=n_sort, expert_mask=expert_mask, arch=arch)
    xin = x if x.dtype in (jnp.bfloat16, jnp.float32) else x.astype(jnp.float32)
    if Hp != H:  # zero columns form whole zero MX blocks
        xin = jnp.pad(xin, ((0, 0), (0, Hp - H)))
    xq, xs = quantize(xin, _A_FMT[quant], arch=arch)
    inter, inter_s = gemm1(xq, xs, w, s, tokens=T, quant=quant, activation=activation, nt=nt,
                           swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit, arch=arch)
    y = gemm2(inter, inter_s, w, s, tokens=T, top_k=topk_ids.shape[1], quant=quant, nt=nt,
              deterministic=deterministic, arch=arch)
    return y[:, :H].astype(x.dtype)

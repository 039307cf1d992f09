"""ROCm backend (gfx950): FlyDSL kernels launched through the FFI launcher.

Pipeline (docs/DESIGN.md §3), launches on XLA's stream:

    sort (one wave; three launches for large T)  ->  quant x -> MXFP4/MXFP8
    ->  gemm1 (gather, scaled MFMA, act, requant, sorted order)  ->  gemm2
    (scaled MFMA, weighted bf16 atomics into y [T, Hp], zeroed by the launcher)

The tile table (``rocm.config.tiles_for``: T is static under jit) picks the
GEMMs' row block BM, which is also the sort's block size, their tiles and
gemm2's K splits; the GEMM grids are (n_tiles, row_blocks, k_splits) with
only the row blocks the routing can fill (``ix.max_row_blocks``).

Kernels are compiled at trace time for the device's arch, or taken from the
on-disk cache (``rocm.compile``); with a warm cache neither flydsl nor torch
is imported.  Weights must be (or are converted, traceably, to) the
``gfx950`` layout (``rocm.layout``).  a16w4 has no gfx950 kernels:
``unsupported`` says so, and the primitive's lowering runs the jnp path
instead (layer/primitive.py: one rule for both backends).  ``deterministic=True``
makes gemm2 write one f32 row per (token, slot) and sums the slots in order
instead of adding atomically.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from jax_mxfp4_moe import spec as layer_spec
from jax_mxfp4_moe.numerics import sorting
from jax_mxfp4_moe.rocm import geometry as ix
from jax_mxfp4_moe.rocm import config as rocm_config
from jax_mxfp4_moe.rocm.config import ARCHS, QUANTS, gemm1_config, gemm2_config, quant_config, sort_config
from jax_mxfp4_moe.rocm.layout import NAME as LAYOUT_NAME  # registers the gfx950 layout
from jax_mxfp4_moe.runtime import ffi

_warned: set = set()


def device_arch(device=None) -> str | None:
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


def _local_arch() -> str | None:
    """The arch of this process's ROCm devices; None where it has none (an
    export lowers for gfx950 without one)."""
    try:
        devices = jax.devices("rocm")
    except RuntimeError:
        return None
    return device_arch(devices[0]) if devices else None


def available() -> bool:
    """True where this process has a ROCm GPU of a supported arch and the
    launcher is built."""
    return _local_arch() in ARCHS and ffi.available()


def unsupported(spec) -> str | None:
    """Why these kernels cannot run a layer here, or None."""
    if spec.quant not in QUANTS:
        return (f"the gfx950 kernels run quant modes {QUANTS} (the scaled MFMA takes fp4/fp8 "
                f"operands), not {spec.quant!r}")
    if not ffi.available():
        return "the FFI launcher extension is not built"
    arch = _local_arch()
    if arch is not None and arch not in ARCHS:
        return f"no kernels are built for {arch} (only {ARCHS})"
    return None


def _kernel(module, config, arch):
    from jax_mxfp4_moe.rocm import compile as rocm_compile

    co = rocm_compile.compile_kernel(module, arch=arch, **config)
    return ffi.Kernel(co.code_hash, co.name, block=co.block, shared_mem=0, params=co.params)


def sort(topk_ids, topk_weights, *, num_experts, block_m, expert_mask=None, arch="gfx950"):
    """Sort kernel(s): sorting.SortResult of the docs/DESIGN.md §3 contract
    (blocks of ``block_m`` rows: the GEMMs' BM, rocm/config.py).

    One launch (stage "oneshot") up to ``SORT_ONESHOT_MAX_ENTRIES`` routed
    entries, else three: "count" (per-chunk counts), "offsets" (offsets and
    fills), "scatter" (per chunk)."""
    T, k = topk_ids.shape
    E = int(num_experts)
    P = sorting.sorted_size(T, k, E, block_m)
    nblocks = -(-P // block_m)
    has_mask = expert_mask is not None
    mask = jnp.asarray(expert_mask).astype(jnp.int32) if has_mask else None
    ids = topk_ids.astype(jnp.int32)
    wts = topk_weights.astype(jnp.float32)
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    sorted_types = [i32(P), jax.ShapeDtypeStruct((P,), jnp.float32), i32(nblocks), i32(2)]

    def kernel(stage):
        return _kernel("sort", sort_config(num_experts=E, top_k=k, has_mask=has_mask, block_m=block_m,
                                           stage=stage), arch)

    if T * k <= ix.SORT_ONESHOT_MAX_ENTRIES:
        out = ffi.launch(kernel("oneshot"), ix.sort_grid(),
                         [ids, wts, mask, ffi.Out(0), ffi.Out(1), ffi.Out(2), ffi.Out(3), T],
                         sorted_types, name="moe_sort_oneshot")
        return sorting.SortResult(*out)
    nch = ix.sort_chunks(T, k)
    (counts,) = ffi.launch(kernel("count"), ix.sort_chunk_grid(T, k), [ids, mask, ffi.Out(0), T],
                           [i32(nch * E)], name="moe_sort_count")
    sid, sw, se, nv, base = ffi.launch(
        kernel("offsets"), ix.sort_grid(),
        [counts, mask, ffi.Out(0), ffi.Out(1), ffi.Out(2), ffi.Out(3), ffi.Out(4), T],
        sorted_types + [i32(nch * E)], name="moe_sort_offsets")
    operands = [ids, wts] + ([mask] if has_mask else []) + [base, sid, sw]
    sid, sw = ffi.launch(
        kernel("scatter"), ix.sort_chunk_grid(T, k), [ids, wts, mask, base, sid, sw, T],
        sorted_types[:2], input_output_aliases={len(operands) - 2: 0, len(operands) - 1: 1},
        name="moe_sort_scatter")
    return sorting.SortResult(sid, sw, se, nv)


def quantize(x, fmt, *, arch="gfx950"):
    """Quant kernel: x [T, K] (K a multiple of 128) -> (elements u8 [T, K/2 or K],
    scales u8 [T, act_scale_row_bytes(K)] packed as the GEMMs load them:
    ``layout.unpack_act_scales`` gives [T, K/32])."""
    layer_spec.mx_format(fmt)
    T, K = x.shape
    in_dtype = "bf16" if x.dtype == jnp.bfloat16 else "f32"
    xin = x.astype(jnp.bfloat16 if in_dtype == "bf16" else jnp.float32)
    kernel = _kernel("quant", quant_config(cols=K, fmt=fmt, in_dtype=in_dtype), arch)
    q, s = ffi.launch(
        kernel, ix.quant_grid(T, K), [xin, ffi.Out(0), ffi.Out(1), T],
        [jax.ShapeDtypeStruct((T, ix.row_bytes(K, fmt)), jnp.uint8),
         jax.ShapeDtypeStruct((T, ix.act_scale_row_bytes(K)), jnp.uint8)],
        name="moe_quant")
    return q, s


def _bias(b):
    return None if b is None else b.astype(jnp.float32)  # absent: a NULL pointer


def row_blocks(tokens, top_k, num_experts, bm):
    """Row blocks a GEMM launches: the most the routing can fill (T is static under jit)."""
    return ix.max_row_blocks(tokens * top_k, num_experts, bm)


def _sort_experts(s, bm, tokens, top_k):
    """The expert count the sort laid out (from the static shapes of its result)."""
    P = s.sorted_token_ids.shape[0]
    return (P - tokens * top_k + top_k) // bm


def _live_blocks(s, bm, tokens, top_k):
    return min(s.sorted_expert_ids.shape[0], row_blocks(tokens, top_k, _sort_experts(s, bm, tokens, top_k), bm))


def gemm1(xq, xs, w, s, *, layer, tokens, tiles, arch="gfx950"):
    """gemm1 kernel: sorted intermediate (elements u8 [P, Ip(/2)], packed
    scales u8 [P, act_scale_row_bytes(Ip)]); ``tiles``: rocm_config.Tiles."""
    _, Ip = ix.padded_dims(layer.hidden, layer.intermediate)
    P = s.sorted_token_ids.shape[0]
    kernel = _kernel("gemm1", gemm1_config(layer, tiles), arch)
    grid = ix.gemm_grid(2 * Ip, _live_blocks(s, tiles.bm, tokens, layer.top_k), tiles.gemm1.tiles,
                        tiles.gemm1.waves)
    inter, inter_s = ffi.launch(
        kernel, grid,
        [xq, xs, w.w1, w.w1_scale, _bias(w.b1), s.sorted_token_ids, s.sorted_expert_ids,
         s.num_valid, ffi.Out(0), ffi.Out(1), tokens],
        [jax.ShapeDtypeStruct((P, ix.row_bytes(Ip, layer.mode.act_format)), jnp.uint8),
         jax.ShapeDtypeStruct((P, ix.act_scale_row_bytes(Ip)), jnp.uint8)],
        name="moe_gemm1")
    return inter, inter_s


def gemm2(inter, inter_s, w, s, *, layer, tokens, tiles, deterministic=False, arch="gfx950"):
    """gemm2 kernel: y [T, Hp] (bf16 from atomic adds; f32 summed over slots in
    order if deterministic: the same code object, told by its last argument)."""
    Hp, Ip = ix.padded_dims(layer.hidden, layer.intermediate)
    k = layer.top_k
    tile = rocm_config.gemm2_tile(tiles, deterministic=deterministic)
    kernel = _kernel("gemm2", gemm2_config(layer, tiles, deterministic=deterministic), arch)
    out_type = (jax.ShapeDtypeStruct((tokens * k, Hp), jnp.float32) if deterministic
                else jax.ShapeDtypeStruct((tokens, Hp), jnp.bfloat16))
    splits = ix.k_splits_used(Ip // ix.MFMA_K, tile.k_splits)
    grid = ix.gemm_grid(Hp, _live_blocks(s, tiles.bm, tokens, k), tile.tiles, tile.waves, splits)
    (y,) = ffi.launch(
        kernel, grid,
        [inter, inter_s, w.w2, w.w2_scale, _bias(w.b2), s.sorted_token_ids, s.sorted_weights,
         s.sorted_expert_ids, s.num_valid, ffi.Out(0), tokens, k if deterministic else 0],
        [out_type], zero_outputs=(0,), name="moe_gemm2")
    if deterministic:  # one row per (token, slot): sum the slots in order
        y = y.reshape(tokens, k, Hp).sum(axis=1)
    return y


def moe(x, weights, topk_weights, topk_ids, expert_mask=None, *, spec, deterministic=False,
        arch=None):
    """The layer (docs/DESIGN.md §1) for ``spec`` on gfx950: y [T, H] in x's
    dtype; weights in any layout (re-laid out to gfx950's, with a one-time
    warning)."""
    if spec.quant not in QUANTS:
        raise ValueError(f"quant: the gfx950 kernels run {QUANTS}, not {spec.quant!r}")
    arch = arch or _local_arch() or ARCHS[0]
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
    tiles = rocm_config.tiles_for(spec, T, deterministic=deterministic)
    n_sort = w.num_experts if expert_mask is None else int(jnp.shape(expert_mask)[0])
    s = sort(topk_ids, topk_weights, num_experts=n_sort, block_m=tiles.bm, expert_mask=expert_mask,
             arch=arch)
    xin = x if x.dtype in (jnp.bfloat16, jnp.float32) else x.astype(jnp.float32)
    if Hp != H:  # zero columns form whole zero MX blocks
        xin = jnp.pad(xin, ((0, 0), (0, Hp - H)))
    xq, xs = quantize(xin, spec.mode.act_format, arch=arch)
    inter, inter_s = gemm1(xq, xs, w, s, layer=spec, tokens=T, tiles=tiles, arch=arch)
    y = gemm2(inter, inter_s, w, s, layer=spec, tokens=T, tiles=tiles, deterministic=deterministic,
              arch=arch)
    return y[:, :H].astype(x.dtype)

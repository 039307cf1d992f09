"""NVIDIA Hopper (sm_90a) backend: Triton kernels launched through the FFI
code-object launcher on XLA's stream.

Pipeline (docs/DESIGN.md §3), all launches on the GPU:
  sort (1 launch, or 3 for large T*k) -> gemm1 (gather + MX-quantised A load,
  act, re-quantise) -> gemm2 (weighted atomic add into f32 y, or per-slot
  stores for the deterministic variant) -> cast (one XLA op).
At decode size (config.DIRECT_MAX) the layer is one custom call: a
memset of its scratch and one kernel (moe_decode.moe_decode) that routes from
topk_ids itself, runs gemm1 then gemm2 and writes the output dtype.
Past 64 rows per expert, with sm90 weights, gemm1 and gemm2 are the Gluon
wgmma kernels (moe_wgmma.py) after a pre-pass that gathers x into sorted
order (_prefill).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_mxfp4_moe import spec as layer_spec
from jax_mxfp4_moe.cuda import config
from jax_mxfp4_moe.cuda.compile import TRITON_DTYPE, kernel, launch
from jax_mxfp4_moe.cuda.config import (DIRECT_MAX, FOLD_MAX_SCALE_BYTE, SORT_OFFSETS_GROUP,
                                       SORT_ONESHOT_MAX_ENTRIES, choose_config, sort_chunk)
from jax_mxfp4_moe.cuda.layout import NAME as LAYOUT_NAME  # registers the sm90 layout
from jax_mxfp4_moe.numerics import sorting
from jax_mxfp4_moe.runtime import ffi

# Compute capability of the GPUs the kernels are compiled for (sm_90a).
COMPUTE_CAPABILITY = "9.0"


def _local_devices():
    try:
        return jax.devices("cuda")
    except RuntimeError:
        return []


def available() -> bool:
    """True where this process has an sm_90 GPU and the launcher is built."""
    devices = _local_devices()
    return (bool(devices) and ffi.available()
            and str(getattr(devices[0], "compute_capability", "")) == COMPUTE_CAPABILITY)


def unsupported(spec) -> str | None:
    """Why these kernels cannot run a layer here, or None: every quant mode and
    activation of the spec has kernels; a CUDA device (when the process has
    one; exports lower without) must be sm_90 and the launcher must be built."""
    return _platform_unsupported()


def _platform_unsupported() -> str | None:
    if not ffi.available():
        return "the FFI launcher extension is not built"
    devices = _local_devices()
    if devices:
        cc = str(getattr(devices[0], "compute_capability", ""))
        if cc != COMPUTE_CAPABILITY:
            return (f"the CUDA kernels are built for compute capability {COMPUTE_CAPABILITY} "
                    f"(sm_90a), this GPU is {cc}")
    return None


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def sort(topk_ids, topk_weights, *, num_experts: int, block_m: int, expert_mask=None):
    """The sort contract computed by Triton kernels -> sorting.SortResult.

    One launch (stage "oneshot") up to SORT_ONESHOT_MAX_ENTRIES routed
    entries, else three: "count" (per-chunk histograms, padding fill),
    "offsets" (expert offsets, block expert ids, per-chunk bases), "scatter"."""
    if block_m not in layer_spec.BLOCK_SIZES:
        raise ValueError(f"block_m: expected one of {layer_spec.BLOCK_SIZES}, got {block_m}")
    T, K = topk_ids.shape
    E = num_experts
    P = sorting.sorted_size(T, K, E, block_m)
    NB = sorting.num_blocks(T, K, E, block_m)
    n = T * K
    ids = topk_ids.astype(jnp.int32).reshape(-1)
    w = topk_weights.astype(jnp.float32).reshape(-1)
    has_mask = expert_mask is not None
    mask = jnp.asarray(expert_mask).astype(jnp.int32) if has_mask else None
    nbins = _pow2_at_least(E + 1)  # bin E collects the entries that are "not here"
    i32, f32 = jnp.int32, jnp.float32
    outs = [jax.ShapeDtypeStruct((P,), i32), jax.ShapeDtypeStruct((P,), f32),
            jax.ShapeDtypeStruct((NB,), i32), jax.ShapeDtypeStruct((2,), i32)]
    if n <= SORT_ONESHOT_MAX_ENTRIES:
        sub = min(128, _pow2_at_least(max(n, 16)))
        kern = kernel("moe_sort", "moe_sort_oneshot", num_warps=4, BM=block_m, NBINS=nbins, SUB=sub,
                      BLK=64 if nbins <= 256 else 32, FILL=1024, HAS_MASK=has_mask)
        res = launch(kern, (1, 1, 1),
                         [ids, w, mask, ffi.Out(0), ffi.Out(1), ffi.Out(2), ffi.Out(3), ffi.Out(4),
                          T, K, E, P, NB],
                         outs + [jax.ShapeDtypeStruct((nbins,), i32)], name="moe_sort_oneshot")
        return sorting.SortResult(*res[:4])
    chunk = sort_chunk(n)
    nchunk = -(-n // chunk)
    count = kernel("moe_sort", "moe_sort_count", num_warps=4, NBINS=nbins, SUB=128, FILL=1024,
                   HAS_MASK=has_mask)
    sid, sw, counts = launch(
        count, (nchunk, 1, 1),
        [ids, mask, ffi.Out(0), ffi.Out(1), ffi.Out(2), T, K, E, P, chunk],
        outs[:2] + [jax.ShapeDtypeStruct((nchunk * nbins,), i32)], name="moe_sort_count")
    offsets = kernel("moe_sort", "moe_sort_offsets", num_warps=4, BM=block_m, NBINS=nbins,
                     BLK=64 if nbins <= 256 else 32, HAS_MASK=has_mask,
                     GROUP=SORT_OFFSETS_GROUP)
    sexp, nv, run = launch(
        offsets, (1, 1, 1),
        [counts, mask, ffi.Out(0), ffi.Out(1), ffi.Out(2), T, E, NB, nchunk],
        outs[2:] + [jax.ShapeDtypeStruct((nchunk * nbins,), i32)], name="moe_sort_offsets")
    scatter = kernel("moe_sort", "moe_sort_scatter", num_warps=4, NBINS=nbins, SUB=128,
                     HAS_MASK=has_mask)
    # sid, sw and run are updated in place (they alias results 0, 1, 2).
    first = 3 if has_mask else 2  # operand index of sid: the array arguments before it
    sid, sw, _ = launch(
        scatter, (nchunk, 1, 1),
        [ids, w, mask, sid, sw, run, T, K, E, chunk],
        [jax.ShapeDtypeStruct((P,), i32), jax.ShapeDtypeStruct((P,), f32),
         jax.ShapeDtypeStruct((nchunk * nbins,), i32)],
        input_output_aliases={first: 0, first + 1: 1, first + 2: 2}, name="moe_sort_scatter")
    return sorting.SortResult(sid, sw, sexp, nv)


def quantize(x, fmt: str):
    """x [N, K] -> (bytes, scale) like formats.quantize_mxfp4 / quantize_mxfp8, on the GPU."""
    layer_spec.mx_format(fmt)
    if x.ndim != 2 or x.shape[1] % layer_spec.MX_BLOCK:
        raise ValueError(f"x: expected [N, K] with K a multiple of {layer_spec.MX_BLOCK}, got {x.shape}")
    N, K = x.shape
    fp8 = fmt == "mxfp8"
    br, bk = 4, 256
    kern = kernel("quant", "moe_quant", num_warps=4, x_dtype=TRITON_DTYPE[jnp.dtype(x.dtype).name],
                  BLOCK_R=br, BLOCK_K=bk, FP8=fp8)
    q, s = launch(kern, (-(-N // br), -(-K // bk), 1),
                      [x, ffi.Out(0), ffi.Out(1), N, K],
                      [jax.ShapeDtypeStruct((N, K if fp8 else K // 2), jnp.uint8),
                       jax.ShapeDtypeStruct((N, K // 32), jnp.uint8)], name="moe_quant")
    return q, s


def _quant_dequant(x, *, fp8: bool):
    """x [T, H] -> its MXFP4/MXFP8 values as bf16 (exact), one pass."""
    N, K = x.shape
    br, bk = 4, 256
    kern = kernel("quant", "moe_quant_dequant", num_warps=4,
                  x_dtype=TRITON_DTYPE[jnp.dtype(x.dtype).name], BLOCK_R=br, BLOCK_K=bk, FP8=fp8)
    (y,) = launch(kern, (-(-N // br), -(-K // bk), 1), [x, ffi.Out(0), N, K],
                  [jax.ShapeDtypeStruct((N, K), jnp.bfloat16)], name="moe_quant_dequant")
    return y


def direct_entries(n: int) -> int:
    """NMAX of the DIRECT kernels for n routed entries: n padded to a power of
    two. Every program routes itself with NMAX x NMAX compares (~3 us at 16,
    ~1 us at 4: bench/trace_decode.py), so no more than n."""
    return _pow2_at_least(max(n, 2))


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


def _activation_args(activation):
    """(ACT constexpr, alpha, limit) of a spec.Activation: the kernels take the
    swiglu parameters as f32 arguments (0 for activations without them)."""
    params = dict(activation.params)
    return activation.code, float(params.get("alpha", 0.0)), float(params.get("limit", 0.0))


def moe(x, weights, topk_weights, topk_ids, expert_mask=None, *, spec, deterministic=False):
    """The layer (docs/DESIGN.md §1) for ``spec`` on an sm_90 GPU: y [T, H] in x's dtype."""
    # The kernels read the canonical layout and the sm90 one (contiguous
    # 64 x 128 tiles: faster, cuda_layout.py); any other is converted.
    w = weights if weights.layout == LAYOUT_NAME else weights.canonical()
    sm90 = w.layout == LAYOUT_NAME
    out_dtype = x.dtype
    T, H = x.shape
    K = topk_ids.shape[1]
    E, I = w.num_experts, w.intermediate
    n = T * K
    direct = n <= DIRECT_MAX and expert_mask is None
    cfg = choose_config(T, K, E, H, I, deterministic=deterministic, direct=direct)
    if cfg.prefill is not None and not direct and config.prefill_supported(
            cfg.prefill, I=I, gate_up=w.gate_up, layout=w.layout):
        return _prefill(x, w, topk_weights, topk_ids, expert_mask, cfg, spec=spec,
                        deterministic=deterministic)
    BM = cfg.block_m
    g1, g2 = cfg.gemm1, cfg.gemm2
    grid_m = sorting.max_blocks(n, E, BM)
    fmt = spec.mode.code
    a_fmt = fmt
    if fmt and not g1.fuse_x_quant:
        x = _quant_dequant(x, fp8=spec.mode.act_format == "mxfp8")
        a_fmt = layer_spec.BF16_CODE
    act, alpha, limit = _activation_args(spec.activation)
    # The 2**126 of the kernels' raw E2M1 bits rides on the scales when every
    # scale byte is small enough (known when the weights were built).
    fold = w.scale_max is not None and w.scale_max <= FOLD_MAX_SCALE_BYTE
    if direct:  # the kernels route from topk_ids themselves (moe_gemm.py DIRECT)
        ids = topk_ids.astype(jnp.int32).reshape(-1)
        tw = topk_weights.astype(jnp.float32).reshape(-1)
        nmax = direct_entries(n)
        if not deterministic:
            return _decode(x, w, ids, tw, cfg, grid_m, nmax, a_fmt, fmt, act, fold, sm90,
                           out_dtype, alpha, limit)
        route1 = [ids, None, None]  # sid (topk_ids), sexp, nv: none in DIRECT
        route2 = [ids, tw, None, None]  # sid, sw (topk_weights), sexp, nv
        P = grid_m * BM
    else:
        nmax = 1
        n_sort = E if expert_mask is None else expert_mask.shape[0]
        s = sort(topk_ids, topk_weights, num_experts=n_sort, block_m=BM, expert_mask=expert_mask)
        route1 = [s.sorted_token_ids, s.sorted_expert_ids, s.num_valid]
        route2 = [s.sorted_token_ids, s.sorted_weights, s.sorted_expert_ids, s.num_valid]
        P = s.sorted_token_ids.shape[0]
        grid_m = min(sorting.num_blocks(T, K, n_sort, BM), grid_m)
    grid1 = (-(-I // g1.block_n), grid_m, g1.split_k)
    grid2 = (-(-H // g2.block_n), grid_m, g2.split_k)

    k1 = kernel("moe_gemm", "moe_gemm1", num_warps=g1.num_warps, num_stages=g1.num_stages,
                x_dtype=TRITON_DTYPE[jnp.dtype(x.dtype).name],
                BM=BM, BN=g1.block_n, BK=g1.block_k, A_FMT=a_fmt, OUT_FMT=fmt, ACT=act,
                INTERLEAVED=w.gate_up == "interleaved", HAS_BIAS=w.b1 is not None,
                SWAP=g1.swap, SPLIT_K=g1.split_k, FOLD=fold, EVEN_K=H % g1.block_k == 0,
                DIRECT=direct, NMAX=nmax, TILED=sm90)
    outs1 = [jax.ShapeDtypeStruct((P, I), jnp.bfloat16)]
    part = None
    if g1.split_k > 1:  # zeroed: partial sums per routed entry, then a counter per tile
        part = ffi.Out(1)
        outs1.append(jax.ShapeDtypeStruct((n * 2 * I + grid1[0] * grid_m,), jnp.float32))
    inter = launch(
        k1, grid1,
        [x, w.w1, w.w1_scale, w.b1, *route1, ffi.Out(0), part, T, H, I, E, K, alpha, limit],
        outs1, zero_outputs=(1,) if g1.split_k > 1 else (), name="moe_gemm1")[0]

    k2 = kernel("moe_gemm", "moe_gemm2", num_warps=g2.num_warps, num_stages=g2.num_stages,
                BM=BM, BN=g2.block_n, BK=g2.block_k, SPLIT_K=g2.split_k,
                HAS_BIAS=w.b2 is not None, DETERMINISTIC=bool(deterministic), SWAP=g2.swap,
                FOLD=fold, EVEN_K=I % g2.block_k == 0, DIRECT=direct, NMAX=nmax,
                TILED=sm90)
    y_shape = (T, K, H) if deterministic else (T, H)
    (acc,) = launch(k2, grid2,
                    [inter, w.w2, w.w2_scale, w.b2, *route2, ffi.Out(0), T, H, I, E, K],
                    [jax.ShapeDtypeStruct(y_shape, jnp.float32)], zero_outputs=(0,),
                    name="moe_gemm2")
    if deterministic:
        acc = functools.reduce(lambda a, b: a + b, [acc[:, j] for j in range(K)])
    return acc.astype(out_dtype)


def _prefill(x, w, topk_weights, topk_ids, expert_mask, cfg, *, spec, deterministic):
    """The layer through the Gluon wgmma kernels (cuda/kernels/moe_wgmma.py):
    sort -> x gathered into sorted order (and MX-quantised; moe_gather) ->
    gemm1 -> gemm2 (atomic f32 y, or per-slot y [T, k, H] summed in slot
    order) -> cast. Persistent grids: at most one CTA per SM (each holds
    ~190 KB of shared memory), never more than the units any routing fills."""
    pc = cfg.prefill
    out_dtype = x.dtype
    T, H = x.shape
    K = topk_ids.shape[1]
    E, I = w.num_experts, w.intermediate
    BM = cfg.block_m
    n_sort = E if expert_mask is None else expert_mask.shape[0]
    s = sort(topk_ids, topk_weights, num_experts=n_sort, block_m=BM, expert_mask=expert_mask)
    sid, sw, sexp, nv = s
    P = sid.shape[0]
    grid_m = min(sorting.num_blocks(T, K, n_sort, BM), sorting.max_blocks(T * K, E, BM))
    fmt = spec.mode.code
    act, alpha, limit = _activation_args(spec.activation)
    fold = w.scale_max is not None and w.scale_max <= FOLD_MAX_SCALE_BYTE
    rows, cols = 16, 256
    gather = kernel("moe_gather", "moe_gather", num_warps=4,
                    x_dtype=TRITON_DTYPE[jnp.dtype(x.dtype).name], BLOCK_R=rows, BLOCK_K=cols,
                    A_FMT=fmt)
    (xs,) = launch(gather, (-(-P // rows), -(-H // cols), 1), [x, sid, nv, ffi.Out(0), T, H, P],
                   [jax.ShapeDtypeStruct((P, H), jnp.bfloat16)], name="moe_gather")
    common = dict(num_warps=BM // 16, maxnreg=pc.maxnreg, BM=BM, BN=pc.block_n, BK=64,
                  STAGES=pc.stages, W_STAGES=pc.w_stages, GROUP_M=pc.group_m, FOLD=fold,
                  PRODUCER_REGS=pc.producer_regs)
    k1 = kernel("moe_wgmma", "moe_wgmma_gemm1", ACT=act, OUT_FMT=fmt,
                INTERLEAVED=w.gate_up == "interleaved", HAS_BIAS=w.b1 is not None, **common)
    grid1 = (min(config.NUM_SMS, grid_m * -(-I // (pc.block_n // 2))), 1, 1)
    (inter,) = launch(k1, grid1,
                      [xs, w.w1, w.w1_scale, w.b1, sid, sexp, nv,
                       ffi.Out(0), P, H, I, E, alpha, limit],
                      [jax.ShapeDtypeStruct((P, I), jnp.bfloat16)], name="moe_wgmma_gemm1")
    k2 = kernel("moe_wgmma", "moe_wgmma_gemm2", HAS_BIAS=w.b2 is not None,
                DETERMINISTIC=bool(deterministic), **common)
    grid2 = (min(config.NUM_SMS, grid_m * -(-H // pc.block_n)), 1, 1)
    y_shape = (T, K, H) if deterministic else (T, H)
    (acc,) = launch(k2, grid2,
                    [inter, w.w2, w.w2_scale, w.b2, sid, sw, sexp, nv,
                     ffi.Out(0), P, T, H, I, E, K],
                    [jax.ShapeDtypeStruct(y_shape, jnp.float32)], zero_outputs=(0,),
                    name="moe_wgmma_gemm2")
    if deterministic:
        acc = functools.reduce(lambda a, b: a + b, [acc[:, j] for j in range(K)])
    return acc.astype(out_dtype)


# moe_decode's row-block counters, int32 apart: one 128-byte line each, since
# every gemm2 program of a block polls its counter (with all of them on one
# line, gemm2's programs got past their wait ~1.5 us later at gpt-oss-120b
# T=1: bench/NOTES.md, Session 7).
_SYNC_STRIDE = 32


def _decode(x, w, ids, tw, cfg, grid_m, nmax, a_fmt, fmt, act, fold, sm90, out_dtype, alpha,
            limit, trace=False):
    """The layer at decode size as one launch of moe_decode.moe_decode: gemm1's
    programs, then gemm2's, which wait for gemm1's tiles; one scratch holds
    gemm1's split-K sums and counters, y (f32), gemm2's counters, the
    launch's ticket and a counter per row block. The kernel leaves the
    scratch all zero, so it is a launcher workspace (ffi.Workspace: zeroed
    once, no memset before each launch). Both gemms run with gemm1's warps,
    stages and operand order (the table keeps them equal).
    trace: also return each program's times (moe_decode TRACE): uint32
    [programs, 16], int64 [programs, 8] viewed on the host: start, routed,
    ready, end (ns), SM; the scratch is then a zeroed result that holds them."""
    T, H = x.shape
    E, I, K = w.num_experts, w.intermediate, ids.shape[0] // T
    BM, g1, g2 = cfg.block_m, cfg.gemm1, cfg.gemm2
    n1, n2 = -(-I // g1.block_n), -(-H // g2.block_n)
    cnt1_off = _pad16(T * K * 2 * I if g1.split_k > 1 else 0)
    y_off = _pad16(cnt1_off + n1 * grid_m)
    cnt2_off = _pad16(y_off + T * H)
    sync_off = -(-(cnt2_off + n2) // _SYNC_STRIDE) * _SYNC_STRIDE  # line-aligned
    sync_end = sync_off + _SYNC_STRIDE * (1 + grid_m)
    grid = (n1 * grid_m * g1.split_k + n2 * grid_m * g2.split_k, 1, 1)
    slots = config.NUM_SMS * config.programs_per_sm(cfg.decode_maxnreg,
                                                                g1.num_warps)
    slice1 = config.gemm1_slice_steps(-(-H // g1.block_k), g1.split_k,
                                            n1 * grid_m * g1.split_k, slots)
    kern = kernel("moe_decode", "moe_decode", num_warps=g1.num_warps, num_stages=g1.num_stages,
                  maxnreg=cfg.decode_maxnreg,
                  x_dtype=TRITON_DTYPE[jnp.dtype(x.dtype).name],
                  out_dtype=TRITON_DTYPE[jnp.dtype(out_dtype).name],
                  BM=BM, BN1=g1.block_n, BK1=g1.block_k, SPLIT1=g1.split_k, BN2=g2.block_n,
                  BK2=g2.block_k, SPLIT2=g2.split_k, A_FMT=a_fmt, OUT_FMT=fmt, ACT=act,
                  INTERLEAVED=w.gate_up == "interleaved", HAS_BIAS1=w.b1 is not None,
                  HAS_BIAS2=w.b2 is not None, SWAP=g1.swap, FOLD=fold,
                  EVEN_K1=H % g1.block_k == 0, EVEN_K2=I % g2.block_k == 0, NMAX=nmax,
                  CAST_T=_pow2_at_least(max(T, 16)), TILED=sm90, TRACE=trace,
                  SLICE1=slice1, SYNC_STRIDE=_SYNC_STRIDE)
    b1, b2 = w.b1, w.b2
    trace_off = _pad16(sync_end)  # moe_gemm._trace's offset
    inter_type = jax.ShapeDtypeStruct((grid_m * BM, I), jnp.bfloat16)
    out_type = jax.ShapeDtypeStruct((T, H), out_dtype)
    args = [x, w.w1, w.w1_scale, b1, w.w2, w.w2_scale, b2, ids, tw, ffi.Out(0), None,
            ffi.Out(1), T, H, I, E, K, grid_m, cnt1_off, y_off, cnt2_off, sync_off, alpha, limit]
    if not trace:
        args[10] = ffi.Workspace(4 * sync_end)
        return launch(kern, grid, args, [inter_type, out_type], name="moe_decode")[1]
    args[10] = ffi.Out(2)
    _, out, s = launch(kern, grid, args,
                       [inter_type, out_type,
                        jax.ShapeDtypeStruct((trace_off + 16 * grid[0],), jnp.float32)],
                       zero_outputs=(2,), name="moe_decode")
    # int64 fields as uint32 pairs (x64 may be off): view them on the host
    return out, jax.lax.bitcast_convert_type(s[trace_off:], jnp.uint32).reshape(grid[0], 16)


# ---------------------------------------------------------------------------
# The grouped matmul of the layer's derivative (layer/autodiff.py gmm_p)
# ---------------------------------------------------------------------------

GMM_LAYOUTS = ("canonical", LAYOUT_NAME)


def unsupported_gmm(params) -> str | None:
    """Why the grouped-matmul kernels cannot run gmm_p with these params, or
    None (the lowering then runs autodiff.gmm_jnp instead)."""
    if params["layout"] not in GMM_LAYOUTS:
        return (f"layout {params['layout']!r}: the CUDA grouped-matmul kernels read "
                f"{' and '.join(GMM_LAYOUTS)} weights")
    if params["block_m"] not in layer_spec.BLOCK_SIZES:
        return f"block_m {params['block_m']}: the kernels take blocks of {layer_spec.BLOCK_SIZES} rows"
    return _platform_unsupported()


def unsupported_sort(block_m: int) -> str | None:
    """Why sort (the kernels) cannot give the derivative's sort here, or None."""
    if block_m not in layer_spec.BLOCK_SIZES:
        return f"block_m {block_m}: the sort kernels take blocks of {layer_spec.BLOCK_SIZES} rows"
    return _platform_unsupported()


def _live_first(block_expert):
    """(the row blocks with the live ones (expert >= 0) first, in order; their
    count as int32 [1])."""
    dead = (block_expert < 0).astype(jnp.int32)
    order = jnp.argsort(dead, stable=True).astype(jnp.int32)
    return order, (dead.shape[0] - jnp.sum(dead)).astype(jnp.int32).reshape(1)


def gmm(lhs, block_expert, w, w_scale, *, which, layer_dims, layout, block_m, transpose,
        scale_max):
    """gmm_p on an sm_90 GPU (autodiff.gmm_jnp's contract): f32 [P, N] =
    lhs [P, K] @ W[e]^T per block of block_m rows (transpose: [P, K] =
    lhs [P, N] @ W[e]), rows of blocks whose expert is -1 zero. lhs goes to
    the tensor cores as bf16 (converted here: XLA fuses the cast into the
    op that makes lhs); the upcast of W with its scales is exact."""
    dims = dict(layer_dims)
    E, H, I = dims["num_experts"], dims["hidden"], dims["intermediate"]
    N_w, K_w = (2 * I, H) if which == "w1" else (H, I)
    P = lhs.shape[0]
    NB = block_expert.shape[0]
    if P != NB * block_m:
        raise ValueError(f"lhs: expected {NB} * {block_m} rows, got {P}")
    n_out = K_w if transpose else N_w
    if P == 0:
        return jnp.zeros((0, n_out), jnp.float32)
    a = lhs.astype(jnp.bfloat16)
    be = block_expert.astype(jnp.int32)
    fold = scale_max is not None and scale_max <= FOLD_MAX_SCALE_BYTE
    cfg = config.gmm_config(block_m, transpose=transpose, layout=layout)
    out_type = [jax.ShapeDtypeStruct((P, n_out), jnp.float32)]
    if cfg.wgmma is not None:
        pc = cfg.wgmma
        order, n_live = _live_first(be)
        kern = kernel("moe_gmm_wgmma", "moe_gmm_wgmma", num_warps=cfg.num_warps,
                      maxnreg=pc.maxnreg, BM=block_m, BN=cfg.block_n, BK=cfg.block_k,
                      STAGES=pc.stages, W_STAGES=pc.w_stages, GROUP_M=pc.group_m,
                      TRANSPOSE=bool(transpose), FOLD=fold, PRODUCER_REGS=pc.producer_regs)
        grid = (min(config.NUM_SMS, NB * -(-n_out // cfg.block_n)), 1, 1)
        return launch(kern, grid, [a, be, order, n_live, w, w_scale, ffi.Out(0), P, NB, N_w, K_w,
                                   E], out_type, name="moe_gmm_wgmma")[0]
    kern = kernel("moe_gmm", "moe_gmm", num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                  BM=block_m, BN=cfg.block_n, BK=cfg.block_k, TRANSPOSE=bool(transpose),
                  FOLD=fold, EVEN_K=not transpose and K_w % cfg.block_k == 0,
                  TILED=layout == LAYOUT_NAME)
    grid = (-(-n_out // cfg.block_n), NB, 1)
    return launch(kern, grid, [a, be, w, w_scale, ffi.Out(0), N_w, K_w], out_type,
                  name="moe_gmm")[0]

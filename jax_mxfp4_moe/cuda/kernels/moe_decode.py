"""The whole layer at decode size in one launch: gemm1's tiles, then gemm2's,
which wait on per-row-block counters of gemm1's tiles (moe_decode)."""

import triton
import triton.language as tl

from jax_mxfp4_moe.cuda.kernels.moe_gemm import gemm1_tile, gemm2_tile
from jax_mxfp4_moe.cuda.kernels.routing import direct_block, direct_entries


# ---------------------------------------------------------------------------
# Decode: the whole layer in one launch
# ---------------------------------------------------------------------------

@triton.jit
def _store_cast(y_ptr, out_ptr, T, H, pid_n, BN: tl.constexpr, CAST_T: tl.constexpr):
    """out[:, tile] = y[:, tile] in out's dtype, for column tile pid_n; y's
    tile is left at 0 (a workspace)."""
    t = tl.arange(0, CAST_T)
    cols = pid_n * BN + tl.arange(0, BN)
    offs = t[:, None] * H + cols[None, :]
    m = (t < T)[:, None] & (cols < H)[None, :]
    v = tl.load(y_ptr + offs, mask=m, other=0.0, cache_modifier=".cg")
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=m)
    tl.debug_barrier()  # every thread has read its part of y
    tl.store(y_ptr + offs, tl.zeros_like(v), mask=m)


@triton.jit
def _clock(x):
    """(%globaltimer in ns, %smid) after x (x orders the read)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;\nmov.u32 $1, %smid;", "=l,=r,r",
                                     [x], dtype=(tl.int64, tl.int32), is_pure=False, pack=1)


@triton.jit
def _trace(scratch_ptr, sync_off, grid_m, ticket, field, x, SYNC_STRIDE: tl.constexpr):
    """TRACE: the time of this point (field 0 start, 1 routed, 2 ready, 3
    end; 4 is the SM) into int64 [programs, 8] after the scratch's counters."""
    base = (sync_off + SYNC_STRIDE * (1 + grid_m) + 15) // 16 * 16
    ptr = (scratch_ptr + base).to(tl.pointer_type(tl.int64)) + ticket * 8
    t, sm = _clock(x)
    tl.store(ptr + field, t)
    if field == 0:
        tl.store(ptr + 4, sm.to(tl.int64))


# Spin until the int32 at $1 reaches $2: an acquire load per poll (it pairs
# with the releases that counted up to it, so no separate acquire is needed
# once the target is seen), ~0.25 us of sleep between polls (without
# flooding L2 with requests).
WAIT_AT_LEAST_ASM: tl.constexpr = tl.constexpr(
    "{ .reg .pred p;\nspin:\nld.acquire.gpu.global.b32 $0, [$1];\nsetp.lt.s32 p, $0, $2;\n"
    "@p nanosleep.u32 256;\n@p bra spin;\n}")


@triton.jit
def wait_at_least(ptr, target):
    """The int32 at ptr once it is >= target (acquire: what its writers
    released before counting up to it is visible after)."""
    return tl.inline_asm_elementwise(WAIT_AT_LEAST_ASM, "=r,l,r", [ptr, target], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def moe_decode(x_ptr, w1_ptr, w1s_ptr, b1_ptr, w2_ptr, w2s_ptr, b2_ptr, ids_ptr, tw_ptr,
               inter_ptr, scratch_ptr, out_ptr, T, H, I, E, TOPK, grid_m,
               cnt1_off, y_off, cnt2_off, sync_off, swiglu_alpha, swiglu_limit,
               BM: tl.constexpr, BN1: tl.constexpr, BK1: tl.constexpr, SPLIT1: tl.constexpr,
               BN2: tl.constexpr, BK2: tl.constexpr, SPLIT2: tl.constexpr,
               A_FMT: tl.constexpr, OUT_FMT: tl.constexpr, ACT: tl.constexpr,
               INTERLEAVED: tl.constexpr, HAS_BIAS1: tl.constexpr, HAS_BIAS2: tl.constexpr,
               SWAP: tl.constexpr, FOLD: tl.constexpr, EVEN_K1: tl.constexpr,
               EVEN_K2: tl.constexpr, NMAX: tl.constexpr, CAST_T: tl.constexpr,
               TILED: tl.constexpr, TRACE: tl.constexpr, SLICE1: tl.constexpr,
               SYNC_STRIDE: tl.constexpr):
    """The layer at decode size in one launch (one custom call, one kernel):
    both gemms route from topk_ids (direct_entries, direct_block; ids_ptr,
    tw_ptr flat).

    A 1-D grid of gemm1 programs (n1 * grid_m * SPLIT1) then gemm2 programs
    (n2 * grid_m * SPLIT2), each (column tile, K slice, row block) with the
    tile fastest and the block slowest. A program's role comes from a ticket
    taken at its start, not from its block index, so every gemm1 role is
    held by a started program before any gemm2 role is handed out: a gemm2
    program waits for gemm1's n1 tiles of its row block (a counter per
    block) without relying on the order in which the hardware starts blocks,
    and without deadlock. Blocks finish roughly in ticket order, all K
    slices of a block together, so gemm2 starts on the first blocks while
    gemm1 works on the last. gemm2 adds into y (f32); the last
    program to add into a column tile (a counter per tile) writes that tile
    of out in out's dtype.

    scratch (f32 / int32, all zero at the start): gemm1's split-K partial
    sums [T * TOPK, 2I] at 0, its tile counters at cnt1_off, y [T, H] at
    y_off, gemm2's column-tile counters at cnt2_off, then the ticket and a
    counter per row block at sync_off, SYNC_STRIDE int32 apart (gemm1's
    tiles done, then gemm2's programs past their wait; every gemm2 program
    of the block polls it, so each has its own cache line). Each of them is set back to 0 by its last
    user, so the launch leaves the scratch as it found it: it can be a
    workspace (ffi.Workspace) instead of a result zeroed before every launch.
    The TRACE fields after it are written whole.
    inter [grid_m * BM, I] bf16 is gemm1's output.
    SLICE1: K steps of each of gemm1's slices but the last (0: equal slices;
    cuda._decode shortens the last slice when gemm1's programs outnumber
    what the SMs hold, so that the last programs to start finish early).
    TRACE (profiling, bench/trace_decode.py): each program's start, routed,
    ready (gemm2: its wait is over) and end times and its SM, after sync."""
    sync = (scratch_ptr + sync_off).to(tl.pointer_type(tl.int32))
    # The routing loads go out before the ticket's round trip, not after it.
    ids, tws = direct_entries(ids_ptr, tw_ptr, T * TOPK, NMAX)
    ticket = tl.atomic_add(sync, 1, sem="relaxed")
    if ticket == tl.num_programs(0) - 1:
        tl.store(sync, 0)  # every ticket is taken
    if TRACE:
        _trace(scratch_ptr, sync_off, grid_m, ticket, 0, ticket, SYNC_STRIDE)
    n1 = tl.cdiv(I, BN1)
    n2 = tl.cdiv(H, BN2)
    p1 = n1 * grid_m * SPLIT1
    is_gemm1 = ticket < p1
    q = tl.where(is_gemm1, ticket, ticket - p1)
    nn = tl.where(is_gemm1, n1, n2)
    ns = tl.where(is_gemm1, SPLIT1, SPLIT2)
    pid_n = q % nn
    pid_s = (q // nn) % ns
    m = q // (nn * ns)
    rows, tok, slot, row_ok, expert, wgt, live = direct_block(ids, tws, T, TOPK, E, m, BM, NMAX)
    if TRACE:
        _trace(scratch_ptr, sync_off, grid_m, ticket, 1, live + expert, SYNC_STRIDE)
    y_ptr = scratch_ptr + y_off
    if is_gemm1:
        if m < live:
            count1 = (scratch_ptr + cnt1_off).to(tl.pointer_type(tl.int32)) + m * n1 + pid_n
            stored = gemm1_tile(x_ptr, w1_ptr, w1s_ptr, b1_ptr, inter_ptr, scratch_ptr, count1,
                                 rows, tok * TOPK + slot, tok, row_ok, expert, pid_n, pid_s, H,
                                 I, swiglu_alpha, swiglu_limit, BM, BN1, BK1, A_FMT, OUT_FMT,
                                 ACT, INTERLEAVED, HAS_BIAS1, SWAP, SPLIT1, FOLD, EVEN_K1,
                                 TILED, True, SLICE1)
            if stored:
                # The tile's stores are in before it is counted (release).
                tl.debug_barrier()
                tl.atomic_add(sync + SYNC_STRIDE * (1 + m), 1, sem="release")
    else:
        if m < live:
            wait_at_least(sync + SYNC_STRIDE * (1 + m), n1)
            # Counted past the wait (the counter only grows while others
            # wait on it): the block's last gemm2 program resets it.
            passed = tl.atomic_add(sync + SYNC_STRIDE * (1 + m), 1, sem="relaxed")
            if TRACE:
                _trace(scratch_ptr, sync_off, grid_m, ticket, 2, ticket, SYNC_STRIDE)
            acc, cols, col_ok = gemm2_tile(inter_ptr, w2_ptr, w2s_ptr, b2_ptr, rows, row_ok,
                                            expert, wgt, pid_n, pid_s, H, I, BM, BN2, BK2,
                                            SPLIT2, HAS_BIAS2, SWAP, FOLD, EVEN_K2,
                                            TILED)
            tl.atomic_add(y_ptr + tok[:, None] * H + cols[None, :], acc,
                          mask=row_ok[:, None] & col_ok[None, :], sem="relaxed")
            # As in gemm1's split-K: all of this program's adds are in before
            # its arrival is counted (release); the last one reads them all.
            tl.debug_barrier()
            count2 = (scratch_ptr + cnt2_off).to(tl.pointer_type(tl.int32)) + pid_n
            if tl.atomic_add(count2, 1, sem="acq_rel") == live * SPLIT2 - 1:
                _store_cast(y_ptr, out_ptr, T, H, pid_n, BN2, CAST_T)
                tl.store(count2, 0)
            if passed == n1 + n2 * SPLIT2 - 1:
                tl.store(sync + SYNC_STRIDE * (1 + m), 0)
        elif (live == 0) & (m == 0) & (pid_s == 0):
            _store_cast(y_ptr, out_ptr, T, H, pid_n, BN2, CAST_T)  # no entry: y stays 0
    if TRACE:
        tl.debug_barrier()
        _trace(scratch_ptr, sync_off, grid_m, ticket, 3, ticket, SYNC_STRIDE)

"""MoE sort on the GPU: the docs/DESIGN.md §3 sort contract ("opus" contract).

Entries i = t*k + j of topk_ids (flat) are grouped by expert in expert order,
within an expert by i (= by (token, slot)), each group padded to a multiple
of BM. The position of an entry is start[expert] + (entries of that expert
before it): counted per sub-chunk of SUB entries with an all-pairs compare,
with a running per-expert base kept in a small global scratch row (a CTA
barrier orders its stores and loads).

The sort stages: `moe_sort_oneshot` does everything in one program (T*k
up to cuda.config.SORT_ONESHOT_MAX_ENTRIES); past it, `moe_sort_count` (grid
over chunks: per-chunk histograms, padding fill) -> `moe_sort_offsets` (one
program: expert offsets, block expert ids, per-chunk bases) ->
`moe_sort_scatter` (grid over chunks).
"""

import triton
import triton.language as tl

from jax_mxfp4_moe import spec

TOKEN_BITS: tl.constexpr = tl.constexpr(spec.TOKEN_BITS)


@triton.jit
def _experts(ids_ptr, offs, hi, mask_ptr, E, HAS_MASK: tl.constexpr):
    """Expert of each entry, E for "not here" (out of range, masked, past hi)."""
    inb = offs < hi
    e = tl.load(ids_ptr + offs, mask=inb, other=-1)
    ok = inb & (e >= 0) & (e < E)
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + e, mask=ok, other=0) != 0)
    return tl.where(ok, e, E), ok


@triton.jit
def _count(ids_ptr, mask_ptr, lo, hi, E,
           HAS_MASK: tl.constexpr, SUB: tl.constexpr, NBINS: tl.constexpr):
    counts = tl.zeros((NBINS,), tl.int32)
    for s in range(lo, hi, SUB):
        e, ok = _experts(ids_ptr, s + tl.arange(0, SUB), hi, mask_ptr, E, HAS_MASK)
        counts += tl.histogram(e, NBINS)
    return counts


@triton.jit
def _fill_padding(sid_ptr, sw_ptr, lo, hi, pad, FILL: tl.constexpr):
    for p in range(lo, hi, FILL):
        offs = p + tl.arange(0, FILL)
        m = offs < hi
        tl.store(sid_ptr + offs, tl.full((FILL,), 0, tl.int32) + pad, mask=m)
        tl.store(sw_ptr + offs, tl.zeros((FILL,), tl.float32), mask=m)


@triton.jit
def _offsets(counts, mask_ptr, sexp_ptr, nv_ptr, T, E, NB,
            BM: tl.constexpr, NBINS: tl.constexpr, BLK: tl.constexpr,
            HAS_MASK: tl.constexpr):
    """Per-expert counts -> sorted_expert_ids, num_valid; returns expert starts."""
    bins = tl.arange(0, NBINS)
    counts = tl.where(bins < E, counts, 0)
    padded = (counts + BM - 1) // BM * BM
    end = tl.cumsum(padded, 0)
    start = end - padded
    total = tl.sum(padded, 0)
    if HAS_MASK:
        local = (tl.load(mask_ptr + bins, mask=bins < E, other=0) != 0).to(tl.int32)
    else:
        local = (bins < E).to(tl.int32)
    for b0 in range(0, NB, BLK):
        b = b0 + tl.arange(0, BLK)
        first = b * BM
        # Local id of a block's expert = local experts that end at or before it.
        before = (end[None, :] <= first[:, None]).to(tl.int32) * local[None, :]
        lid = tl.sum(before, 1)
        tl.store(sexp_ptr + b, tl.where(first < total, lid, -1), mask=b < NB)
    tl.store(nv_ptr, total)
    tl.store(nv_ptr + 1, T)
    return start


@triton.jit
def _scatter(ids_ptr, w_ptr, mask_ptr, sid_ptr, sw_ptr, run_ptr, lo, hi, K, E,
             HAS_MASK: tl.constexpr, SUB: tl.constexpr, NBINS: tl.constexpr):
    """Place entries [lo, hi); run_ptr[e] holds the next free position of e."""
    i = tl.arange(0, SUB)
    bins = tl.arange(0, NBINS)
    for s in range(lo, hi, SUB):
        offs = s + i
        e, ok = _experts(ids_ptr, offs, hi, mask_ptr, E, HAS_MASK)
        earlier = (e[:, None] == e[None, :]) & (i[None, :] < i[:, None])
        rank = tl.sum(earlier.to(tl.int32), 1)
        pos = tl.load(run_ptr + e) + rank
        tok = offs // K
        slot = offs - tok * K
        tl.store(sid_ptr + pos, (slot << TOKEN_BITS) | tok, mask=ok)
        tl.store(sw_ptr + pos, tl.load(w_ptr + offs, mask=ok, other=0.0), mask=ok)
        run = tl.load(run_ptr + bins) + tl.histogram(e, NBINS)
        tl.debug_barrier()
        tl.store(run_ptr + bins, run)
        tl.debug_barrier()


@triton.jit
def moe_sort_oneshot(ids_ptr, w_ptr, mask_ptr, sid_ptr, sw_ptr, sexp_ptr, nv_ptr, run_ptr,
                 T, K, E, P, NB,
                 BM: tl.constexpr, NBINS: tl.constexpr, SUB: tl.constexpr,
                 BLK: tl.constexpr, FILL: tl.constexpr, HAS_MASK: tl.constexpr):
    """Whole sort in one program. run_ptr: int32 scratch [NBINS]."""
    n = T * K
    counts = _count(ids_ptr, mask_ptr, 0, n, E, HAS_MASK, SUB, NBINS)
    start = _offsets(counts, mask_ptr, sexp_ptr, nv_ptr, T, E, NB, BM, NBINS, BLK, HAS_MASK)
    _fill_padding(sid_ptr, sw_ptr, 0, P, (K << TOKEN_BITS) | T, FILL)
    tl.store(run_ptr + tl.arange(0, NBINS), start)
    tl.debug_barrier()
    _scatter(ids_ptr, w_ptr, mask_ptr, sid_ptr, sw_ptr, run_ptr, 0, n, K, E, HAS_MASK, SUB, NBINS)


@triton.jit
def moe_sort_count(ids_ptr, mask_ptr, sid_ptr, sw_ptr, counts_ptr, T, K, E, P, CHUNK,
                   NBINS: tl.constexpr, SUB: tl.constexpr, FILL: tl.constexpr,
                   HAS_MASK: tl.constexpr):
    """Program c: histogram of entries [c*CHUNK, (c+1)*CHUNK), and padding
    values into its share of the P output slots."""
    c = tl.program_id(0)
    n = T * K
    lo = c * CHUNK
    counts = _count(ids_ptr, mask_ptr, lo, tl.minimum(lo + CHUNK, n), E, HAS_MASK, SUB, NBINS)
    tl.store(counts_ptr + c * NBINS + tl.arange(0, NBINS), counts)
    share = tl.cdiv(P, tl.num_programs(0))
    _fill_padding(sid_ptr, sw_ptr, c * share, tl.minimum(c * share + share, P), (K << TOKEN_BITS) | T, FILL)


@triton.jit
def moe_sort_offsets(counts_ptr, mask_ptr, sexp_ptr, nv_ptr, run_ptr, T, E, NB, NCHUNK,
                    BM: tl.constexpr, NBINS: tl.constexpr, BLK: tl.constexpr,
                    HAS_MASK: tl.constexpr, GROUP: tl.constexpr):
    """One program: totals -> layout; run_ptr[c, e] = first position of chunk
    c's entries of e. Reads GROUP chunks' histograms per load (one round trip
    per group, not per chunk)."""
    bins = tl.arange(0, NBINS)
    g = tl.arange(0, GROUP)
    counts = tl.zeros((NBINS,), tl.int32)
    for c0 in range(0, NCHUNK, GROUP):
        rows = (c0 + g)[:, None] * NBINS + bins[None, :]
        counts += tl.sum(tl.load(counts_ptr + rows, mask=(c0 + g < NCHUNK)[:, None], other=0), 0)
    base = _offsets(counts, mask_ptr, sexp_ptr, nv_ptr, T, E, NB, BM, NBINS, BLK, HAS_MASK)
    for c0 in range(0, NCHUNK, GROUP):
        rows = (c0 + g)[:, None] * NBINS + bins[None, :]
        ok = (c0 + g < NCHUNK)[:, None]
        h = tl.load(counts_ptr + rows, mask=ok, other=0)
        tl.store(run_ptr + rows, base[None, :] + tl.cumsum(h, 0) - h, mask=ok)
        base += tl.sum(h, 0)


@triton.jit
def moe_sort_scatter(ids_ptr, w_ptr, mask_ptr, sid_ptr, sw_ptr, run_ptr, T, K, E, CHUNK,
                     NBINS: tl.constexpr, SUB: tl.constexpr, HAS_MASK: tl.constexpr):
    c = tl.program_id(0)
    lo = c * CHUNK
    _scatter(ids_ptr, w_ptr, mask_ptr, sid_ptr, sw_ptr, run_ptr + c * NBINS, lo,
             tl.minimum(lo + CHUNK, T * K), K, E, HAS_MASK, SUB, NBINS)

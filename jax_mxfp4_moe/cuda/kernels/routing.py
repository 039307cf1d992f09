"""Routing inside the GEMM kernels: which sorted rows a program's row block holds.

A block of BM rows comes from the sort contract (docs/DESIGN.md §3; built by
the sort kernels) or, at decode size (DIRECT: at most NMAX (token, slot)
entries), from topk_ids itself: every program derives the blocks the
contract would give (experts in order of first appearance, which no consumer
depends on).  Entries pack (slot << TOKEN_BITS) | token (spec.pack_entry).
"""

import triton
import triton.language as tl

from jax_mxfp4_moe import spec

TOKEN_BITS: tl.constexpr = tl.constexpr(spec.TOKEN_BITS)
TOKEN_MASK: tl.constexpr = tl.constexpr(spec.TOKEN_MASK)


@triton.jit
def block_rows(sid_ptr, sexp_ptr, T, m, used, BM: tl.constexpr):
    """Block m of a sort contract built by the sort kernels. Only rows below
    used = num_valid[0] are read: the last block of the grid may reach past
    sorted_token_ids (P is rarely a multiple of BM), and blocks past used hold
    nothing (their rows read as padding, token T)."""
    rows = m * BM + tl.arange(0, BM)
    packed = tl.load(sid_ptr + rows, mask=rows < used, other=T)
    tok = packed & TOKEN_MASK
    slot = packed >> TOKEN_BITS
    expert = tl.load(sexp_ptr + m)
    return rows, tok, slot, tok < T, expert


@triton.jit
def direct_entries(ids_ptr, tw_ptr, n, NMAX: tl.constexpr):
    """The n <= NMAX routed entries' expert ids (-1 past n) and weights.
    Loaded apart from direct_block so that a caller can issue both loads
    before other round trips (moe_decode's ticket)."""
    i = tl.arange(0, NMAX)
    e = tl.load(ids_ptr + i, mask=i < n, other=-1)
    w = tl.load(tw_ptr + i, mask=i < n, other=0.0)
    return e, w


@triton.jit
def direct_block(e, tw, T, K, E, m, BM: tl.constexpr, NMAX: tl.constexpr):
    """Block m of the sort contract, computed from the entries' expert ids e
    and weights tw (direct_entries; n = T*K <= NMAX of them): experts in
    order of first appearance, each expert's entries in (token, slot) order,
    ceil(count / BM) blocks each. Returns rows, tok, slot, row_ok, expert,
    weight of each row, and the number of blocks in use."""
    n = T * K
    i = tl.arange(0, NMAX)
    ok = (i < n) & (e >= 0) & (e < E)
    # A valid id never equals an invalid one, so `same` needs no ok mask:
    # every use below selects valid entries (ok, first) itself.
    same = e[:, None] == e[None, :]
    dup = tl.sum((same & (i[None, :] < i[:, None])).to(tl.int32), 1)  # rank in its expert
    first = ok & (dup == 0)
    nblk = tl.where(first, (tl.sum(same.to(tl.int32), 1) + BM - 1) // BM, 0)
    start = tl.cumsum(nblk, 0) - nblk  # first block of each expert (at its first entry)
    blk = tl.sum(tl.where(same & first[None, :], start[None, :], 0), 1) + dup // BM
    r = tl.arange(0, BM)
    sel = (ok & (blk == m))[None, :] & ((dup % BM)[None, :] == r[:, None])  # [BM, NMAX]
    row_ok = tl.sum(sel.to(tl.int32), 1) > 0
    tok = tl.sum(tl.where(sel, i[None, :] // K, 0), 1)
    slot = tl.sum(tl.where(sel, i[None, :] % K, 0), 1)
    wgt = tl.sum(tl.where(sel, tw[None, :], 0.0), 1)
    expert = tl.sum(tl.where(ok & (blk == m) & (dup % BM == 0), e, 0), 0)
    return m * BM + r, tl.where(row_ok, tok, T), slot, row_ok, expert, wgt, tl.sum(nblk, 0)


@triton.jit
def direct_rows(ids_ptr, tw_ptr, T, K, E, m, BM: tl.constexpr, NMAX: tl.constexpr):
    """direct_block of block m, loading the entries from topk_ids and
    topk_weights (flat)."""
    e, tw = direct_entries(ids_ptr, tw_ptr, T * K, NMAX)
    return direct_block(e, tw, T, K, E, m, BM, NMAX)


@triton.jit
def route(sid_ptr, sw_ptr, sexp_ptr, nv_ptr, T, TOPK, E, m, BM: tl.constexpr,
           NMAX: tl.constexpr, DIRECT: tl.constexpr, WEIGHTS: tl.constexpr):
    """Block m's rows, from topk_ids (DIRECT: sid/sw hold topk_ids and
    topk_weights, flat) or from the sort contract: rows, tok, slot, row_ok,
    expert, each row's routing weight (0 unless WEIGHTS or DIRECT), and
    whether the block holds entries (programs of empty blocks return)."""
    if DIRECT:
        rows, tok, slot, row_ok, expert, wgt, live = direct_rows(sid_ptr, sw_ptr, T, TOPK, E, m,
                                                                  BM, NMAX)
        active = m < live
    else:
        used = tl.load(nv_ptr)
        rows, tok, slot, row_ok, expert = block_rows(sid_ptr, sexp_ptr, T, m, used, BM)
        active = m * BM < used
        if WEIGHTS:
            wgt = tl.load(sw_ptr + rows, mask=rows < used, other=0.0)
        else:
            wgt = tl.zeros((BM,), tl.float32)
    return rows, tok, slot, row_ok, expert, wgt, active

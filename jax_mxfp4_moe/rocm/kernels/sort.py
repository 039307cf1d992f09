"""MoE sort (docs/DESIGN.md §3 contract) for gfx950: one launch, or three for large T.

Counting sort over the T*k routed (token, slot) entries in flat order
i = token * k + slot, 64 entries per wave step.  Entries of one step that go
to the same expert find each other with 64-bit ballots over the bits of their
key (the expert, or E for "not here"), so a lane's rank among equal keys of
lower lanes is a popcount and the order within an expert is the flat order.
Phases:

1. count entries per expert (the lowest lane of each key group adds the group);
2. padded prefix offsets in expert order, local expert ids (mask), num_valid:
   lane l owns the ceil(E / 64) consecutive experts from l * ceil(E / 64),
   and an inclusive scan over the 64 lanes in LDS (six steps) gives each
   lane the start of its first expert (no serial loop over E);
3. padding entries, per-block expert ids, and the unused tail;
4. scatter each entry to cursor[e] + rank and advance cursor[e].

``oneshot`` (decode sizes): one wave does all four in LDS.  For large T the
entries are cut into chunks of ``CHUNK`` and three launches share the work:
``count`` (one wave per chunk: phase 1 into ws_counts[chunk, E]), ``offsets``
(one wave: phases 2-3 and each chunk's start per expert, ws_base[chunk, E]),
``scatter`` (one wave per chunk: phase 4 from ws_base).  Both give the same
bytes.  Out-of-range ids and masked experts are dropped; every store is
bounded by its buffer's size.
"""

import flydsl.compiler as flyc
import flydsl.expr as fx
from flydsl.expr import gpu

from jax_mxfp4_moe.numerics.sorting import SORT_STAGES as STAGES
from jax_mxfp4_moe.rocm import geometry as ix
from jax_mxfp4_moe.rocm.kernels import common as c
from jax_mxfp4_moe.spec import BLOCK_SIZES, TOKEN_BITS

BLOCK = ix.SORT_BLOCK
CHUNK = ix.SORT_CHUNK


def kernel_name(*, num_experts, top_k, block_m, has_mask, stage="oneshot"):
    return (f"moe_sort_{stage}_e{num_experts}_k{top_k}_bm{block_m}"
            + ("_mask" if has_mask else ""))


class _Keys:
    """Per-entry expert keys and ballot groups (emit IR; E, mask static)."""

    def __init__(self, E, has_mask):
        self.E = E
        self.has_mask = has_mask
        self.bits = E.bit_length()  # keys 0..E, E meaning "not here"

    def key(self, ids_b, mask_b, i, n):
        """Expert of flat entry i, or E when it is past n, out of range or masked."""
        valid = i < n
        e = c.load(ids_b, valid.select(i, fx.Int32(0)) * 4, 4)
        ok = valid & (e >= fx.Int32(0)) & (e < fx.Int32(self.E))
        if self.has_mask:
            m = c.load(mask_b, ok.select(e, fx.Int32(0)) * 4, 4)
            ok = ok & (m != fx.Int32(0))
        return ok.select(e, fx.Int32(self.E))

    def group(self, key, lane):
        """(mask of lanes with the same key, rank among lower lanes)."""
        group = c.ballot(fx.Int32(0) == fx.Int32(0))
        for b in range(self.bits):
            bit = (key >> fx.Int32(b)) & fx.Int32(1)
            bal = c.ballot(bit != fx.Int32(0))
            group = group & (bit != fx.Int32(0)).select(bal, ~bal)
        below = (fx.Int64(1) << fx.Int64(lane)) - fx.Int64(1)
        return group, c.popcount64(group & below)


def _check(E, K, BM):
    if E <= 0 or E > 1024:
        raise ValueError(f"num_experts: expected 1..1024, got {E}")
    if K <= 0 or K > 64:
        raise ValueError(f"top_k: expected 1..64, got {K}")
    if BM not in BLOCK_SIZES:
        raise ValueError(f"block_m: expected one of {BLOCK_SIZES}, got {BM}")


def build(*, num_experts, top_k, block_m, has_mask, stage="oneshot"):
    E, K, BM = int(num_experts), int(top_k), int(block_m)
    _check(E, K, BM)
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {STAGES}, got {stage!r}")
    name = kernel_name(num_experts=E, top_k=K, block_m=BM, has_mask=has_mask, stage=stage)
    keys = _Keys(E, has_mask)
    e_steps = (E + BLOCK - 1) // BLOCK
    chunk_steps = CHUNK // BLOCK
    G = e_steps  # phase 2: consecutive experts per lane
    SCAN_STEPS = BLOCK.bit_length() - 1  # log2 of the lanes
    BM_LOG = BM.bit_length() - 1  # BM is a power of two (BLOCK_SIZES)

    @fx.struct
    class Shared:
        count: fx.Array[fx.Int32, E, 16]
        offset: fx.Array[fx.Int32, E, 16]
        local: fx.Array[fx.Int32, E, 16]
        scan: fx.Array[fx.Int32, BLOCK, 16]
        nscan: fx.Array[fx.Int32, BLOCK, 16]

    def sizes(tokens):
        n = tokens * K
        P = n + (E * BM - K)
        return n, P, (P + (BM - 1)) // BM, (n + (CHUNK - 1)) // CHUNK

    @flyc.jit
    def offsets_and_fills(lds, mask_b, sid_b, sw_b, se_b, nv_b, tokens, lane):
        """Phases 2-3 from lds.count; leaves the start of each expert in lds.offset.

        Phase 2 in parallel: lane l owns the G consecutive experts l*G ..
        l*G + G - 1; its padded rows (and, with a mask, its active experts) go
        through an inclusive scan over the 64 lanes in LDS (Hillis-Steele,
        six steps), so each lane's exclusive prefix starts its experts."""
        count, offset, local = lds.count.ptr, lds.offset.ptr, lds.local.ptr
        scan, nscan = lds.scan.ptr, lds.nscan.ptr
        n, P, nblocks, _ = sizes(tokens)
        sentinel = (K << TOKEN_BITS) | tokens
        pads = []
        acts = []
        psum = fx.Int32(0)
        asum = fx.Int32(0)
        for g in fx.range_constexpr(G):
            eg = lane * G + g
            ok = eg < fx.Int32(E)
            cnt = ok.select(c.lds_load(count, ok.select(eg, fx.Int32(0))), fx.Int32(0))
            padded_g = (cnt + fx.Int32(BM - 1)) & fx.Int32(-BM)
            pads.append(padded_g)
            psum = psum + padded_g
            if has_mask:
                m = c.load(mask_b, ok.select(eg, fx.Int32(0)) * 4, 4)
                act = (ok & (m != fx.Int32(0))).select(fx.Int32(1), fx.Int32(0))
                acts.append(act)
                asum = asum + act
        incl = psum
        nincl = asum
        c.lds_store(scan, lane, incl)
        if has_mask:
            c.lds_store(nscan, lane, nincl)
        gpu.barrier()
        for d in fx.range_constexpr(SCAN_STEPS):
            has = lane >= fx.Int32(1 << d)
            src = has.select(lane - fx.Int32(1 << d), lane)
            incl = incl + has.select(c.lds_load(scan, src), fx.Int32(0))
            if has_mask:
                nincl = nincl + has.select(c.lds_load(nscan, src), fx.Int32(0))
            gpu.barrier()
            c.lds_store(scan, lane, incl)
            if has_mask:
                c.lds_store(nscan, lane, nincl)
            gpu.barrier()
        run = incl - psum
        nlocal = nincl - asum
        for g2 in fx.range_constexpr(G):
            eg2 = lane * G + g2
            if eg2 < fx.Int32(E):
                c.lds_store(offset, eg2, run)
                if has_mask:
                    c.lds_store(local, eg2, (acts[g2] != fx.Int32(0)).select(nlocal, fx.Int32(-1)))
                else:
                    c.lds_store(local, eg2, eg2)
            run = run + pads[g2]
            if has_mask:
                nlocal = nlocal + acts[g2]
        total = c.lds_load(scan, fx.Int32(BLOCK - 1))
        if lane == fx.Int32(0):
            c.store(nv_b, 0, total, 4)
            c.store(nv_b, 4, tokens, 4)
        gpu.barrier()
        for j in fx.range_constexpr(e_steps):
            e1 = lane + j * BLOCK
            if e1 < E:
                cnt1 = c.lds_load(count, e1)
                off1 = c.lds_load(offset, e1)
                padded = (cnt1 + fx.Int32(BM - 1)) & fx.Int32(-BM)
                for p in range(padded - cnt1):
                    pos = off1 + cnt1 + p
                    c.store(sid_b, pos * 4, sentinel, 4)
                    c.store(sw_b, pos * 4, fx.Int32(0), 4)
                lid = c.lds_load(local, e1)
                for b in range(padded >> fx.Int32(BM_LOG)):
                    c.store(se_b, ((off1 >> fx.Int32(BM_LOG)) + b) * 4, lid, 4)
        for it in range((P - total + (BLOCK - 1)) // BLOCK):
            pos2 = total + it * BLOCK + lane
            if pos2 < P:
                c.store(sid_b, pos2 * 4, sentinel, 4)
                c.store(sw_b, pos2 * 4, fx.Int32(0), 4)
        used_blocks = total >> fx.Int32(BM_LOG)
        for it2 in range((nblocks - used_blocks + (BLOCK - 1)) // BLOCK):
            b2 = used_blocks + it2 * BLOCK + lane
            if b2 < nblocks:
                c.store(se_b, b2 * 4, fx.Int32(-1), 4)

    if stage == "oneshot":

        @flyc.kernel(name=name, known_block_size=[BLOCK, 1, 1])
        def oneshot_kernel(topk_ids: fx.Int64, topk_weights: fx.Int64, expert_mask: fx.Int64,
                           sorted_ids: fx.Int64, sorted_weights: fx.Int64, sorted_expert_ids: fx.Int64,
                           num_valid: fx.Int64, tokens: fx.Int32):
            lane = fx.Int32(gpu.thread_idx.x)
            lds = fx.SharedAllocator().allocate(Shared).peek()
            count, offset = lds.count.ptr, lds.offset.ptr
            n, P, nblocks, _ = sizes(tokens)
            ids_b = c.buffer(topk_ids, n * 4)
            w_b = c.buffer(topk_weights, n * 4)
            mask_b = c.buffer(expert_mask, E * 4)
            sid_b = c.buffer(sorted_ids, P * 4)
            sw_b = c.buffer(sorted_weights, P * 4)
            se_b = c.buffer(sorted_expert_ids, nblocks * 4)
            nv_b = c.buffer(num_valid, 8)
            for j in fx.range_constexpr(e_steps):
                e0 = lane + j * BLOCK
                if e0 < E:
                    c.lds_store(count, e0, fx.Int32(0))
            gpu.barrier()
            nsteps = (n + (BLOCK - 1)) // BLOCK
            for step in range(nsteps):
                key = keys.key(ids_b, mask_b, step * BLOCK + lane, n)
                group, rank = keys.group(key, lane)
                if (rank == fx.Int32(0)) & (key < fx.Int32(E)):
                    c.lds_store(count, key, c.lds_load(count, key) + c.popcount64(group))
            gpu.barrier()
            offsets_and_fills(lds, mask_b, sid_b, sw_b, se_b, nv_b, tokens, lane)
            for step2 in range(nsteps):
                i = step2 * BLOCK + lane
                key2 = keys.key(ids_b, mask_b, i, n)
                group2, rank2 = keys.group(key2, lane)
                if key2 < fx.Int32(E):
                    pos = c.lds_load(offset, key2) + rank2
                    c.store(sid_b, pos * 4, ((i % K) << TOKEN_BITS) | (i // K), 4)
                    c.store(sw_b, pos * 4, c.load(w_b, i * 4, 4), 4)
                if (rank2 == fx.Int32(0)) & (key2 < fx.Int32(E)):
                    c.lds_store(offset, key2, c.lds_load(offset, key2) + c.popcount64(group2))

        @flyc.jit
        def launch(topk_ids: fx.Int64, topk_weights: fx.Int64, expert_mask: fx.Int64, sorted_ids: fx.Int64,
                   sorted_weights: fx.Int64, sorted_expert_ids: fx.Int64, num_valid: fx.Int64, tokens: fx.Int32,
                   stream: fx.Stream = fx.Stream(None)):
            oneshot_kernel(topk_ids, topk_weights, expert_mask, sorted_ids, sorted_weights, sorted_expert_ids,
                           num_valid, tokens).launch(grid=(1, 1, 1), block=(BLOCK, 1, 1), stream=stream)

        return c.KernelBuild(name, (BLOCK, 1, 1), ("ptr",) * 7 + ("i32",), launch)

    if stage == "count":

        @flyc.kernel(name=name, known_block_size=[BLOCK, 1, 1])
        def count_kernel(topk_ids: fx.Int64, expert_mask: fx.Int64, ws_counts: fx.Int64, tokens: fx.Int32):
            lane = fx.Int32(gpu.thread_idx.x)
            chunk = fx.Int32(gpu.block_idx.x)
            lds = fx.SharedAllocator().allocate(Shared).peek()
            count = lds.count.ptr
            n, _, _, nchunks = sizes(tokens)
            ids_b = c.buffer(topk_ids, n * 4)
            mask_b = c.buffer(expert_mask, E * 4)
            ws_b = c.buffer(ws_counts, nchunks * E * 4)
            for j in fx.range_constexpr(e_steps):
                e0 = lane + j * BLOCK
                if e0 < E:
                    c.lds_store(count, e0, fx.Int32(0))
            gpu.barrier()
            for step in range(chunk_steps):
                key = keys.key(ids_b, mask_b, chunk * CHUNK + step * BLOCK + lane, n)
                group, rank = keys.group(key, lane)
                if (rank == fx.Int32(0)) & (key < fx.Int32(E)):
                    c.lds_store(count, key, c.lds_load(count, key) + c.popcount64(group))
            gpu.barrier()
            for j2 in fx.range_constexpr(e_steps):
                e1 = lane + j2 * BLOCK
                if e1 < E:
                    c.store(ws_b, (chunk * E + e1) * 4, c.lds_load(count, e1), 4)

        @flyc.jit
        def launch(topk_ids: fx.Int64, expert_mask: fx.Int64, ws_counts: fx.Int64, tokens: fx.Int32,
                   stream: fx.Stream = fx.Stream(None)):
            count_kernel(topk_ids, expert_mask, ws_counts, tokens).launch(
                grid=(1, 1, 1), block=(BLOCK, 1, 1), stream=stream)

        return c.KernelBuild(name, (BLOCK, 1, 1), ("ptr",) * 3 + ("i32",), launch)

    if stage == "offsets":

        @flyc.kernel(name=name, known_block_size=[BLOCK, 1, 1])
        def offsets_kernel(ws_counts: fx.Int64, expert_mask: fx.Int64, sorted_ids: fx.Int64,
                           sorted_weights: fx.Int64, sorted_expert_ids: fx.Int64, num_valid: fx.Int64,
                           ws_base: fx.Int64, tokens: fx.Int32):
            lane = fx.Int32(gpu.thread_idx.x)
            lds = fx.SharedAllocator().allocate(Shared).peek()
            count, offset = lds.count.ptr, lds.offset.ptr
            n, P, nblocks, nchunks = sizes(tokens)
            wc_b = c.buffer(ws_counts, nchunks * E * 4)
            wb_b = c.buffer(ws_base, nchunks * E * 4)
            mask_b = c.buffer(expert_mask, E * 4)
            sid_b = c.buffer(sorted_ids, P * 4)
            sw_b = c.buffer(sorted_weights, P * 4)
            se_b = c.buffer(sorted_expert_ids, nblocks * 4)
            nv_b = c.buffer(num_valid, 8)
            for j in fx.range_constexpr(e_steps):
                e0 = lane + j * BLOCK
                if e0 < E:
                    acc = fx.Int32(0)
                    for ch in range(nchunks):
                        acc = acc + c.load(wc_b, (ch * E + e0) * 4, 4)
                    c.lds_store(count, e0, acc)
            gpu.barrier()
            offsets_and_fills(lds, mask_b, sid_b, sw_b, se_b, nv_b, tokens, lane)
            for j3 in fx.range_constexpr(e_steps):
                e3 = lane + j3 * BLOCK
                if e3 < E:
                    start = c.lds_load(offset, e3)
                    for ch2 in range(nchunks):
                        c.store(wb_b, (ch2 * E + e3) * 4, start, 4)
                        start = start + c.load(wc_b, (ch2 * E + e3) * 4, 4)

        @flyc.jit
        def launch(ws_counts: fx.Int64, expert_mask: fx.Int64, sorted_ids: fx.Int64, sorted_weights: fx.Int64,
                   sorted_expert_ids: fx.Int64, num_valid: fx.Int64, ws_base: fx.Int64, tokens: fx.Int32,
                   stream: fx.Stream = fx.Stream(None)):
            offsets_kernel(ws_counts, expert_mask, sorted_ids, sorted_weights, sorted_expert_ids, num_valid,
                           ws_base, tokens).launch(grid=(1, 1, 1), block=(BLOCK, 1, 1), stream=stream)

        return c.KernelBuild(name, (BLOCK, 1, 1), ("ptr",) * 7 + ("i32",), launch)

    @flyc.kernel(name=name, known_block_size=[BLOCK, 1, 1])
    def scatter_kernel(topk_ids: fx.Int64, topk_weights: fx.Int64, expert_mask: fx.Int64, ws_base: fx.Int64,
                       sorted_ids: fx.Int64, sorted_weights: fx.Int64, tokens: fx.Int32):
        lane = fx.Int32(gpu.thread_idx.x)
        chunk = fx.Int32(gpu.block_idx.x)
        lds = fx.SharedAllocator().allocate(Shared).peek()
        cursor = lds.offset.ptr
        n, P, _, nchunks = sizes(tokens)
        ids_b = c.buffer(topk_ids, n * 4)
        w_b = c.buffer(topk_weights, n * 4)
        mask_b = c.buffer(expert_mask, E * 4)
        wb_b = c.buffer(ws_base, nchunks * E * 4)
        sid_b = c.buffer(sorted_ids, P * 4)
        sw_b = c.buffer(sorted_weights, P * 4)
        for j in fx.range_constexpr(e_steps):
            e0 = lane + j * BLOCK
            if e0 < E:
                c.lds_store(cursor, e0, c.load(wb_b, (chunk * E + e0) * 4, 4))
        gpu.barrier()
        for step in range(chunk_steps):
            i = chunk * CHUNK + step * BLOCK + lane
            key = keys.key(ids_b, mask_b, i, n)
            group, rank = keys.group(key, lane)
            if key < fx.Int32(E):
                pos = c.lds_load(cursor, key) + rank
                c.store(sid_b, pos * 4, ((i % K) << TOKEN_BITS) | (i // K), 4)
                c.store(sw_b, pos * 4, c.load(w_b, i * 4, 4), 4)
            if (rank == fx.Int32(0)) & (key < fx.Int32(E)):
                c.lds_store(cursor, key, c.lds_load(cursor, key) + c.popcount64(group))

    @flyc.jit
    def launch(topk_ids: fx.Int64, topk_weights: fx.Int64, expert_mask: fx.Int64, ws_base: fx.Int64,
               sorted_ids: fx.Int64, sorted_weights: fx.Int64, tokens: fx.Int32,
               stream: fx.Stream = fx.Stream(None)):
        scatter_kernel(topk_ids, topk_weights, expert_mask, ws_base, sorted_ids, sorted_weights, tokens).launch(
            grid=(1, 1, 1), block=(BLOCK, 1, 1), stream=stream)

    return c.KernelBuild(name, (BLOCK, 1, 1), ("ptr",) * 6 + ("i32",), launch)

"""MoE sort (DESIGN section 3 contract), one launch of one wave, gfx950.

Counting sort over the T*k routed (token, slot) entries, in flat order
i = token * k + slot, 64 entries per step.  Entries of one step that go to
the same expert find each other with 64-bit ballots over the bits of their
key (the expert, or E for "not here"), so a lane's rank among equal keys of
lower lanes is a popcount and the order within an expert is the flat order:

1. count entries per expert (the lowest lane of each key group adds the group);
2. lane 0: padded prefix offsets, local expert ids (mask), num_valid;
3. padding entries, per-block expert ids, and the unused tail;
4. scatter each entry to offset[e] + rank and advance offset[e].

Out-of-range ids and masked experts are dropped.  Every store is bounded by
its buffer's size (P entries, ceil(P / BM) blocks).  One wave keeps the
ordering free of cross-wave synchronisation; it is one launch at any T, at
about 40 instructions per 64 entries and pass.
"""


import flydsl.compiler as flyc
import flydsl.expr as fx
from flydsl.expr import gpu

from jax_mxfp4_moe.backends import rocm_index as ix

from . import common as c

BLOCK = ix.SORT_BLOCK
BLOCK_SIZES = (16, 32, 64, 128)
TOKEN_BITS = 24


def kernel_name(*, num_experts, top_k, block_m, has_mask):
    return f"moe_sort_e{num_experts}_k{top_k}_bm{block_m}" + ("_mask" if has_mask else "")


def build(*, num_experts, top_k, block_m, has_mask):
    E, K, BM = int(num_experts), int(top_k), int(block_m)
    if E <= 0 or E > 1024:
        raise ValueError(f"num_experts: expected 1..1024, got {num_experts}")
    if K <= 0 or K > 64:
        raise ValueError(f"top_k: expected 1..64, got {top_k}")
    if BM not in BLOCK_SIZES:
        raise ValueError(f"block_m: expected one of {BLOCK_SIZES}, got {block_m}")
    name = kernel_name(num_experts=E, top_k=K, block_m=BM, has_mask=has_mask)
    key_bits = E.bit_length()  # keys 0..E, E meaning "not here"
    e_steps = (E + BLOCK - 1) // BLOCK

    @fx.struct
    class Shared:
        count: fx.Array[fx.Int32, E, 16]
        offset: fx.Array[fx.Int32, E, 16]
        local: fx.Array[fx.Int32, E, 16]
        total: fx.Array[fx.Int32, 4, 16]

    def entry_key(ids_b, mask_b, i, n):
        """Expert of flat entry i, or E when it is past n, out of range or masked."""
        valid = i < n
        e = c.load(ids_b, valid.select(i, fx.Int32(0)) * 4, 4)
        ok = valid & (e >= fx.Int32(0)) & (e < fx.Int32(E))
        if has_mask:
            m = c.load(mask_b, ok.select(e, fx.Int32(0)) * 4, 4)
            ok = ok & (m != fx.Int32(0))
        return ok.select(e, fx.Int32(E))

    def key_group(key, lane):
        """(mask of lanes with the same key, rank among lower lanes)."""
        group = c.ballot(fx.Int32(0) == fx.Int32(0))
        for b in range(key_bits):
            bit = (key >> fx.Int32(b)) & fx.Int32(1)
            bal = c.ballot(bit != fx.Int32(0))
            group = group & (bit != fx.Int32(0)).select(bal, ~bal)
        below = (fx.Int64(1) << fx.Int64(lane)) - fx.Int64(1)
        return group, c.popcount64(group & below)

    @flyc.kernel(name=name, known_block_size=[BLOCK, 1, 1])
    def sort_kernel(
        topk_ids: fx.Int64,
        topk_weights: fx.Int64,
        expert_mask: fx.Int64,
        sorted_ids: fx.Int64,
        sorted_weights: fx.Int64,
        sorted_expert_ids: fx.Int64,
        num_valid: fx.Int64,
        tokens: fx.Int32,
    ):
        lane = fx.Int32(gpu.thread_idx.x)
        lds = fx.SharedAllocator().allocate(Shared).peek()
        count = lds.count.ptr
        offset = lds.offset.ptr
        local = lds.local.ptr
        total_p = lds.total.ptr

        n = tokens * K
        P = n + (E * BM - K)
        nblocks = (P + (BM - 1)) // BM
        sentinel = (K << TOKEN_BITS) | tokens
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

        # 1. counts
        nsteps = (n + (BLOCK - 1)) // BLOCK
        for step in range(nsteps):
            key = entry_key(ids_b, mask_b, step * BLOCK + lane, n)
            group, rank = key_group(key, lane)
            if (rank == fx.Int32(0)) & (key < fx.Int32(E)):
                c.lds_store(count, key, c.lds_load(count, key) + c.popcount64(group))
        gpu.barrier()

        # 2. offsets (lane 0, in expert order)
        if lane == fx.Int32(0):
            run = fx.Int32(0)
            nlocal = fx.Int32(0)
            for ex in range(E):
                ei = fx.Int32(ex)
                cnt = c.lds_load(count, ei)
                c.lds_store(offset, ei, run)
                if has_mask:
                    active = c.load(mask_b, ei * 4, 4) != fx.Int32(0)
                    c.lds_store(local, ei, active.select(nlocal, fx.Int32(-1)))
                    nlocal = nlocal + active.select(fx.Int32(1), fx.Int32(0))
                else:
                    c.lds_store(local, ei, ei)
                run = run + (cnt + (BM - 1)) // BM * BM
            c.lds_store(total_p, fx.Int32(0), run)
            c.store(nv_b, 0, run, 4)
            c.store(nv_b, 4, tokens, 4)
        gpu.barrier()
        total = c.lds_load(total_p, fx.Int32(0))

        # 3. padding of each expert's group, block expert ids, unused tail
        for j in fx.range_constexpr(e_steps):
            e = lane + j * BLOCK
            if e < E:
                cnt = c.lds_load(count, e)
                off = c.lds_load(offset, e)
                padded = (cnt + (BM - 1)) // BM * BM
                for p in range(padded - cnt):
                    pos = off + cnt + p
                    c.store(sid_b, pos * 4, sentinel, 4)
                    c.store(sw_b, pos * 4, fx.Int32(0), 4)
                lid = c.lds_load(local, e)
                for b in range(padded // BM):
                    c.store(se_b, (off // BM + b) * 4, lid, 4)
        for it in range((P - total + (BLOCK - 1)) // BLOCK):
            pos = total + it * BLOCK + lane
            if pos < P:
                c.store(sid_b, pos * 4, sentinel, 4)
                c.store(sw_b, pos * 4, fx.Int32(0), 4)
        used_blocks = total // BM
        for it in range((nblocks - used_blocks + (BLOCK - 1)) // BLOCK):
            b = used_blocks + it * BLOCK + lane
            if b < nblocks:
                c.store(se_b, b * 4, fx.Int32(-1), 4)

        # 4. scatter in flat (token, slot) order
        for step in range(nsteps):
            i = step * BLOCK + lane
            key = entry_key(ids_b, mask_b, i, n)
            group, rank = key_group(key, lane)
            if key < fx.Int32(E):
                pos = c.lds_load(offset, key) + rank
                token = i // K
                slot = i % K
                c.store(sid_b, pos * 4, (slot << TOKEN_BITS) | token, 4)
                c.store(sw_b, pos * 4, c.load(w_b, i * 4, 4), 4)
            if (rank == fx.Int32(0)) & (key < fx.Int32(E)):
                c.lds_store(offset, key, c.lds_load(offset, key) + c.popcount64(group))

    @flyc.jit
    def launch(
        topk_ids: fx.Int64,
        topk_weights: fx.Int64,
        expert_mask: fx.Int64,
        sorted_ids: fx.Int64,
        sorted_weights: fx.Int64,
        sorted_expert_ids: fx.Int64,
        num_valid: fx.Int64,
        tokens: fx.Int32,
        stream: fx.Stream = fx.Stream(None),
    ):
        sort_kernel(
            topk_ids, topk_weights, expert_mask, sorted_ids, sorted_weights, sorted_expert_ids, num_valid, tokens
        ).launch(grid=(1, 1, 1), block=(BLOCK, 1, 1), stream=stream)

    params = ("ptr",) * 7 + ("i32",)
    return c.KernelBuild(name, (BLOCK, 1, 1), params, launch)

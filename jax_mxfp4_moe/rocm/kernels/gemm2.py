"""MoE gemm2 (down projection, weighted scatter-add into y), gfx950.

Block (n, m, s) of the grid (n_tiles, row_blocks, k_splits): the bm sorted
rows m*bm.. of one expert (the intermediate in sorted order, MXFP4 or MXFP8,
packed E8M0 scales) times the pre-shuffled MXFP4 W2 rows n*BN.. (output
columns, BN = 16 * tiles * waves) over K split s (``geometry.k_split_range``),
through the pipelined K loop (``mainloop``).

Epilogue, per pass of up to 32 rows: the f32 tile goes through LDS so that
each thread holds a column pair; the thread's bias pair is loaded once
(before the K loop; only split 0 adds it), the pass's token ids and routing
weights in one batch, and the (acc + b2) * weight pairs are added into y
[T, Hp] (bf16) with back-to-back ``global_atomic_pk_add_bf16`` at 64-bit
addresses; padding rows (token >= T) and columns past Hp add nothing.  With
the runtime argument ``rows_per_token`` = k > 0 (the deterministic mode; a
kernel of one K split) it instead stores the f32 pairs to row token * k +
slot of a [T * k, Hp] buffer (each (token, slot) has one row; the caller
sums the k slots in order): one code object serves both modes, the choice a
wave-uniform branch per pass.  Blocks past num_valid[0] or past Hp exit at
once.  The output must be zeroed before the launch.
"""

import flydsl.compiler as flyc
import flydsl.expr as fx
from flydsl.expr import gpu, rocdl
from flydsl.expr.typing import T as TY

from jax_mxfp4_moe import spec
from jax_mxfp4_moe.rocm import geometry as ix
from jax_mxfp4_moe.rocm.config import QUANTS
from jax_mxfp4_moe.rocm.kernels import common as c
from jax_mxfp4_moe.rocm.kernels import mainloop
from jax_mxfp4_moe.spec import MX_BLOCK


def kernel_name(*, hidden, intermediate, num_experts, quant, has_bias, nt, bm, tiles, waves, prefetch,
                k_splits=1):
    return (f"moe_gemm2_{quant}_h{hidden}_i{intermediate}_e{num_experts}_bm{bm}_t{tiles}w{waves}p{prefetch}"
            + (f"_ks{k_splits}" if k_splits > 1 else "") + ("_bias" if has_bias else "") + ("_nt" if nt else ""))


def build(*, hidden, intermediate, num_experts, quant, has_bias, nt, bm, tiles, waves, prefetch, k_splits=1):
    if quant not in QUANTS:
        raise ValueError(f"quant: expected one of {QUANTS}, got {quant!r}")
    for nm, v in (("hidden", hidden), ("intermediate", intermediate)):
        if v <= 0 or v % MX_BLOCK:
            raise ValueError(f"{nm}: expected a positive multiple of {MX_BLOCK}, got {v}")
    fmt = spec.quant_mode(quant).act_format
    H, I, E = int(hidden), int(intermediate), int(num_experts)
    Hp, Ip = ix.padded_dims(H, I)
    kblocks = Ip // ix.MFMA_K
    cfg = mainloop.Config(fmt=fmt, bm=bm, nt=tiles, waves=waves, prefetch=prefetch)
    block = ix.WAVE * waves
    BN = ix.block_rows(tiles, waves)
    a_row = ix.row_bytes(Ip, fmt)
    a_srow = ix.act_scale_row_bytes(Ip)
    w_expert = Hp * Ip // 2
    ws_expert = (Hp // ix.MFMA_N) * ix.tile_scale_strides(kblocks)[0]
    splits = ix.k_splits_used(kblocks, k_splits)
    per_split = ix.k_split_steps(kblocks, k_splits)
    last_first, last_steps = ix.k_split_range(splits - 1, kblocks, k_splits)
    ep_rows = ix.epilogue_rows(bm)
    stride = ix.gemm2_lds_stride(tiles, waves)
    sweeps = ix.gemm2_epilogue_sweeps(bm, tiles, waves)
    lds_words = max(cfg.ring_bytes // 4, ep_rows * stride)
    name = kernel_name(hidden=H, intermediate=I, num_experts=E, quant=quant, has_bias=has_bias, nt=nt, bm=bm,
                       tiles=tiles, waves=waves, prefetch=prefetch, k_splits=k_splits)

    @fx.struct
    class Shared:
        raw: fx.Array[fx.Int32, lds_words, 16]

    def add_address(y, entry, col):
        """64-bit address of (token of ``entry``, column ``col``) in y [T, Hp] bf16."""
        return fx.Int64(y) + (fx.Int64(entry & fx.Int32(spec.TOKEN_MASK)) * Hp + fx.Int64(col)) * 2

    def row_address(y, entry, col, rows_per_token):
        """64-bit address of (row token * k + slot, column ``col``) in y [T * k, Hp] f32."""
        row = fx.Int64(entry & fx.Int32(spec.TOKEN_MASK)) * fx.Int64(rows_per_token) + fx.Int64(c.shr(entry, spec.TOKEN_BITS))
        return fx.Int64(y) + (row * Hp + fx.Int64(col)) * 4

    def tile_buffer(expert_base, offset, expert_bytes, tile):
        """Buffer over the expert's bytes from ``offset`` on (a tile past the
        expert's rows reads zeros: the range check ends at the expert)."""
        left = fx.Int64(expert_bytes) - fx.Int64(offset)
        return c.byte_buffer(expert_base + fx.Int64(offset), (left > fx.Int64(0)).select(left, fx.Int64(0)))

    @flyc.kernel(name=name, known_block_size=[block, 1, 1])
    def gemm2_kernel(
        inter: fx.Int64,
        inter_s: fx.Int64,
        w2: fx.Int64,
        w2s: fx.Int64,
        b2: fx.Int64,
        sorted_ids: fx.Int64,
        sorted_weights: fx.Int64,
        sorted_expert_ids: fx.Int64,
        num_valid: fx.Int64,
        y: fx.Int64,
        tokens: fx.Int32,
        rows_per_token: fx.Int32,
    ):
        tid = fx.Int32(gpu.thread_idx.x)
        lane = tid % ix.WAVE
        wave = c.readfirstlane(tid // ix.WAVE)
        n_tile = fx.Int32(gpu.block_idx.x)
        row_block = fx.Int32(gpu.block_idx.y)
        s = fx.Int32(gpu.block_idx.z)
        row0 = row_block * bm
        c0 = n_tile * BN
        nv = c.load(c.buffer(num_valid, 8), 0, 4)
        eid = c.load(c.buffer(sorted_expert_ids), row_block * 4, 4)
        live = (row0 < nv) & (eid >= fx.Int32(0)) & (eid < fx.Int32(E)) & (c0 < fx.Int32(Hp))
        if live:
            ring = fx.SharedAllocator().allocate(Shared).peek().raw.ptr
            e64 = fx.Int64(eid)
            # rows past num_valid[0] are never live: the ranges end there
            nv_u = c.readfirstlane(nv)  # uniform: the resources stay scalar
            as_buf = c.byte_buffer(inter_s, fx.Int64(nv_u) * ix.act_scale_row_bytes(Ip))
            a_bytes = fx.Int64(nv_u) * a_row
            w_base = fx.Int64(w2) + e64 * w_expert
            ws_base = fx.Int64(w2s) + e64 * ws_expert
            a_bufs, dma_voff = [], []
            for rd in fx.range_constexpr(cfg.rounds):
                op = wave + rd * waves
                row, chunk = ix.dma_lane(op, lane, fmt)
                dma_voff.append((row0 + row) * a_row + chunk * ix.DMA_BYTES)
                # a wave without an op this round reads nothing (a 0-byte range) into slot padding
                full = (rd + 1) * waves <= cfg.ops
                a_bufs.append(c.byte_buffer(inter, a_bytes if full else (op < cfg.ops).select(a_bytes, fx.Int64(0))))
            r16 = ix.operand_row(lane)
            g = ix.operand_kblock(lane)
            as_voff = [ix.act_scale_offset(row0 + mt * ix.MFMA_M + r16, g, Ip) for mt in fx.range_constexpr(cfg.mt)]
            nb = [n_tile * (BN // ix.MFMA_N) + wave * tiles + j for j in fx.range_constexpr(tiles)]
            src = mainloop.Sources(
                ring=ring, a_buf=a_bufs, dma_voff=dma_voff, as_buf=as_buf, as_voff=as_voff,
                w_bufs=[tile_buffer(w_base, ix.tile_offset(b, 0, 0, kblocks), w_expert, 4) for b in nb],
                ws_bufs=[tile_buffer(ws_base, ix.tile_scale_offset(b, 0, 0, kblocks), ws_expert, 1) for b in nb])
            # the thread's bias pair (one load, before the K loop; split 0 adds it)
            bias = [fx.Float32(0.0), fx.Float32(0.0)]
            _, bcol = ix.gemm2_epilogue_item(tid, 0, tiles, waves)
            if has_bias:
                b2_b = c.buffer(fx.Int64(b2) + e64 * (Hp * 4), Hp * 4)
                bw = c.vec_elems(c.load(b2_b, (c0 + bcol) * 4, 8), 2)
                keep = s == fx.Int32(0)
                bias = [keep.select(c.f32_from_bits(bw[0]), fx.Float32(0.0)),
                        keep.select(c.f32_from_bits(bw[1]), fx.Float32(0.0))]
            loop = mainloop.KLoop(cfg, src, lane, wave, c.AUX_NONTEMPORAL if nt else c.AUX_CACHED)
            if splits == 1:
                loop.run(0, kblocks)
            elif last_steps == per_split:
                loop.run(s * per_split, per_split)
            else:
                if s == fx.Int32(splits - 1):
                    loop.run(last_first, last_steps)
                else:
                    loop.run(s * per_split, per_split)
            loop.finish()
            acc = loop.acc

            out = fx.recast_iter(fx.Float32, ring)
            sid_b = c.buffer(sorted_ids)
            sw_b = c.buffer(sorted_weights)
            for p in fx.range_constexpr(bm // ep_rows):
                if p > 0:
                    rocdl.s_barrier()
                # this pass's token ids and weights, in one batch
                entries, wgts = [], []
                for sw in fx.range_constexpr(sweeps):
                    r, _ = ix.gemm2_epilogue_item(tid, sw, tiles, waves)
                    entries.append(c.load(sid_b, (row0 + p * ep_rows + r) * 4, 4))
                    wgts.append(c.f32_from_bits(c.load(sw_b, (row0 + p * ep_rows + r) * 4, 4)))
                for mt in fx.range_constexpr(ep_rows // ix.MFMA_M):
                    for j in fx.range_constexpr(tiles):
                        vals = fx.memref_load_vec(acc[p * (ep_rows // ix.MFMA_M) + mt][j])
                        col = (wave * tiles + j) * ix.MFMA_N + ix.result_col(lane)
                        for i in fx.range_constexpr(4):
                            r = mt * ix.MFMA_M + ix.result_row(lane, i)
                            c.lds_store(out, r * stride + col, vals[i])
                gpu.barrier()
                adds = []
                for sw in fx.range_constexpr(sweeps):
                    r, col = ix.gemm2_epilogue_item(tid, sw, tiles, waves)
                    pair = c.lds_load_f32x2(out, r * stride + col)
                    token = entries[sw] & fx.Int32(spec.TOKEN_MASK)
                    ok = (token < tokens) & (c0 + col < fx.Int32(Hp))
                    # pinned: computed (and their loads waited for) here, not sunk into the branches
                    lo = c.pin((pair[0] + bias[0]) * wgts[sw])
                    hi = c.pin((pair[1] + bias[1]) * wgts[sw])
                    adds.append((ok, c.pin(entries[sw]), c0 + col, lo, hi))
                rocdl.sched_barrier(0)  # every operand first: the adds then issue back to back
                if rows_per_token > fx.Int32(0) and k_splits == 1:
                    for sw in fx.range_constexpr(sweeps):
                        ok, entry, col, lo, hi = adds[sw]
                        if ok:
                            c.global_store_f32x2(row_address(y, entry, col, rows_per_token), lo, hi)
                else:
                    for sw in fx.range_constexpr(sweeps):  # back to back: every operand is in registers
                        ok, entry, col, lo, hi = adds[sw]
                        if ok:
                            c.atomic_add_bf16x2(add_address(y, entry, col), lo, hi)

    @flyc.jit
    def launch(
        inter: fx.Int64,
        inter_s: fx.Int64,
        w2: fx.Int64,
        w2s: fx.Int64,
        b2: fx.Int64,
        sorted_ids: fx.Int64,
        sorted_weights: fx.Int64,
        sorted_expert_ids: fx.Int64,
        num_valid: fx.Int64,
        y: fx.Int64,
        tokens: fx.Int32,
        rows_per_token: fx.Int32,
        stream: fx.Stream = fx.Stream(None),
    ):
        gemm2_kernel(
            inter, inter_s, w2, w2s, b2, sorted_ids, sorted_weights, sorted_expert_ids, num_valid, y, tokens,
            rows_per_token,
        ).launch(grid=(1, 1, 1), block=(block, 1, 1), stream=stream)

    params = ("ptr",) * 10 + ("i32", "i32")
    return c.KernelBuild(name, (block, 1, 1), params, launch)

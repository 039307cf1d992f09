"""MoE gemm2 (down projection, weighted scatter-add into y), gfx950.

Block (n, m) of the (n_tiles, row_blocks) grid: the BM = 32 sorted rows m*32..
of one expert (the intermediate in sorted order, MXFP4 or MXFP8 with E8M0
scales) times the pre-shuffled MXFP4 W2 rows n*128.. (output columns).  Each wave owns 32
columns (2 tiles of 16) and runs 2 x 2 scaled MFMAs 16x16x128 per K step.
The f32 tile goes through LDS so that each thread holds two adjacent
columns: (acc + b2) * sorted_weight is added into y[token] (bf16, [T, Hp])
with ``global_atomic_pk_add_bf16``; padding rows (token >= T) add nothing.
The deterministic variant instead stores the f32 values to row
token * k + slot of a [T * k, Hp] buffer (each (token, slot) has one row;
the caller sums the k slots in order).  Blocks past num_valid[0] exit at
once.  The output must be zeroed before the launch.
"""

import flydsl.compiler as flyc
import flydsl.expr as fx
from flydsl.expr import gpu

from jax_mxfp4_moe import spec
from jax_mxfp4_moe.rocm import geometry as ix
from jax_mxfp4_moe.rocm.config import QUANTS
from jax_mxfp4_moe.rocm.kernels import common as c
from jax_mxfp4_moe.rocm.kernels import mfma
from jax_mxfp4_moe.spec import MX_BLOCK

BLOCK = ix.GEMM_BLOCK
TILES_PER_WAVE = ix.WAVE_N // ix.MFMA_N  # 2


def kernel_name(*, hidden, intermediate, num_experts, quant, has_bias, nt, top_k=None):
    return (f"moe_gemm2_{quant}_h{hidden}_i{intermediate}_e{num_experts}_bm{ix.BM}"
            + ("_bias" if has_bias else "") + ("_nt" if nt else "") + (f"_det_k{top_k}" if top_k else ""))


def build(*, hidden, intermediate, num_experts, quant, has_bias, nt, top_k=None):
    """``top_k`` set: the deterministic variant (per-slot f32 rows, no atomics)."""
    if quant not in QUANTS:
        raise ValueError(f"quant: expected one of {QUANTS}, got {quant!r}")
    for nm, v in (("hidden", hidden), ("intermediate", intermediate)):
        if v <= 0 or v % MX_BLOCK:
            raise ValueError(f"{nm}: expected a positive multiple of {MX_BLOCK}, got {v}")
    fmt = spec.quant_mode(quant).act_format
    H, I, E = int(hidden), int(intermediate), int(num_experts)
    Hp, Ip = ix.padded_dims(H, I)
    kblocks = Ip // ix.MFMA_K
    a_row = mfma.row_bytes(Ip, fmt)
    a_srow = Ip // MX_BLOCK
    w_expert = Hp * Ip // 2
    ws_expert = Hp * Ip // MX_BLOCK
    name = kernel_name(hidden=H, intermediate=I, num_experts=E, quant=quant, has_bias=has_bias, nt=nt, top_k=top_k)
    if top_k is not None and not 0 < int(top_k) <= 64:
        raise ValueError(f"top_k: expected 1..64, got {top_k}")

    @fx.struct
    class Shared:
        out: fx.Array[fx.Float32, ix.BM * ix.BN, 16]

    @flyc.kernel(name=name, known_block_size=[BLOCK, 1, 1])
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
    ):
        tid, lane, wave, n_tile, _, row0, eid, live = c.gemm_block(num_valid, sorted_expert_ids, E, ix.BM)
        if live:
            lds = fx.SharedAllocator().allocate(Shared).peek()
            out = lds.out.ptr
            c0 = n_tile * ix.BN
            a_b = c.buffer(inter)
            as_b = c.buffer(inter_s)
            e64 = fx.Int64(eid)
            wt = mfma.WeightTiles(fx.Int64(w2) + e64 * w_expert, fx.Int64(w2s) + e64 * ws_expert,
                                  Hp // ix.MFMA_N, kblocks, nt)
            a_off = []
            as_off = []
            for s in fx.range_constexpr(ix.M_TILES):
                r = row0 + s * ix.MFMA_M + ix.operand_row(lane)
                a_off.append(r * a_row)
                as_off.append(r * a_srow)
            nbs = [(c0 + wave * ix.WAVE_N + t * ix.MFMA_N) // ix.MFMA_N for t in range(TILES_PER_WAVE)]

            acc = [mfma.zero_acc() for _ in range(ix.M_TILES * TILES_PER_WAVE)]
            for kb in range(kblocks):
                a_ops = [mfma.load_a(a_b, a_off[s], kb, lane, fmt) for s in range(ix.M_TILES)]
                a_sc = [mfma.load_a_scale(as_b, as_off[s], kb, lane) for s in range(ix.M_TILES)]
                b_ops = [wt.load(nbs[t], kb, lane) for t in range(TILES_PER_WAVE)]
                acc = [
                    mfma.mfma(a_ops[s], a_sc[s], b_ops[t][0], b_ops[t][1], acc[s * TILES_PER_WAVE + t], fmt)
                    for s in range(ix.M_TILES)
                    for t in range(TILES_PER_WAVE)
                ]

            for s in fx.range_constexpr(ix.M_TILES):
                for t in fx.range_constexpr(TILES_PER_WAVE):
                    for i in fx.range_constexpr(4):
                        r = s * ix.MFMA_M + ix.result_row(lane, i)
                        col = wave * ix.WAVE_N + t * ix.MFMA_N + ix.result_col(lane)
                        c.lds_store(out, r * ix.BN + col, mfma.acc_elem(acc[s * TILES_PER_WAVE + t], i))
            gpu.barrier()

            sid_b = c.buffer(sorted_ids)
            sw_b = c.buffer(sorted_weights)
            b2_b = c.buffer(fx.Int64(b2) + e64 * (Hp * 4), Hp * 4)
            for it in fx.range_constexpr(ix.G2_PAIRS // ix.G2_THREADS):
                r, col = ix.gemm2_pair(tid, it)
                entry = c.load(sid_b, (row0 + r) * 4, 4)
                token = entry & fx.Int32(spec.TOKEN_MASK)
                if token < tokens:
                    wgt = c.f32_from_bits(c.load(sw_b, (row0 + r) * 4, 4))
                    lo = c.lds_load(out, r * ix.BN + col)
                    hi = c.lds_load(out, r * ix.BN + col + 1)
                    if has_bias:
                        lo = lo + c.f32_from_bits(c.load(b2_b, (c0 + col) * 4, 4))
                        hi = hi + c.f32_from_bits(c.load(b2_b, (c0 + col + 1) * 4, 4))
                    if top_k is None:
                        addr = fx.Int64(y) + fx.Int64(token * Hp + c0 + col) * 2
                        c.atomic_add_bf16x2(addr, lo * wgt, hi * wgt)
                    else:
                        row = fx.Int64(token * top_k + c.shr(entry, spec.TOKEN_BITS))
                        addr = fx.Int64(y) + (row * Hp + fx.Int64(c0 + col)) * 4
                        c.global_store_f32x2(addr, lo * wgt, hi * wgt)

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
        stream: fx.Stream = fx.Stream(None),
    ):
        gemm2_kernel(
            inter, inter_s, w2, w2s, b2, sorted_ids, sorted_weights, sorted_expert_ids, num_valid, y, tokens
        ).launch(grid=(1, 1, 1), block=(BLOCK, 1, 1), stream=stream)

    params = ("ptr",) * 10 + ("i32",)
    return c.KernelBuild(name, (BLOCK, 1, 1), params, launch)

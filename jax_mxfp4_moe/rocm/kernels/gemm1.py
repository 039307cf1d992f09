"""MoE gemm1 (gate/up projection + activation + requantisation), gfx950.

Block (n, m) of the (n_tiles, row_blocks) grid: the BM = 32 sorted rows m*32..
of one expert and the BN = 128 intermediate columns c0 = n*128..  A rows are gathered from the quantised
activations by ``sorted_token_ids & TOKEN_MASK`` (padding rows name token T:
past the buffer's size, so they read zeros).  Each of the 4 waves owns 4
pre-shuffled W1 tiles of 16 rows (gate and up rows, placed by
``rocm_index.gemm1_tile``) and runs 2 x 4 scaled MFMAs 16x16x128 per K step
with the activation's and the weight's E8M0 scales.  The f32 pre-activations
go through LDS so that one thread can take a whole 32-column MX block:
bias, activation, zero past the true I, quantisation to the mode's format,
and a store in sorted order.  Blocks past num_valid[0] exit at once.
"""

import flydsl.compiler as flyc
import flydsl.expr as fx
from flydsl._mlir import ir
from flydsl._mlir.dialects import llvm
from flydsl.expr import gpu

from jax_mxfp4_moe import spec
from jax_mxfp4_moe.rocm import geometry as ix
from jax_mxfp4_moe.rocm.config import QUANTS
from jax_mxfp4_moe.rocm.kernels import common as c
from jax_mxfp4_moe.rocm.kernels import mfma
from jax_mxfp4_moe.rocm.kernels.mx import quantize_block
from jax_mxfp4_moe.spec import MX_BLOCK

BLOCK = ix.GEMM_BLOCK
_LOG2E = 1.4426950408889634


def kernel_name(*, hidden, intermediate, num_experts, quant, activation, gate_up, has_bias, nt):
    activation = spec.as_activation(activation)
    gu = {"separated": "sep", "interleaved": "il"}[gate_up]
    defaults = dict(activation.kind.defaults)
    act = activation.name + "".join(f"_{k}{v:g}" for k, v in activation.params if v != defaults[k])
    return (f"moe_gemm1_{quant}_{act}_{gu}_h{hidden}_i{intermediate}_e{num_experts}_bm{ix.BM}"
            + ("_bias" if has_bias else "") + ("_nt" if nt else ""))


def _sigmoid_times(x, scale):
    """x * sigmoid(scale * x), as x / (1 + exp(-scale * x))."""
    f32 = ir.F32Type.get()
    t = fx.Float32(llvm.call_intrinsic(f32, "llvm.exp2.f32", [c.raw(x * fx.Float32(-scale * _LOG2E))], [], []))
    return x / (fx.Float32(1.0) + t)


def activation_fn(g, u, activation: spec.Activation):
    """The spec's activations, in f32 device code."""
    if activation.name == "silu":
        return _sigmoid_times(g, 1.0) * u
    if activation.name != "swiglu_oai":
        raise ValueError(f"activation: no gfx950 code for {activation!r}")
    alpha, limit = activation.param("alpha"), activation.param("limit")
    gl = g.minimumf(fx.Float32(limit))
    ul = u.maximumf(fx.Float32(-limit)).minimumf(fx.Float32(limit))
    return _sigmoid_times(gl, alpha) * (ul + fx.Float32(1.0))


def build(*, hidden, intermediate, num_experts, quant, activation, gate_up, has_bias, nt):
    if quant not in QUANTS:
        raise ValueError(f"quant: expected one of {QUANTS}, got {quant!r}")
    activation = spec.as_activation(activation)
    spec.check_gate_up(gate_up)
    for nm, v in (("hidden", hidden), ("intermediate", intermediate)):
        if v <= 0 or v % MX_BLOCK:
            raise ValueError(f"{nm}: expected a positive multiple of {MX_BLOCK}, got {v}")
    fmt = spec.quant_mode(quant).act_format
    H, I, E = int(hidden), int(intermediate), int(num_experts)
    Hp, Ip = ix.padded_dims(H, I)
    kblocks = Hp // ix.MFMA_K
    a_row = mfma.row_bytes(Hp, fmt)
    a_srow = Hp // MX_BLOCK
    w_expert = 2 * Ip * Hp // 2
    ws_expert = 2 * Ip * Hp // MX_BLOCK
    out_row = mfma.row_bytes(Ip, fmt)
    out_srow = Ip // MX_BLOCK
    out_blk = mfma.LANE_BYTES[fmt]
    lds_cols = ix.G1_LDS_COLS
    name = kernel_name(hidden=H, intermediate=I, num_experts=E, quant=quant, activation=activation,
                       gate_up=gate_up, has_bias=has_bias, nt=nt)

    @fx.struct
    class Shared:
        pre: fx.Array[fx.Float32, ix.BM * ix.G1_LDS_COLS, 16]

    @flyc.kernel(name=name, known_block_size=[BLOCK, 1, 1])
    def gemm1_kernel(
        xq: fx.Int64,
        xs: fx.Int64,
        w1: fx.Int64,
        w1s: fx.Int64,
        b1: fx.Int64,
        sorted_ids: fx.Int64,
        sorted_expert_ids: fx.Int64,
        num_valid: fx.Int64,
        inter: fx.Int64,
        inter_s: fx.Int64,
        tokens: fx.Int32,
    ):
        tid, lane, wave, n_tile, _, row0, eid, live = c.gemm_block(num_valid, sorted_expert_ids, E, ix.BM)
        if live:
            lds = fx.SharedAllocator().allocate(Shared).peek()
            pre = lds.pre.ptr
            c0 = n_tile * ix.BN
            sid_b = c.buffer(sorted_ids)
            xq_b = c.buffer(xq, tokens * a_row)
            xs_b = c.buffer(xs, tokens * a_srow)
            e64 = fx.Int64(eid)
            wt = mfma.WeightTiles(fx.Int64(w1) + e64 * w_expert, fx.Int64(w1s) + e64 * ws_expert,
                                  2 * Ip // ix.MFMA_N, kblocks, nt)
            a_off = []
            as_off = []
            for s in fx.range_constexpr(ix.M_TILES):
                tok = c.load(sid_b, (row0 + s * ix.MFMA_M + ix.operand_row(lane)) * 4, 4) & fx.Int32(spec.TOKEN_MASK)
                a_off.append(tok * a_row)
                as_off.append(tok * a_srow)
            tiles = [ix.gemm1_tile(wave, t, c0, I, gate_up) for t in range(ix.G1_TILES_PER_WAVE)]
            nbs = [t_row // ix.MFMA_N for t_row, _ in tiles]

            acc = [mfma.zero_acc() for _ in range(ix.M_TILES * ix.G1_TILES_PER_WAVE)]
            for kb in range(kblocks):
                a_ops = [mfma.load_a(xq_b, a_off[s], kb, lane, fmt) for s in range(ix.M_TILES)]
                a_sc = [mfma.load_a_scale(xs_b, as_off[s], kb, lane) for s in range(ix.M_TILES)]
                b_ops = [wt.load(nbs[t], kb, lane) for t in range(ix.G1_TILES_PER_WAVE)]
                acc = [
                    mfma.mfma(a_ops[s], a_sc[s], b_ops[t][0], b_ops[t][1], acc[s * ix.G1_TILES_PER_WAVE + t], fmt)
                    for s in range(ix.M_TILES)
                    for t in range(ix.G1_TILES_PER_WAVE)
                ]

            b1_b = c.buffer(fx.Int64(b1) + e64 * (2 * Ip * 4), 2 * Ip * 4)
            for s in fx.range_constexpr(ix.M_TILES):
                for t in fx.range_constexpr(ix.G1_TILES_PER_WAVE):
                    t_row, t_col = tiles[t]
                    bias = fx.Float32(0.0)
                    if has_bias:
                        bias = c.f32_from_bits(c.load(b1_b, (t_row + ix.result_col(lane)) * 4, 4))
                    for i in fx.range_constexpr(4):
                        r = s * ix.MFMA_M + ix.result_row(lane, i)
                        v = mfma.acc_elem(acc[s * ix.G1_TILES_PER_WAVE + t], i) + bias
                        c.lds_store(pre, r * lds_cols + t_col + ix.result_col(lane), v)
            gpu.barrier()

            if tid < ix.BM * ix.BN // MX_BLOCK:
                r, jb = ix.epilogue_block(tid)
                vals = []
                for j in fx.range_constexpr(MX_BLOCK):
                    gc, uc = ix.gemm1_lds_gate_up(jb * MX_BLOCK + j, gate_up)
                    g = c.lds_load(pre, r * lds_cols + gc)
                    u = c.lds_load(pre, r * lds_cols + uc)
                    h = activation_fn(g, u, activation)
                    vals.append((c0 + jb * MX_BLOCK + j < I).select(h, fx.Float32(0.0)))
                byte, words = quantize_block(vals, fmt)
                out_b = c.buffer(inter)
                orow = row0 + r
                ocol = c0 // MX_BLOCK + jb
                for q in fx.range_constexpr(out_blk // 16):
                    c.store(out_b, orow * out_row + ocol * out_blk + q * 16, c.vec_i32(words[4 * q : 4 * q + 4]), 16)
                c.store(c.buffer(inter_s), orow * out_srow + ocol, byte, 1)

    @flyc.jit
    def launch(
        xq: fx.Int64,
        xs: fx.Int64,
        w1: fx.Int64,
        w1s: fx.Int64,
        b1: fx.Int64,
        sorted_ids: fx.Int64,
        sorted_expert_ids: fx.Int64,
        num_valid: fx.Int64,
        inter: fx.Int64,
        inter_s: fx.Int64,
        tokens: fx.Int32,
        stream: fx.Stream = fx.Stream(None),
    ):
        gemm1_kernel(xq, xs, w1, w1s, b1, sorted_ids, sorted_expert_ids, num_valid, inter, inter_s, tokens).launch(
            grid=(1, 1, 1), block=(BLOCK, 1, 1), stream=stream
        )

    params = ("ptr",) * 10 + ("i32",)
    return c.KernelBuild(name, (BLOCK, 1, 1), params, launch)

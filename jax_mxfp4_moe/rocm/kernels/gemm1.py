"""MoE gemm1 (gate/up projection + activation + requantisation), gfx950.

Block (n, m) of the grid (n_tiles, row_blocks, 1): the bm sorted rows
m*bm.. of one expert and the intermediate columns c0 = n * C.. (C = 8 *
tiles * waves: 2C W1 rows, gate and up, placed by ``geometry.gemm1_tile``).
A rows are gathered from the quantised activations by ``sorted_token_ids &
TOKEN_MASK`` (padding rows name token T: past the buffer's range, so they read
zeros), through the pipelined K loop (``mainloop``).

Epilogue, per pass of up to 32 rows: the f32 pre-activations (+ b1, one load
per lane and tile before the K loop) go through LDS as [gate | up]
(``gemm1_lds_col``); each thread takes 8 consecutive columns of one row, so
a quad of lanes holds one 32-column MX block: activation (``v_exp_f32`` and
``v_rcp_f32``, no IEEE divide), zero past the true I, the block's |x|
maximum across the quad (two DPP steps), then ``mx.convert`` (hardware
conversions) and one store per lane; the quad's first lane stores the scale
byte where gemm2 loads it (packed, ``act_scale_offset``).  Blocks past
num_valid[0] or past Ip exit at once.
"""

import flydsl.compiler as flyc
import flydsl.expr as fx
from flydsl._mlir import ir
from flydsl.expr import gpu, rocdl

from jax_mxfp4_moe import spec
from jax_mxfp4_moe.rocm import geometry as ix
from jax_mxfp4_moe.rocm.config import QUANTS
from jax_mxfp4_moe.rocm.kernels import common as c
from jax_mxfp4_moe.rocm.kernels import mainloop
from jax_mxfp4_moe.rocm.kernels.mx import amax_bits, convert, scale_byte
from jax_mxfp4_moe.spec import MX_BLOCK

_LOG2E = 1.4426950408889634


def kernel_name(*, hidden, intermediate, num_experts, quant, activation, gate_up, has_bias, nt, bm, tiles, waves,
                prefetch):
    activation = spec.as_activation(activation)
    gu = {"separated": "sep", "interleaved": "il"}[gate_up]
    defaults = dict(activation.kind.defaults)
    act = activation.name + "".join(f"_{k}{v:g}" for k, v in activation.params if v != defaults[k])
    return (f"moe_gemm1_{quant}_{act}_{gu}_h{hidden}_i{intermediate}_e{num_experts}_bm{bm}"
            f"_t{tiles}w{waves}p{prefetch}" + ("_bias" if has_bias else "") + ("_nt" if nt else ""))


def _sigmoid_times(x, scale):
    """x * sigmoid(scale * x) = x * rcp(1 + 2**(-scale * log2(e) * x)) (v_exp_f32, v_rcp_f32)."""
    f32 = ir.F32Type.get()
    t = fx.Float32(rocdl.exp2(f32, c.raw(x * fx.Float32(-scale * _LOG2E))))
    return x * fx.Float32(rocdl.rcp(f32, c.raw(fx.Float32(1.0) + t)))


def activation_fn(g, u, activation: spec.Activation):
    """The spec's activations, in f32 device code."""
    if activation.name == "silu":
        return _sigmoid_times(g, 1.0) * u
    if activation.name != "swiglu_oai":
        raise ValueError(f"activation: no gfx950 code for {activation!r}")
    alpha, limit = activation.param("alpha"), activation.param("limit")
    gl = g.minimumf(fx.Float32(limit))  # NaN-propagating min/max
    ul = u.maximumf(fx.Float32(-limit)).minimumf(fx.Float32(limit))
    return _sigmoid_times(gl, alpha) * (ul + fx.Float32(1.0))


def build(*, hidden, intermediate, num_experts, quant, activation, gate_up, has_bias, nt, bm, tiles, waves, prefetch):
    if quant not in QUANTS:
        raise ValueError(f"quant: expected one of {QUANTS}, got {quant!r}")
    activation = spec.as_activation(activation)
    spec.check_gate_up(gate_up)
    for nm, v in (("hidden", hidden), ("intermediate", intermediate)):
        if v <= 0 or v % MX_BLOCK:
            raise ValueError(f"{nm}: expected a positive multiple of {MX_BLOCK}, got {v}")
    cols = ix.gemm1_cols(tiles, waves)
    if cols % MX_BLOCK or (tiles * waves) % 2:
        raise ValueError(f"tiles * waves: gemm1 blocks need whole MX blocks of columns, got {tiles} x {waves}")
    fmt = spec.quant_mode(quant).act_format
    H, I, E = int(hidden), int(intermediate), int(num_experts)
    Hp, Ip = ix.padded_dims(H, I)
    if Ip % cols:
        # a block's weight tiles and output columns would run past the
        # expert's 2 * Ip rows and the row's Ip columns
        raise ValueError(f"tiles * waves: gemm1 blocks of {cols} columns must divide the padded intermediate "
                         f"{Ip}, got {tiles} x {waves}")
    kblocks = Hp // ix.MFMA_K
    cfg = mainloop.Config(fmt=fmt, bm=bm, nt=tiles, waves=waves, prefetch=prefetch)
    block = ix.WAVE * waves
    a_row = ix.row_bytes(Hp, fmt)
    w_expert = 2 * Ip * Hp // 2
    ws_expert = (2 * Ip // ix.MFMA_N) * ix.tile_scale_strides(kblocks)[0]
    out_row = ix.row_bytes(Ip, fmt)
    out_words = 8 // mx_values_per_word(fmt)  # i32 words of a lane's 8 values
    ep_rows = ix.epilogue_rows(bm)
    stride = ix.gemm1_lds_stride(tiles, waves)
    sweeps = ix.gemm1_epilogue_sweeps(bm, tiles, waves)
    per_row = cols // 8
    idle_threads = block // per_row > ep_rows  # a sweep has more rows than the block
    lds_words = max(cfg.ring_bytes // 4, ep_rows * stride)
    srow = ix.act_scale_row_bytes(Ip)
    used = {ix.act_scale_offset(0, b, Ip) for b in range(Ip // MX_BLOCK)}
    unused = [o for o in range(srow) if o not in used]
    name = kernel_name(hidden=H, intermediate=I, num_experts=E, quant=quant, activation=activation, gate_up=gate_up,
                       has_bias=has_bias, nt=nt, bm=bm, tiles=tiles, waves=waves, prefetch=prefetch)

    @fx.struct
    class Shared:
        raw: fx.Array[fx.Int32, lds_words, 16]

    def tile_buffer(expert_base, offset, expert_bytes, tile):
        left = fx.Int64(expert_bytes) - fx.Int64(offset)
        return c.byte_buffer(expert_base + fx.Int64(offset), (left > fx.Int64(0)).select(left, fx.Int64(0)))

    @flyc.kernel(name=name, known_block_size=[block, 1, 1])
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
        tid = fx.Int32(gpu.thread_idx.x)
        lane = tid % ix.WAVE
        wave = c.readfirstlane(tid // ix.WAVE)
        n_tile = fx.Int32(gpu.block_idx.x)
        row_block = fx.Int32(gpu.block_idx.y)
        row0 = row_block * bm
        c0 = n_tile * cols
        nv = c.load(c.buffer(num_valid, 8), 0, 4)
        eid = c.load(c.buffer(sorted_expert_ids), row_block * 4, 4)
        live = (row0 < nv) & (eid >= fx.Int32(0)) & (eid < fx.Int32(E)) & (c0 < fx.Int32(Ip))
        if live:
            ring = fx.SharedAllocator().allocate(Shared).peek().raw.ptr
            e64 = fx.Int64(eid)
            sid_b = c.buffer(sorted_ids)
            a_bytes = fx.Int64(tokens) * a_row
            a_bufs, dma_voff = [], []
            for rd in fx.range_constexpr(cfg.rounds):
                op = wave + rd * waves
                row, chunk = ix.dma_lane(op, lane, fmt)
                tok = c.load(sid_b, (row0 + row) * 4, 4) & fx.Int32(spec.TOKEN_MASK)
                dma_voff.append(tok * a_row + chunk * ix.DMA_BYTES)
                full = (rd + 1) * waves <= cfg.ops
                # a wave without an op this round reads nothing (a 0-byte range) into slot padding
                a_bufs.append(c.byte_buffer(xq, a_bytes if full else (op < cfg.ops).select(a_bytes, fx.Int64(0))))
            r16 = ix.operand_row(lane)
            g = ix.operand_kblock(lane)
            as_voff = []
            for mt in fx.range_constexpr(cfg.mt):
                tok = c.load(sid_b, (row0 + mt * ix.MFMA_M + r16) * 4, 4) & fx.Int32(spec.TOKEN_MASK)
                as_voff.append(ix.act_scale_offset(tok, g, Hp))
            as_buf = c.byte_buffer(xs, fx.Int64(tokens) * ix.act_scale_row_bytes(Hp))
            w_base = fx.Int64(w1) + e64 * w_expert
            ws_base = fx.Int64(w1s) + e64 * ws_expert
            first_rows = [ix.gemm1_tile(wave * tiles + j, c0, I, gate_up, tiles, waves)
                          for j in fx.range_constexpr(tiles)]
            nb = [r // ix.MFMA_N for r in first_rows]
            src = mainloop.Sources(
                ring=ring, a_buf=a_bufs, dma_voff=dma_voff, as_buf=as_buf, as_voff=as_voff,
                w_bufs=[tile_buffer(w_base, ix.tile_offset(b, 0, 0, kblocks), w_expert, 4) for b in nb],
                ws_bufs=[tile_buffer(ws_base, ix.tile_scale_offset(b, 0, 0, kblocks), ws_expert, 1) for b in nb])
            # b1 of each tile's result column (one load per lane and tile, before the K loop)
            bias = [fx.Float32(0.0) for _ in fx.range_constexpr(tiles)]
            if has_bias:
                b1_b = c.buffer(fx.Int64(b1) + e64 * (2 * Ip * 4), 2 * Ip * 4)
                bias = [c.f32_from_bits(c.load(b1_b, (r + ix.result_col(lane)) * 4, 4)) for r in first_rows]
            loop = mainloop.KLoop(cfg, src, lane, wave, c.AUX_NONTEMPORAL if nt else c.AUX_CACHED)
            loop.run(0, kblocks)
            loop.finish()
            acc = loop.acc

            pre = fx.recast_iter(fx.Float32, ring)
            out_b = c.buffer(inter)
            os_b = c.buffer(inter_s)
            for p in fx.range_constexpr(bm // ep_rows):
                if p > 0:
                    gpu.barrier()
                for mt in fx.range_constexpr(ep_rows // ix.MFMA_M):
                    for j in fx.range_constexpr(tiles):
                        vals = fx.memref_load_vec(acc[p * (ep_rows // ix.MFMA_M) + mt][j])
                        col = ix.gemm1_lds_col(wave * tiles + j, ix.result_col(lane), gate_up, tiles, waves)
                        for i in fx.range_constexpr(4):
                            r = mt * ix.MFMA_M + ix.result_row(lane, i)
                            c.lds_store(pre, r * stride + col, vals[i] + bias[j])
                gpu.barrier()
                for sw in fx.range_constexpr(sweeps):
                    r, cc = ix.gemm1_epilogue_item(tid, sw, tiles, waves)
                    if idle_threads:  # fewer rows than threads: the rest idle
                        r = (r < ep_rows).select(r, fx.Int32(0))
                    gate = c.lds_load_f32(pre, r * stride + cc, 8)
                    up = c.lds_load_f32(pre, r * stride + cols + cc, 8)
                    h = []
                    for i in fx.range_constexpr(8):
                        v = activation_fn(gate[i], up[i], activation)
                        h.append((c0 + cc + i < fx.Int32(I)).select(v, fx.Float32(0.0)))
                    byte = scale_byte(c.quad_max_i32(amax_bits(h)), fmt)
                    words = convert(h, byte, fmt)
                    orow = row0 + p * ep_rows + r
                    mine = (tid < fx.Int32(ep_rows * per_row)) if idle_threads else (tid >= fx.Int32(0))
                    if mine:
                        c.store(out_b, orow * out_row + ix.row_bytes(c0 + cc, fmt), c.vec_i32(words) if out_words > 1
                                else words[0], 4 * out_words)
                        if tid % 4 == 0:
                            c.store(os_b, ix.act_scale_offset(orow, (c0 + cc) // MX_BLOCK, Ip), byte, 1)
                        if c0 + cols >= fx.Int32(Ip):  # the last column block zeroes the row's unused scale bytes
                            if tid % per_row == 0:
                                for o in fx.range_constexpr(len(unused)):
                                    c.store(os_b, orow * srow + unused[o], fx.Int32(0), 1)

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
            grid=(1, 1, 1), block=(block, 1, 1), stream=stream
        )

    params = ("ptr",) * 10 + ("i32",)
    return c.KernelBuild(name, (block, 1, 1), params, launch)


def mx_values_per_word(fmt):
    return {"mxfp4": 8, "mxfp8": 4}[fmt]

"""Prefill expert GEMMs for Hopper (sm_90a) in Gluon: persistent,
warp-specialised, TMA-fed, wgmma with an fp4 producer.

One kernel body serves gemm1 (x @ W1^T + b1, activation, requantisation
into the intermediate [P, I] bf16 in sorted order) and gemm2 (inter @ W2^T +
b2, times the routing weight, added into y [T, H] f32, or stored per slot
into y [T, k, H] when DETERMINISTIC). Both walk work units (BM-row block m
of the sort contract, BN-column tile n) of the sort contract: only the
blocks below num_valid[0] exist, so the units form the prefix
[0, used_blocks * n_tiles) of a grouped order (GROUP_M blocks share each
weight tile while it is in L2), and each of the grid's persistent CTAs
takes every grid-th unit.

A CTA holds two partitions (12 warps: a 13th warp for the copies would make
16, and ptxas allocates every partition within 65536 / 512 = 128 registers,
too few for the consumers' 128 accumulators):
- the producer (4 warps) only upcasts: per K step the staged fp4 weight
  tiles and their E8M0 scales -> bf16 with the scale folded in (exact: an
  E2M1 value times a power of two is a bf16), into the operand ring, STAGES
  deep. Issuing copies itself cost it a partition barrier per copy (triton's
  membar), and it is the pipeline's narrowest part (bench/NOTES.md, Session 9);
- the consumers (the default partition: BM // 16 warps, one warpgroup per 64
  rows) create the TMA descriptors and issue every copy between a wgmma's
  issue and its wait: the activation tile [BM, BK] bf16 straight into the
  operand slot that just retired, and the weights W_STAGES steps ahead into
  the staging ring. They keep one wgmma in flight while the next slot is
  awaited, release a slot when its wgmma has retired, and run the epilogue.

The activation rows are read by TMA, which cannot gather: gemm1 reads x
already gathered into sorted order ([P, H] bf16, moe_gather.py; in the MX
modes that pre-pass also quantises), gemm2 reads gemm1's output, which is in
sorted order.

Weights are the sm90 layout (cuda/layout.py): values [E, N/64, K/128, 64,
64] and scales [E, N/64, K/128, 64, 4] bytes, zero-padded tiles. The kernels
view them as 3-D tensors [E * N/64, K/128 * 64, 64] and [E * N/64, K/128 *
16, 16] (a tile's scales are 16 rows of 16 bytes), so one TMA box brings a K
step of several 64-row tiles. A K step (BK = 64) is half a layout tile.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)

from jax_mxfp4_moe.cuda.kernels.moe_gemm import SILU
from jax_mxfp4_moe.cuda.kernels.mx import BF16, FP4_INV_DIVISOR, FP8_INV_DIVISOR, FP8_MAX, MXFP8
from jax_mxfp4_moe.cuda.kernels.routing import TOKEN_BITS, TOKEN_MASK

# The partition-wide barrier: `barrier` in triton 3.9, `thread_barrier` in 3.6.
_partition_barrier = getattr(gl, "barrier", None) or getattr(gl, "thread_barrier")
# TMA load into shared memory: `async_load` in triton 3.9, `async_copy_global_to_shared` in 3.6.
_tma_load = getattr(tma, "async_load", None) or getattr(tma, "async_copy_global_to_shared")

# Layout tile of the sm90 weight layout (cuda/layout.py TILE_N, TILE_K: the
# kernel sources, which alone key the code cache, keep their own copy): 64
# rows x 128 K; 64 bytes of values and 4 scale bytes per row.
TILE_N: gl.constexpr = gl.constexpr(64)
TILE_K: gl.constexpr = gl.constexpr(128)
PRODUCER_WARPS: gl.constexpr = gl.constexpr(4)


def _e2m1_pairs_asm() -> str:
    """PTX: one word of packed E2M1 (element 2i in the low nibble of byte i)
    and a bf16x2 scale -> its 8 elements in order as 4 bf16x2 words, each
    times the scale. Output word j holds elements 2j, 2j+1: prmt puts byte j
    of (word << 4) (element 2j in its high nibble) in the low half and byte j
    of the word (element 2j+1 in its high nibble) in the high half, each
    above a sign-replicated copy; after << 2 a nibble's magnitude sits at
    bits 6-8 of its half and bit 15 is its sign, so one mask leaves the bf16
    bits of the element times 2**-126 (E2M1's subnormal 0.5 lands on a bf16
    subnormal, exactly). The scale carries the 2**126 (FOLD)."""
    lines = ["{ .reg .b32 t, u;", "shl.b32 t, $4, 4;"]
    for j, sel in enumerate(("0xC480", "0xD591", "0xE6A2", "0xF7B3")):
        lines += [f"prmt.b32 u, t, $4, {sel};", "shl.b32 u, u, 2;", "and.b32 u, u, 0x81c081c0;",
                  f"mul.rn.bf16x2 ${j}, u, $5;"]
    return "\n".join(lines + ["}"])


E2M1_PAIRS_ASM: gl.constexpr = gl.constexpr(_e2m1_pairs_asm())


@gluon.jit
def _unit(u, used, n_tiles, GROUP_M: gl.constexpr):
    """Work unit u -> (row block m, column tile n): groups of GROUP_M row
    blocks, column tiles outer within a group, so the blocks of a group
    (mostly one expert's) share each weight tile while it is in L2."""
    per_group = GROUP_M * n_tiles
    first = (u // per_group) * GROUP_M
    size = gl.minimum(used - first, GROUP_M)
    r = u % per_group
    return first + r % size, r // size


@gluon.jit
def _units(nv_ptr, n_tiles, BM: gl.constexpr):
    """(used row blocks, this CTA's number of units)."""
    used = gl.load(nv_ptr) // BM
    total = used * n_tiles
    pid = gl.program_id(0)
    grid = gl.num_programs(0)
    mine = gl.where(pid < total, (total - pid + grid - 1) // grid, 0)
    return used, mine


# ---------------------------------------------------------------------------
# Producer partition
# ---------------------------------------------------------------------------

@gluon.jit
def _e8m0_to_bf16(s):
    """E8M0 scale bytes (int32) -> 2**(byte - 127) as bf16, exact for every
    byte: 0 is the subnormal 2**-127 (bits 0x0040), 255 is NaN."""
    bits = gl.where(s == 0, 0x40, s << 7)
    bits = gl.where(s == 255, 0x7FC0, bits)
    return bits.to(gl.int16).to(gl.bfloat16, bitcast=True)


@gluon.jit
def _upcast_block(v, sbytes, FOLD: gl.constexpr):
    """Packed E2M1 [R, NB, 16] (a thread holds whole 16-byte blocks) and each
    block's E8M0 scale byte [R, NB] (int32, same threads) -> bf16 [R, NB * 32]
    in K order with the scale multiplied in, exact.
    FOLD (every scale byte <= 128): the raw E2M1 bits (value * 2**-126) times
    2**(byte - 1), one bf16x2 multiply per pair (E2M1_PAIRS_ASM); otherwise
    triton's exact fp4_to_fp and a multiply by _e8m0_to_bf16."""
    R: gl.constexpr = v.shape[0]
    NB: gl.constexpr = v.shape[1]
    if FOLD:
        scale = ((sbytes + 126) << 7).to(gl.int16).to(gl.bfloat16, bitcast=True)
        lo, hi = gl.inline_asm_elementwise(E2M1_PAIRS_ASM, "=r,=r,=r,=r,r,r,r",
                                           [v, gl.expand_dims(scale, 2)],
                                           dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=4)
        # lo holds elements 0-3 of each word (at its 4 byte positions), hi 4-7
        both = gl.reshape(gl.join(lo, hi), [R, NB, 4, 4, 2])
        return gl.reshape(gl.permute(both, [0, 1, 2, 4, 3]), [R, NB * 32])
    else:
        vals = gl.fp4_to_fp(v, gl.bfloat16, axis=2)                              # [R, NB, 32]
        scale = gl.convert_layout(_e8m0_to_bf16(sbytes), gl.SliceLayout(2, vals.type.layout))
        return gl.reshape(vals * gl.expand_dims(scale, 2), [R, NB * 32])


@gluon.jit
def _weight_rows(j, sexp_ptr, used, n_tiles, NT, up_tile0, BN: gl.constexpr, GROUP_M: gl.constexpr,
                 INTERLEAVED: gl.constexpr):
    """First rows, in 64-row tiles of the 3-D weight views, of the two boxes
    of BN/2 weight rows of this CTA's unit j: the gate and up halves of its
    column tile when separated, consecutive rows otherwise."""
    m, n = _unit(gl.program_id(0) + j * gl.num_programs(0), used, n_tiles, GROUP_M)
    e = gl.load(sexp_ptr + m)
    HALF: gl.constexpr = BN // 2 // TILE_N  # 64-row tiles per half of the column tile
    if INTERLEAVED:
        t0 = n * (2 * HALF)
        t1 = t0 + HALF
    else:  # gate rows [n*BN/2, ...) and up rows I + [n*BN/2, ...)
        t0 = n * HALF
        t1 = up_tile0 + n * HALF
    return e * NT + t0, e * NT + t1


@gluon.jit
def _load_weights(w_desc, s_desc, bufs, w_ready, ws, row0, row1, k):
    """TMA of K step k's fp4 values and scales of the two row boxes into
    staging slot ws (one allocation per box, so that no partition barrier
    falls between the copies)."""
    w0, w1, s0, s1 = bufs
    BKH: gl.constexpr = w_desc.block_type.shape[2]  # BK / 2
    k0 = k * (2 * BKH)
    kt = k0 // TILE_K
    bar = w_ready.index(ws)
    mbarrier.expect(bar, 2 * (w_desc.block_type.nbytes + s_desc.block_type.nbytes))
    _tma_load(w_desc, [row0, kt * TILE_N, (k0 % TILE_K) // 2], bar, w0.index(ws))
    _tma_load(w_desc, [row1, kt * TILE_N, (k0 % TILE_K) // 2], bar, w1.index(ws))
    _tma_load(s_desc, [row0, kt * 16, 0], bar, s0.index(ws))
    _tma_load(s_desc, [row1, kt * 16, 0], bar, s1.index(ws))


@gluon.jit
def _load_half(w_half, s_half, kh, LV: gl.constexpr, LS: gl.constexpr):
    """One staged box of BN/2 weight rows -> registers, one 64-row layout tile
    at a time: (values [64, NB, 16] u8, scale bytes [64, NB] int32 of K half kh)."""
    TILES: gl.constexpr = w_half.shape[0]
    NB: gl.constexpr = w_half.shape[2] // 16
    wv = w_half.reshape([TILES * TILE_N, NB, 16])
    sv = s_half.reshape([TILES * TILE_N, 2, NB])  # (row, K half, block)
    out = ()
    for t in gl.static_range(TILES):
        v = wv.slice(t * TILE_N, TILE_N, dim=0).load(LV)
        s0, s1 = gl.split(gl.permute(sv.slice(t * TILE_N, TILE_N, dim=0).load(LS), [0, 2, 1]))
        # the same thread holds a block's values and its scale: no data moves
        sb = gl.convert_layout(gl.where(kh == 0, s0, s1).to(gl.int32), gl.SliceLayout(2, LV))
        out += ((v, sb), )
    return out


@gluon.jit
def _stack_rows(tiles, FOLD: gl.constexpr):
    """The upcast of 2 or 4 staged 64-row tiles, stacked along rows: [64 * len, BK]."""
    v, sb = tiles[0]
    t0 = _upcast_block(v, sb, FOLD)
    v, sb = tiles[1]
    t1 = _upcast_block(v, sb, FOLD)
    R: gl.constexpr = t0.shape[0]
    C: gl.constexpr = t0.shape[1]
    if len(tiles) == 2:
        return gl.reshape(gl.permute(gl.join(t0, t1), [2, 0, 1]), [2 * R, C])
    else:
        gl.static_assert(len(tiles) == 4, "2 or 4 tiles of 64 rows")
        v, sb = tiles[2]
        t2 = _upcast_block(v, sb, FOLD)
        v, sb = tiles[3]
        t3 = _upcast_block(v, sb, FOLD)
        both = gl.join(gl.join(t0, t1), gl.join(t2, t3))  # [R, C, tile % 2, tile // 2]
        return gl.reshape(gl.permute(both, [3, 2, 0, 1]), [4 * R, C])


@gluon.jit
def _upcaster(b_bufs, staging, ready, empty, w_ready, nv_ptr, K, n_tiles, BM: gl.constexpr,
              BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, W_STAGES: gl.constexpr,
              FOLD: gl.constexpr):
    """The producer: per K step c, the staged fp4 values [BN, BK/2] and their
    scales -> bf16 [BN, BK] with each 32-element block's scale multiplied in
    (exact), into operand slot c % STAGES. It issues no copies: TMA from a
    partition that also reads shared memory brings a partition barrier per
    copy (triton's membar), and these 4 warps are the pipeline's narrowest part."""
    NB: gl.constexpr = BK // 32  # 32-element blocks per row in a K step
    # a thread holds one row's 32-element block: 16 bytes in, 64 bytes out
    LV: gl.constexpr = gl.BlockedLayout([1, 1, 16], [32 // NB, NB, 1], [PRODUCER_WARPS, 1, 1], [2, 1, 0])
    # and that block's two scale bytes of the layout tile (K halves)
    LS: gl.constexpr = gl.BlockedLayout([1, 2, 1], [32 // NB, 1, NB], [PRODUCER_WARPS, 1, 1], [1, 2, 0])
    w0, w1, s0, s1 = staging
    used, mine = _units(nv_ptr, n_tiles, BM)
    kt_steps = gl.cdiv(K, BK)
    c = 0
    for j in range(mine):
        for k in range(kt_steps):
            kh = (k * BK % TILE_K) // BK
            ws = c % W_STAGES
            s = c % STAGES
            mbarrier.wait(w_ready.index(ws), (c // W_STAGES) & 1)
            mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
            bbuf = b_bufs.index(s)
            # every load of the step before any store (one partition barrier
            # at most between them, where triton cannot tell the buffers apart)
            tiles = _load_half(w0.index(ws), s0.index(ws), kh, LV, LS) + \
                _load_half(w1.index(ws), s1.index(ws), kh, LV, LS)
            # one store of the whole slot (triton 3.6 puts a partition barrier
            # between stores to slices of one buffer)
            bbuf.store(_stack_rows(tiles, FOLD))
            # generic-proxy accesses (the stores, and the staging reads) before
            # the async proxy's (wgmma reads, the TMA that refills the slot);
            # the arrive follows a partition barrier (membar), so the staging
            # slot is free once the consumers see step c ready
            fence_async_shared()
            mbarrier.arrive(ready.index(s), count=1)
            c += 1


@gluon.jit
def _load_a(a_desc, a_bufs, ready, c, m, k, BM: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr):
    """TMA of the activation tile [BM, BK] of row block m, K step k into
    operand slot c % STAGES (flat K step c)."""
    bar = ready.index(c % STAGES)
    mbarrier.expect(bar, a_desc.block_type.nbytes)
    _tma_load(a_desc, [m * BM, k * BK], bar, a_bufs.index(c % STAGES))


# ---------------------------------------------------------------------------
# Consumer partition (default) and epilogues
# ---------------------------------------------------------------------------

@gluon.jit
def _mx_fake_quant(x, FP8: gl.constexpr):
    """x [R, C] f32 (blocks of 32 along C, each held by one thread) -> the
    values its MXFP4 (FP8 False) or MXFP8 encoding represents, f32; the
    formats rule (kernels mx.py): byte = biased exponent of amax / 2**emax,
    +1 when mantissa bit 22 is set and (a lower bit or the exponent is
    non-zero); NaN/Inf -> 255; elements x * 2**(127 - byte) rounded to
    nearest even, saturating."""
    R: gl.constexpr = x.shape[0]
    C: gl.constexpr = x.shape[1]
    xb = gl.reshape(x, [R, C // 32, 32])
    amax = gl.max(gl.abs(xb), axis=2)
    has_nan = gl.max((xb != xb).to(gl.int32), axis=2)
    amax = gl.where(has_nan != 0, float("nan"), amax)
    if FP8:
        v = amax * FP8_INV_DIVISOR
    else:
        v = amax * FP4_INV_DIVISOR
    u = v.to(gl.int32, bitcast=True)
    exp = (u >> 23) & 0xFF
    round_up = ((u & 0x400000) != 0) & (((u & 0x3FFFFF) != 0) | (exp > 0))
    byte = gl.where(round_up & (exp != 0xFF), exp + 1, exp)
    e = 127 - byte
    e1 = e // 2
    e1 = gl.where((e < 0) & (e1 * 2 != e), e1 - 1, e1)
    e2 = e - e1
    f1 = ((e1 + 127) << 23).to(gl.float32, bitcast=True)
    f2 = ((e2 + 127) << 23).to(gl.float32, bitcast=True)
    y = xb * gl.expand_dims(f1, 2) * gl.expand_dims(f2, 2)
    if FP8:
        y = gl.where(y > FP8_MAX, FP8_MAX, y)
        y = gl.where(y < -FP8_MAX, -FP8_MAX, y)
        q = y.to(gl.float8e4nv, fp_downcast_rounding="rtne").to(gl.float32)
    else:
        a = gl.abs(y)
        q = gl.where(a <= 5.0, 4.0, 6.0)
        q = gl.where(a < 3.5, 3.0, q)
        q = gl.where(a <= 2.5, 2.0, q)
        q = gl.where(a < 1.75, 1.5, q)
        q = gl.where(a <= 1.25, 1.0, q)
        q = gl.where(a < 0.75, 0.5, q)
        q = gl.where(a <= 0.25, 0.0, q)
        q = gl.where(a != a, a, q)  # NaN stays NaN
        q = gl.where(y < 0, -q, q)
    sv = (byte << 23).to(gl.float32, bitcast=True)
    sv = gl.where(byte == 0, 5.877471754111438e-39, sv)
    sv = gl.where(byte == 255, float("nan"), sv)
    q = q * gl.expand_dims(sv, 2)
    return gl.reshape(q, [R, C])


@gluon.jit
def _halves(x):
    """x [R, C] -> (columns [0, C/2), columns [C/2, C)), layouts derived
    (each thread of an MMA layout holds columns of both halves)."""
    R: gl.constexpr = x.shape[0]
    C: gl.constexpr = x.shape[1]
    return gl.split(gl.permute(gl.reshape(x, [R, 2, C // 2]), [0, 2, 1]))


@gluon.jit
def _column_chunks(x, CHUNKS: gl.constexpr):
    """x [R, C] -> tuple of CHUNKS column ranges of C / CHUNKS, in order; the
    epilogues work through them one at a time so that fewer values (and
    their addresses) are live at once."""
    xs = (x, )
    for _ in gl.static_range(CHUNKS.bit_length() - 1):
        nxt = ()
        for i in gl.static_range(len(xs)):
            nxt += _halves(xs[i])
        xs = nxt
    return xs


@gluon.jit
def _activation(g, u, alpha, limit, ACT: gl.constexpr):
    if ACT == SILU:
        h = g / (1.0 + gl.exp(-g)) * u
    else:
        # where() rather than min/clamp so that NaN propagates
        g = gl.where(g > limit, limit, g)
        u = gl.where(u > limit, limit, u)
        u = gl.where(u < -limit, -limit, u)
        h = g / (1.0 + gl.exp(-alpha * g)) * (u + 1.0)
    return h


@gluon.jit
def _store_h(h, out_ptr, m, col0, I, BM: gl.constexpr, OUT_FMT: gl.constexpr,
             num_warps: gl.constexpr):
    """32 columns of gemm1's output, [BM, 32] f32 from col0: requantised
    (OUT_FMT) and stored as bf16 into the sorted intermediate [P, I]."""
    # two threads per row, 16 contiguous columns (32 bytes) each
    OUT: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [num_warps, 1], [1, 0])
    h = gl.convert_layout(h, OUT)
    if OUT_FMT != BF16:
        h = gl.convert_layout(_mx_fake_quant(h, OUT_FMT == MXFP8), OUT)  # the same layout: no data moves
    rows = m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, OUT))
    cols = col0 + gl.arange(0, 32, layout=gl.SliceLayout(0, OUT))
    ptrs = out_ptr + gl.expand_dims(rows.to(gl.int64) * I, 1) + gl.expand_dims(cols, 0)
    gl.store(ptrs, h.to(gl.bfloat16), mask=gl.expand_dims(cols < I, 0))


@gluon.jit
def _bias_rows(b_ptr, e, n, I, C: gl.constexpr, first_row, layout: gl.constexpr):
    """b1[e, first_row + j] for j < C (0 past row 2I)."""
    j = first_row + gl.arange(0, C, layout=layout)
    return gl.load(b_ptr + e.to(gl.int64) * (2 * I) + j, mask=j < 2 * I, other=0.0)


@gluon.jit
def _epilogue1(acc, out_ptr, b_ptr, e, m, n, I, alpha, limit, BM: gl.constexpr, BN: gl.constexpr,
               ACT: gl.constexpr, OUT_FMT: gl.constexpr, INTERLEAVED: gl.constexpr,
               HAS_BIAS: gl.constexpr, num_warps: gl.constexpr):
    """gemm1: + b1, act(gate, up), MX requantisation, bf16 store into the
    sorted intermediate [P, I], 32 output columns at a time. Column j of acc
    is W1 row n*BN + j when INTERLEAVED (gate even, up odd), else gate row
    n*BN/2 + j for j < BN/2 and up row I + n*BN/2 + j - BN/2."""
    HB: gl.constexpr = BN // 2
    NCH: gl.constexpr = HB // 32
    if INTERLEAVED:
        chunks = _column_chunks(acc, NCH)  # 64 columns: 32 (gate, up) pairs each
        for i in gl.static_range(NCH):
            a = chunks[i]
            if HAS_BIAS:
                a = a + gl.expand_dims(_bias_rows(b_ptr, e, n, I, 64, n * BN + 64 * i,
                                                  gl.SliceLayout(0, a.type.layout)), 0)
            g, u = gl.split(gl.reshape(a, [BM, 32, 2]))
            _store_h(_activation(g, u, alpha, limit, ACT), out_ptr, m, n * HB + 32 * i, I, BM,
                     OUT_FMT, num_warps)
    else:
        g_all, u_all = _halves(acc)
        gs = _column_chunks(g_all, NCH)
        us = _column_chunks(u_all, NCH)
        for i in gl.static_range(NCH):
            g = gs[i]
            u = us[i]
            if HAS_BIAS:
                g = g + gl.expand_dims(_bias_rows(b_ptr, e, n, I, 32, n * HB + 32 * i,
                                                  gl.SliceLayout(0, g.type.layout)), 0)
                u = u + gl.expand_dims(_bias_rows(b_ptr, e, n, I, 32, I + n * HB + 32 * i,
                                                  gl.SliceLayout(0, u.type.layout)), 0)
            _store_h(_activation(g, u, alpha, limit, ACT), out_ptr, m, n * HB + 32 * i, I, BM,
                     OUT_FMT, num_warps)


@gluon.jit
def _epilogue2(acc, y_ptr, b_ptr, sid_ptr, sw_ptr, e, m, n, H, T, TOPK, BM: gl.constexpr,
               BN: gl.constexpr, HAS_BIAS: gl.constexpr, DETERMINISTIC: gl.constexpr):
    """gemm2: (acc + b2) * routing weight of each row, added into y [T, H]
    f32 at the row's token (atomic), or stored into y [T, TOPK, H] at its
    (token, slot) when DETERMINISTIC; 64 columns at a time. Padding rows
    (token T) are skipped."""
    NCH: gl.constexpr = BN // 64
    chunks = _column_chunks(acc, NCH)
    for i in gl.static_range(NCH):
        a = chunks[i]
        rows = m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, a.type.layout))
        packed = gl.load(sid_ptr + rows)
        tok = packed & TOKEN_MASK
        wgt = gl.load(sw_ptr + rows)
        cols = n * BN + 64 * i + gl.arange(0, 64, layout=gl.SliceLayout(0, a.type.layout))
        col_ok = cols < H
        if HAS_BIAS:
            b = gl.load(b_ptr + e.to(gl.int64) * H + cols, mask=col_ok, other=0.0)
            a = a + gl.expand_dims(b, 0)
        a = a * gl.expand_dims(wgt, 1)
        ok = gl.expand_dims(tok < T, 1) & gl.expand_dims(col_ok, 0)
        if DETERMINISTIC:
            dst = tok.to(gl.int64) * TOPK + (packed >> TOKEN_BITS)
            gl.store(y_ptr + gl.expand_dims(dst * H, 1) + gl.expand_dims(cols, 0), a, mask=ok)
        else:
            gl.atomic_add(y_ptr + gl.expand_dims(tok.to(gl.int64) * H, 1) + gl.expand_dims(cols, 0),
                          a, mask=ok, sem="relaxed")


@gluon.jit
def _consumer(a_ptr, w_ptr, ws_ptr, a_bufs, b_bufs, staging, ready, empty, w_ready, out_ptr, b_ptr,
              sid_ptr, sw_ptr, sexp_ptr, nv_ptr, P, K, N_W, N_OUT, E, T, TOPK, I, n_tiles, up_tile0,
              alpha, limit, GEMM: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
              BK: gl.constexpr, STAGES: gl.constexpr, W_STAGES: gl.constexpr,
              GROUP_M: gl.constexpr, ACT: gl.constexpr, OUT_FMT: gl.constexpr,
              INTERLEAVED: gl.constexpr, HAS_BIAS: gl.constexpr, DETERMINISTIC: gl.constexpr,
              num_warps: gl.constexpr):
    """The MMA warpgroups. They also issue every TMA copy, between a wgmma's
    issue and its wait: the activation tile of step c - 1 + STAGES into the
    A slot that step c - 1 frees, and the weights of step c + W_STAGES into
    the staging slot that the producer has finished with once step c is
    ready (cursors of unit and K step: no division per step)."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BN, 16])
    a_desc = tma.make_tensor_descriptor(
        a_ptr, shape=[P, K], strides=[K, 1], block_shape=[BM, BK],
        layout=gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))
    NT = gl.cdiv(N_W, TILE_N)
    KT = gl.cdiv(K, TILE_K)
    HALF: gl.constexpr = BN // 2 // TILE_N
    w_desc = tma.make_tensor_descriptor(
        w_ptr, shape=[E * NT, KT * TILE_N, TILE_K // 2],
        strides=[KT * (TILE_N * TILE_K // 2), TILE_K // 2, 1], block_shape=[HALF, TILE_N, BK // 2],
        layout=gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=3))
    s_desc = tma.make_tensor_descriptor(
        ws_ptr, shape=[E * NT, KT * 16, 16], strides=[KT * 256, 16, 1], block_shape=[HALF, 16, 16],
        layout=gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=3))
    used, mine = _units(nv_ptr, n_tiles, BM)
    kt_steps = gl.cdiv(K, BK)
    # the weight cursor: unit jw, K step kw, rows of unit jw
    jw = 0
    kw = 0
    r0, r1 = _weight_rows(0, sexp_ptr, used, n_tiles, NT, up_tile0, BN, GROUP_M, INTERLEAVED)
    for i in gl.static_range(W_STAGES):
        if jw < mine:
            _load_weights(w_desc, s_desc, staging, w_ready, i, r0, r1, kw)
            kw += 1
            if kw == kt_steps:
                kw = 0
                jw += 1
                r0, r1 = _weight_rows(jw, sexp_ptr, used, n_tiles, NT, up_tile0, BN, GROUP_M, INTERLEAVED)
    ja = 0
    ka = 0
    ma, na = _unit(gl.program_id(0), used, n_tiles, GROUP_M)
    for i in gl.static_range(STAGES):
        if ja < mine:
            _load_a(a_desc, a_bufs, ready, i, ma, ka, BM, BK, STAGES)
            ka += 1
            if ka == kt_steps:
                ka = 0
                ja += 1
                ma, na = _unit(gl.program_id(0) + ja * gl.num_programs(0), used, n_tiles, GROUP_M)
    c = 0
    for j in range(mine):
        m, n = _unit(gl.program_id(0) + j * gl.num_programs(0), used, n_tiles, GROUP_M)
        e = gl.load(sexp_ptr + m)
        acc = gl.zeros([BM, BN], gl.float32, mma)
        for k in range(kt_steps):
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
            if jw < mine:
                _load_weights(w_desc, s_desc, staging, w_ready, c % W_STAGES, r0, r1, kw)
                kw += 1
                if kw == kt_steps:
                    kw = 0
                    jw += 1
                    r0, r1 = _weight_rows(jw, sexp_ptr, used, n_tiles, NT, up_tile0, BN, GROUP_M,
                                          INTERLEAVED)
            # one wgmma stays in flight while the next slot is awaited; the
            # previous one has retired (in both warpgroups: the barrier), so
            # its B slot goes back to the producer and its A slot takes the
            # tile STAGES steps ahead
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            if k > 0:
                _partition_barrier()
                mbarrier.arrive(empty.index((c - 1) % STAGES), count=1)
                if ja < mine:
                    _load_a(a_desc, a_bufs, ready, c - 1 + STAGES, ma, ka, BM, BK, STAGES)
                    ka += 1
                    if ka == kt_steps:
                        ka = 0
                        ja += 1
                        ma, na = _unit(gl.program_id(0) + ja * gl.num_programs(0), used, n_tiles, GROUP_M)
            c += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        _partition_barrier()
        mbarrier.arrive(empty.index((c - 1) % STAGES), count=1)
        if ja < mine:
            _load_a(a_desc, a_bufs, ready, c - 1 + STAGES, ma, ka, BM, BK, STAGES)
            ka += 1
            if ka == kt_steps:
                ka = 0
                ja += 1
                ma, na = _unit(gl.program_id(0) + ja * gl.num_programs(0), used, n_tiles, GROUP_M)
        if GEMM == 1:
            _epilogue1(acc, out_ptr, b_ptr, e, m, n, I, alpha, limit, BM, BN, ACT, OUT_FMT,
                       INTERLEAVED, HAS_BIAS, num_warps)
        else:
            _epilogue2(acc, out_ptr, b_ptr, sid_ptr, sw_ptr, e, m, n, N_OUT, T, TOPK, BM, BN,
                       HAS_BIAS, DETERMINISTIC)


@gluon.jit
def _moe_wgmma(a_ptr, w_ptr, ws_ptr, b_ptr, sid_ptr, sw_ptr, sexp_ptr, nv_ptr, out_ptr,
               P, K, N_W, N_OUT, E, T, TOPK, I, alpha, limit,
               GEMM: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
               STAGES: gl.constexpr, W_STAGES: gl.constexpr, GROUP_M: gl.constexpr,
               ACT: gl.constexpr, OUT_FMT: gl.constexpr, INTERLEAVED: gl.constexpr,
               HAS_BIAS: gl.constexpr, DETERMINISTIC: gl.constexpr, FOLD: gl.constexpr,
               PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    gl.static_assert(BM == 16 * num_warps, "one consumer warpgroup per 64 rows")
    gl.static_assert(BK == 64, "a K step is half an sm90 layout tile")
    a_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    a_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, BK], a_layout)
    b_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, BK], a_layout)
    raw: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=3)
    HALF: gl.constexpr = BN // 2 // TILE_N
    staging = (gl.allocate_shared_memory(gl.uint8, [W_STAGES, HALF, TILE_N, BK // 2], raw),
               gl.allocate_shared_memory(gl.uint8, [W_STAGES, HALF, TILE_N, BK // 2], raw),
               gl.allocate_shared_memory(gl.uint8, [W_STAGES, HALF, 16, 16], raw),
               gl.allocate_shared_memory(gl.uint8, [W_STAGES, HALF, 16, 16], raw))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_ready = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=2)  # the A copy's expect + the upcaster's arrive
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(W_STAGES):
        mbarrier.init(w_ready.index(i), count=1)
    if GEMM == 1:
        n_tiles = gl.cdiv(I, BN // 2)
    else:
        n_tiles = gl.cdiv(N_OUT, BN)
    up_tile0 = I // TILE_N
    gl.warp_specialize([
        (_consumer, (a_ptr, w_ptr, ws_ptr, a_bufs, b_bufs, staging, ready, empty, w_ready, out_ptr, b_ptr,
                     sid_ptr, sw_ptr, sexp_ptr, nv_ptr, P, K, N_W, N_OUT, E, T, TOPK, I, n_tiles,
                     up_tile0, alpha, limit, GEMM, BM, BN, BK, STAGES, W_STAGES, GROUP_M, ACT,
                     OUT_FMT, INTERLEAVED, HAS_BIAS, DETERMINISTIC, num_warps)),
        (_upcaster, (b_bufs, staging, ready, empty, w_ready, nv_ptr, K, n_tiles, BM, BN, BK, STAGES,
                      W_STAGES, FOLD)),
    ], [PRODUCER_WARPS], [PRODUCER_REGS])


@gluon.jit
def moe_wgmma_gemm1(x_ptr, w_ptr, ws_ptr, b_ptr, sid_ptr, sexp_ptr, nv_ptr, out_ptr,
                    P, H, I, E, swiglu_alpha, swiglu_limit,
                    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                    W_STAGES: gl.constexpr, GROUP_M: gl.constexpr, ACT: gl.constexpr,
                    OUT_FMT: gl.constexpr, INTERLEAVED: gl.constexpr, HAS_BIAS: gl.constexpr,
                    FOLD: gl.constexpr, PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """gemm1 over x gathered into sorted order (x [P, H] bf16): out [P, I]
    bf16 = requant(act(x @ W1[e]^T + b1[e])); ACT 0 silu, 1 swiglu_oai;
    OUT_FMT 0 bf16, 1 MXFP4, 2 MXFP8 values (as bf16)."""
    _moe_wgmma(x_ptr, w_ptr, ws_ptr, b_ptr, sid_ptr, sid_ptr, sexp_ptr, nv_ptr, out_ptr,
               P, H, 2 * I, I, E, 0, 0, I, swiglu_alpha, swiglu_limit,
               1, BM, BN, BK, STAGES, W_STAGES, GROUP_M, ACT, OUT_FMT, INTERLEAVED, HAS_BIAS,
               False, FOLD, PRODUCER_REGS, num_warps)


@gluon.jit
def moe_wgmma_gemm2(inter_ptr, w_ptr, ws_ptr, b_ptr, sid_ptr, sw_ptr, sexp_ptr, nv_ptr, y_ptr,
                    P, T, H, I, E, TOPK,
                    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                    W_STAGES: gl.constexpr, GROUP_M: gl.constexpr, HAS_BIAS: gl.constexpr,
                    DETERMINISTIC: gl.constexpr, FOLD: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                    num_warps: gl.constexpr):
    """gemm2 over the sorted intermediate [P, I] bf16: y [T, H] f32 +=
    w * (inter @ W2[e]^T + b2[e]) at each row's token (atomic), or y [T, TOPK,
    H] f32 = the same at (token, slot) when DETERMINISTIC."""
    _moe_wgmma(inter_ptr, w_ptr, ws_ptr, b_ptr, sid_ptr, sw_ptr, sexp_ptr, nv_ptr, y_ptr,
               P, I, H, H, E, T, TOPK, I, 0.0, 0.0,
               2, BM, BN, BK, STAGES, W_STAGES, GROUP_M, 0, 0, True, HAS_BIAS,
               DETERMINISTIC, FOLD, PRODUCER_REGS, num_warps)

"""Grouped matmuls through MXFP4 expert weights for Hopper (sm_90a) in Gluon:
the layer's derivative (layer/autodiff.py gmm_p) at 64 and 128 rows per block,
sm90 weights.

The same pipeline as the prefill GEMMs (moe_wgmma.py, whose helpers this
reuses): persistent CTAs, a 4-warp producer that upcasts TMA-staged fp4
tiles to bf16 with each 32-element block's E8M0 scale folded in (exact),
into a STAGES-deep operand ring, and BM // 16 consumer warps (one warpgroup
per 64 rows) that issue every TMA copy and async wgmma, and store f32.

For one expert's matrix W [N, K] (moe_gmm.py):
  forward    (TRANSPOSE False): out [P, N] = lhs [P, K] @ W^T. A K step (BK 64,
             half a layout tile) of BN output columns is BN weight rows: the
             producer's tile is [BN, BK], the wgmma's B its K-major view;
  transposed (TRANSPOSE True): out [P, K] = lhs [P, N] @ W. A step contracts
             over 64 weight rows (one layout tile row) and BN output columns
             are BN / 128 whole layout tiles along K, one TMA box: the
             producer upcasts each row's 32-element blocks with their own
             scales (the scales lie along the output axis, so the upcast is
             the same row-wise one) into [BK, BN], which is the wgmma's B
             as it stands (N-major).

Work units are (row block, BN-column tile). Blocks of expert -1 come out 0:
the host passes the blocks in an order with the live ones first (order) and
their count (n_live); the units of the live blocks form the prefix
[0, n_live * n_tiles) in the grouped order of moe_wgmma._unit, each CTA
taking every grid-th, and after them each CTA stores zeros into its share
of the dead blocks' rows. Every output element is written (no memset).

lhs is bf16 [P, KC], read by TMA (rows past P and columns past KC read 0).
Weights are the sm90 layout viewed as 3-D tensors [E * N/64, K/128 * 64, 64]
(values) and [E * N/64, K/128 * 16, 16] (scales), as moe_wgmma.py does;
boxes past a matrix's end read the next expert's tiles or zeros (TMA's
out-of-bounds fill), and the output columns they give are not stored.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)

from jax_mxfp4_moe.cuda.kernels.moe_wgmma import (PRODUCER_WARPS, TILE_K, TILE_N, _column_chunks,
                                                  _load_a, _load_half, _load_weights,
                                                  _partition_barrier, _stack_rows, _tma_load,
                                                  _unit, _upcast_block)


@gluon.jit
def _units(nlive_ptr, n_tiles):
    """(live row blocks, this CTA's number of units)."""
    used = gl.load(nlive_ptr)
    total = used * n_tiles
    pid = gl.program_id(0)
    grid = gl.num_programs(0)
    mine = gl.where(pid < total, (total - pid + grid - 1) // grid, 0)
    return used, mine


@gluon.jit
def _unit_block(j, order_ptr, used, n_tiles, GROUP_M: gl.constexpr):
    """(row block, column tile) of this CTA's unit j. The cursors ask for one
    unit past their last (and for unit 0 of a CTA that has none): that gives
    the last unit of all (block 0 when no block is live), never an index
    outside order."""
    u = gl.minimum(gl.program_id(0) + j * gl.num_programs(0), gl.maximum(used * n_tiles - 1, 0))
    m, n = _unit(u, gl.maximum(used, 1), n_tiles, GROUP_M)
    return gl.load(order_ptr + m), n


@gluon.jit
def _unit_weights(j, order_ptr, be_ptr, used, n_tiles, NT, GROUP_M: gl.constexpr):
    """(first 64-row tile of the unit's expert in the 3-D weight views, column tile)."""
    blk, n = _unit_block(j, order_ptr, used, n_tiles, GROUP_M)
    return gl.load(be_ptr + blk) * NT, n


@gluon.jit
def _load_step(w_desc, s_desc, staging, w_ready, ws, tile0, n, k, BN: gl.constexpr,
               TRANSPOSE: gl.constexpr):
    """TMA of the weights of K step k of column tile n (expert at tile0) into
    staging slot ws."""
    if TRANSPOSE:
        wv, sv = staging
        KT_PER: gl.constexpr = BN // TILE_K  # layout tiles along K per column tile
        bar = w_ready.index(ws)
        mbarrier.expect(bar, w_desc.block_type.nbytes + s_desc.block_type.nbytes)
        _tma_load(w_desc, [tile0 + k, n * (KT_PER * TILE_N), 0], bar, wv.index(ws))
        _tma_load(s_desc, [tile0 + k, n * (KT_PER * 16), 0], bar, sv.index(ws))
    else:
        HALF: gl.constexpr = BN // 2 // TILE_N
        row0 = tile0 + n * (2 * HALF)
        _load_weights(w_desc, s_desc, staging, w_ready, ws, row0, row0 + HALF, k)


@gluon.jit
def _upcast_along_k(wv, sv, FOLD: gl.constexpr):
    """One staged box of KT_PER layout tiles along K of one 64-row tile row:
    values [1, KT_PER * 64, 64] and scales [1, KT_PER * 16, 16] bytes ->
    bf16 [64, KT_PER * 128] (weight rows x K), each element times its own
    32-element block's scale."""
    TILES: gl.constexpr = wv.shape[1] // TILE_N
    NB: gl.constexpr = TILE_K // 32  # 32-element blocks per row of a tile
    # a thread holds one row's 32-element block: 16 bytes in, 64 bytes out
    LV: gl.constexpr = gl.BlockedLayout([1, 1, 16], [32 // NB, NB, 1], [PRODUCER_WARPS, 1, 1],
                                        [2, 1, 0])
    values = wv.reshape([TILES * TILE_N, NB, 16])
    scales = sv.reshape([TILES * TILE_N, NB])  # a tile's 256 scale bytes: [64 rows, NB]
    v = values.slice(0, TILE_N, dim=0).load(LV)
    sb = scales.slice(0, TILE_N, dim=0).load(gl.SliceLayout(2, LV)).to(gl.int32)
    t0 = _upcast_block(v, sb, FOLD)
    if TILES == 1:
        return t0
    else:
        gl.static_assert(TILES == 2, "one or two layout tiles along K per column tile")
        v = values.slice(TILE_N, TILE_N, dim=0).load(LV)
        sb = scales.slice(TILE_N, TILE_N, dim=0).load(gl.SliceLayout(2, LV)).to(gl.int32)
        t1 = _upcast_block(v, sb, FOLD)
        R: gl.constexpr = t0.shape[0]
        C: gl.constexpr = t0.shape[1]
        return gl.reshape(gl.permute(gl.join(t0, t1), [0, 2, 1]), [R, 2 * C])


@gluon.jit
def _upcaster(b_bufs, staging, ready, empty, w_ready, nlive_ptr, n_tiles, kt_steps,
              BK: gl.constexpr, STAGES: gl.constexpr, W_STAGES: gl.constexpr,
              FOLD: gl.constexpr, TRANSPOSE: gl.constexpr):
    """The producer: per K step c, the staged fp4 weights -> bf16 with each
    block's scale multiplied in (exact), into operand slot c % STAGES. It
    issues no copies (moe_wgmma._upcaster says why)."""
    NB: gl.constexpr = BK // 32
    LV: gl.constexpr = gl.BlockedLayout([1, 1, 16], [32 // NB, NB, 1], [PRODUCER_WARPS, 1, 1],
                                        [2, 1, 0])
    LS: gl.constexpr = gl.BlockedLayout([1, 2, 1], [32 // NB, 1, NB], [PRODUCER_WARPS, 1, 1],
                                        [1, 2, 0])
    used, mine = _units(nlive_ptr, n_tiles)
    c = 0
    for j in range(mine):
        for k in range(kt_steps):
            ws = c % W_STAGES
            s = c % STAGES
            mbarrier.wait(w_ready.index(ws), (c // W_STAGES) & 1)
            mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
            # every load of the step before the one store of the slot
            if TRANSPOSE:
                wv, sv = staging
                tile = _upcast_along_k(wv.index(ws), sv.index(ws), FOLD)
            else:
                w0, w1, s0, s1 = staging
                kh = (k * BK % TILE_K) // BK
                tiles = _load_half(w0.index(ws), s0.index(ws), kh, LV, LS) + \
                    _load_half(w1.index(ws), s1.index(ws), kh, LV, LS)
                tile = _stack_rows(tiles, FOLD)
            b_bufs.index(s).store(tile)
            fence_async_shared()
            mbarrier.arrive(ready.index(s), count=1)
            c += 1


@gluon.jit
def _store_tile(acc, out_ptr, blk, n, NO, BM: gl.constexpr, BN: gl.constexpr):
    """acc [BM, BN] f32 -> out rows blk * BM.., columns n * BN.. (< NO), 64
    columns at a time (fewer addresses live at once)."""
    NCH: gl.constexpr = BN // 64
    chunks = _column_chunks(acc, NCH)
    for i in gl.static_range(NCH):
        a = chunks[i]
        rows = blk * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, a.type.layout))
        cols = n * BN + 64 * i + gl.arange(0, 64, layout=gl.SliceLayout(0, a.type.layout))
        ptrs = out_ptr + gl.expand_dims(rows.to(gl.int64) * NO, 1) + gl.expand_dims(cols, 0)
        gl.store(ptrs, a, mask=gl.expand_dims(cols < NO, 0))


@gluon.jit
def _zero_dead_blocks(out_ptr, order_ptr, used, NB, NO, BM: gl.constexpr,
                      num_warps: gl.constexpr):
    """Zeros into the rows of the blocks order[used:], [BM, 128] at a time,
    every grid-th such piece from this CTA's."""
    Z: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [num_warps, 1], [1, 0])
    ZC: gl.constexpr = 128
    col_tiles = gl.cdiv(NO, ZC)
    zeros = gl.zeros([BM, ZC], gl.float32, Z)
    r = gl.arange(0, BM, layout=gl.SliceLayout(1, Z))
    cz = gl.arange(0, ZC, layout=gl.SliceLayout(0, Z))
    for z in range(gl.program_id(0), (NB - used) * col_tiles, gl.num_programs(0)):
        blk = gl.load(order_ptr + used + z // col_tiles)
        cols = (z % col_tiles) * ZC + cz
        ptrs = out_ptr + gl.expand_dims((blk * BM + r).to(gl.int64) * NO, 1) + gl.expand_dims(cols, 0)
        gl.store(ptrs, zeros, mask=gl.expand_dims(cols < NO, 0))


@gluon.jit
def _consumer(a_ptr, w_ptr, ws_ptr, be_ptr, order_ptr, nlive_ptr, out_ptr, a_bufs, b_bufs,
              staging, ready, empty, w_ready, P, NB, KC, NO, N_W, K_W, E, n_tiles, kt_steps,
              BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
              W_STAGES: gl.constexpr, GROUP_M: gl.constexpr, TRANSPOSE: gl.constexpr,
              num_warps: gl.constexpr):
    """The MMA warpgroups, which also issue every TMA copy between a wgmma's
    issue and its wait (moe_wgmma._consumer: the same cursors and ring
    protocol), then store each unit's f32 tile, then zeros for dead blocks."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BN, 16])
    a_desc = tma.make_tensor_descriptor(
        a_ptr, shape=[P, KC], strides=[KC, 1], block_shape=[BM, BK],
        layout=gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))
    NT = gl.cdiv(N_W, TILE_N)
    KT = gl.cdiv(K_W, TILE_K)
    raw: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=3)
    if TRANSPOSE:
        KT_PER: gl.constexpr = BN // TILE_K
        w_desc = tma.make_tensor_descriptor(
            w_ptr, shape=[E * NT, KT * TILE_N, TILE_K // 2],
            strides=[KT * (TILE_N * TILE_K // 2), TILE_K // 2, 1],
            block_shape=[1, KT_PER * TILE_N, TILE_K // 2], layout=raw)
        s_desc = tma.make_tensor_descriptor(
            ws_ptr, shape=[E * NT, KT * 16, 16], strides=[KT * 256, 16, 1],
            block_shape=[1, KT_PER * 16, 16], layout=raw)
    else:
        HALF: gl.constexpr = BN // 2 // TILE_N
        w_desc = tma.make_tensor_descriptor(
            w_ptr, shape=[E * NT, KT * TILE_N, TILE_K // 2],
            strides=[KT * (TILE_N * TILE_K // 2), TILE_K // 2, 1],
            block_shape=[HALF, TILE_N, BK // 2], layout=raw)
        s_desc = tma.make_tensor_descriptor(
            ws_ptr, shape=[E * NT, KT * 16, 16], strides=[KT * 256, 16, 1],
            block_shape=[HALF, 16, 16], layout=raw)
    used, mine = _units(nlive_ptr, n_tiles)
    # the weight cursor: unit jw, K step kw, that unit's expert tile and column tile
    jw = 0
    kw = 0
    tw0, nw = _unit_weights(0, order_ptr, be_ptr, used, n_tiles, NT, GROUP_M)
    for i in gl.static_range(W_STAGES):
        if jw < mine:
            _load_step(w_desc, s_desc, staging, w_ready, i, tw0, nw, kw, BN, TRANSPOSE)
            kw += 1
            if kw == kt_steps:
                kw = 0
                jw += 1
                tw0, nw = _unit_weights(jw, order_ptr, be_ptr, used, n_tiles, NT, GROUP_M)
    # the activation cursor: unit ja, K step ka, that unit's row block
    ja = 0
    ka = 0
    ma, na = _unit_block(0, order_ptr, used, n_tiles, GROUP_M)
    for i in gl.static_range(STAGES):
        if ja < mine:
            _load_a(a_desc, a_bufs, ready, i, ma, ka, BM, BK, STAGES)
            ka += 1
            if ka == kt_steps:
                ka = 0
                ja += 1
                ma, na = _unit_block(ja, order_ptr, used, n_tiles, GROUP_M)
    c = 0
    for j in range(mine):
        blk, n = _unit_block(j, order_ptr, used, n_tiles, GROUP_M)
        acc = gl.zeros([BM, BN], gl.float32, mma)
        for k in range(kt_steps):
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            if TRANSPOSE:
                acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s), acc, is_async=True)
            else:
                acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc,
                                    is_async=True)
            if jw < mine:
                _load_step(w_desc, s_desc, staging, w_ready, c % W_STAGES, tw0, nw, kw, BN,
                           TRANSPOSE)
                kw += 1
                if kw == kt_steps:
                    kw = 0
                    jw += 1
                    tw0, nw = _unit_weights(jw, order_ptr, be_ptr, used, n_tiles, NT, GROUP_M)
            # one wgmma in flight while the next slot is awaited; the previous
            # one has retired in both warpgroups (the barrier), so its B slot
            # goes back to the producer and its A slot takes the tile STAGES
            # steps ahead
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
                        ma, na = _unit_block(ja, order_ptr, used, n_tiles, GROUP_M)
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
                ma, na = _unit_block(ja, order_ptr, used, n_tiles, GROUP_M)
        _store_tile(acc, out_ptr, blk, n, NO, BM, BN)
    _zero_dead_blocks(out_ptr, order_ptr, used, NB, NO, BM, num_warps)


@gluon.jit
def moe_gmm_wgmma(a_ptr, be_ptr, order_ptr, nlive_ptr, w_ptr, ws_ptr, out_ptr, P, NB, N_W, K_W,
                  E, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                  STAGES: gl.constexpr, W_STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                  TRANSPOSE: gl.constexpr, FOLD: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                  num_warps: gl.constexpr):
    """out [P, NO] f32 (module docstring) for lhs a [P, KC] bf16, NB = P / BM
    row blocks through experts be [NB] (-1: zeros), order [NB] the blocks
    with the live ones first, nlive [1] their count; W [E, N_W, K_W] in the
    sm90 layout. NO, KC: N_W, K_W forward; K_W, N_W transposed."""
    gl.static_assert(BM == 16 * num_warps, "one consumer warpgroup per 64 rows")
    gl.static_assert(BK == 64, "a K step is half an sm90 layout tile (forward) or one tile row")
    a_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    raw: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=3)
    a_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, BK], a_layout)
    if TRANSPOSE:
        gl.static_assert(BK == TILE_N, "a transposed K step is one layout tile row")
        KT_PER: gl.constexpr = BN // TILE_K
        b_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BK, BN], a_layout)
        staging = (gl.allocate_shared_memory(gl.uint8, [W_STAGES, 1, KT_PER * TILE_N, TILE_K // 2], raw),
                   gl.allocate_shared_memory(gl.uint8, [W_STAGES, 1, KT_PER * 16, 16], raw))
        KC = N_W
        NO = K_W
        kt_steps = gl.cdiv(N_W, TILE_N)
    else:
        HALF: gl.constexpr = BN // 2 // TILE_N
        b_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, BK], a_layout)
        staging = (gl.allocate_shared_memory(gl.uint8, [W_STAGES, HALF, TILE_N, BK // 2], raw),
                   gl.allocate_shared_memory(gl.uint8, [W_STAGES, HALF, TILE_N, BK // 2], raw),
                   gl.allocate_shared_memory(gl.uint8, [W_STAGES, HALF, 16, 16], raw),
                   gl.allocate_shared_memory(gl.uint8, [W_STAGES, HALF, 16, 16], raw))
        KC = K_W
        NO = N_W
        kt_steps = gl.cdiv(K_W, BK)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_ready = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=2)  # the A copy's expect + the upcaster's arrive
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(W_STAGES):
        mbarrier.init(w_ready.index(i), count=1)
    n_tiles = gl.cdiv(NO, BN)
    gl.warp_specialize([
        (_consumer, (a_ptr, w_ptr, ws_ptr, be_ptr, order_ptr, nlive_ptr, out_ptr, a_bufs, b_bufs,
                     staging, ready, empty, w_ready, P, NB, KC, NO, N_W, K_W, E, n_tiles,
                     kt_steps, BM, BN, BK, STAGES, W_STAGES, GROUP_M, TRANSPOSE, num_warps)),
        (_upcaster, (b_bufs, staging, ready, empty, w_ready, nlive_ptr, n_tiles, kt_steps, BK,
                     STAGES, W_STAGES, FOLD, TRANSPOSE)),
    ], [PRODUCER_WARPS], [PRODUCER_REGS])

"""Index math of the gfx950 kernels, written once over integers.

Every function here uses only ``+ - * // % & ^ >>`` on non-negative values
and static Python branches, so the same code runs on Python ints, NumPy
arrays (the host functional model, ``functional_model``) and traced ``fx.Int32``
values (the FlyDSL kernels).  Static tile parameters (``bm``, ``nt``,
``waves``) are Python ints.

Scaled MFMA ``v_mfma_scale_f32_16x16x128_f8f6f4`` (CDNA4 ISA, "dense matrix
layouts" of the scaled MFMA): a wave of 64 lanes; lane ``l`` supplies, for
A (16 x 128, M x K), row ``l % 16`` and the 32 consecutive K elements
starting at ``32 * (l // 16)`` (16 bytes of fp4; fp8 takes its 32 bytes as
two 16-byte pieces 64 bytes apart), and one E8M0 scale byte for that row and
K block; B (128 x 16, K x N) the same with column ``l % 16``.  The scale
operand is a dword of which ``op_sel`` picks the byte.  The 16 x 16 f32
result: lane ``l`` holds rows ``4 * (l // 16) + i``, i = 0..3, of column
``l % 16``.
"""

from __future__ import annotations

WAVE = 64
MFMA_M = 16
MFMA_N = 16
MFMA_K = 128
K_PER_LANE = 32  # one MX block per lane and instruction
MX_BLOCK = 32
SCALES_PER_MFMA_K = MFMA_K // MX_BLOCK  # 4
K_GRANULE = MFMA_K  # weights' K is padded to this
N_GRANULE = 128  # and their N (rows) to this


def round_up(n, m):
    return (n + m - 1) // m * m


def padded_dims(hidden, intermediate):
    """(Hp, Ip): H and I padded to the kernels' granularity."""
    return round_up(hidden, max(K_GRANULE, N_GRANULE)), round_up(intermediate, max(K_GRANULE, N_GRANULE))


def row_bytes(k, fmt):
    """Bytes of a row of k MX elements (fp4: two per byte)."""
    if fmt == "mxfp4":
        return k // 2
    if fmt == "mxfp8":
        return k
    raise ValueError(f"fmt: expected 'mxfp4' or 'mxfp8', got {fmt!r}")


# --------------------------------------------------------------- MFMA lanes
def operand_row(lane):
    """Row of A (or column of B) lane ``lane`` supplies."""
    return lane % MFMA_M


def operand_chunks(lane, fmt):
    """(byte offset in a row's 128-K step, bytes) of the pieces lane ``lane`` loads, in register order."""
    g = lane // MFMA_M
    if fmt == "mxfp4":
        return [(g * 16, 16)]
    if fmt == "mxfp8":
        return [(g * 16, 16), (64 + g * 16, 16)]
    raise ValueError(f"fmt: expected 'mxfp4' or 'mxfp8', got {fmt!r}")


def operand_k(lane, j, fmt):
    """K index (within one 128-wide step) of the j-th element (register order) lane ``lane`` supplies."""
    g = lane // MFMA_M
    if fmt == "mxfp4":
        return g * K_PER_LANE + j
    if fmt == "mxfp8":
        return (j // 16) * 64 + g * 16 + j % 16
    raise ValueError(f"fmt: expected 'mxfp4' or 'mxfp8', got {fmt!r}")


def operand_kblock(lane):
    """MX block (within one 128-wide step) of the scale byte lane ``lane`` supplies."""
    return lane // MFMA_M


def scale_lane(row, kblock):
    """The lane whose scale byte covers (row, MX block ``kblock``): inverse of (operand_row, operand_kblock)."""
    return kblock * MFMA_M + row


def result_row(lane, i):
    return (lane // MFMA_N) * 4 + i


def result_col(lane):
    return lane % MFMA_N


# ----------------------------------------------------------- packed scales
# One lane's scale bytes of SCALE_STEPS consecutive 128-K steps form one
# dword (byte j = step 4q + j), so a lane loads its scales once per four
# steps and the MFMA's op_sel picks the byte (was one buffer_load_ubyte per
# step, half of all VMEM instructions of the first kernels).
SCALE_STEPS = 4


def scale_chunks(kblocks):
    """Dwords per lane that cover ``kblocks`` 128-K steps."""
    return (kblocks + SCALE_STEPS - 1) // SCALE_STEPS


def act_scale_row_bytes(k):
    """Bytes per row of activation scales for K = ``k`` (a multiple of 128): [chunks, 4 blocks, 4 steps]."""
    return scale_chunks(k // MFMA_K) * SCALE_STEPS * SCALES_PER_MFMA_K


def act_scale_offset(row, block, k):
    """Byte of the scale of MX block ``block`` (along K) of activation row ``row``.

    A lane (row r, K block g of step kb) loads the dword at
    ``act_scale_offset(r, 4 * 4q + g, k)`` for chunk q and picks byte kb % 4."""
    kb = block // SCALES_PER_MFMA_K
    g = block % SCALES_PER_MFMA_K
    return (row * act_scale_row_bytes(k) + (kb // SCALE_STEPS) * (SCALE_STEPS * SCALES_PER_MFMA_K)
            + g * SCALE_STEPS + kb % SCALE_STEPS)


# ------------------------------------------------------ weight pre-shuffle
# A weight matrix [N, K] (fp4: K/2 bytes per row) is stored as tiles of 16
# rows x 128 K: tile (nb, kb) holds, lane by lane, the 16 bytes lane ``l``
# reads for the scaled MFMA, so one wave loads a B operand as 1024
# consecutive bytes.  Scales: per 16-row tile and chunk of 4 steps, lane by
# lane, the lane's 4 scale bytes (one dword).
TILE_BYTES = WAVE * K_PER_LANE // 2  # 1024 bytes of fp4 per 16 x 128 tile
LANE_BYTES = K_PER_LANE // 2  # 16
SCALE_TILE_BYTES = WAVE * SCALE_STEPS  # 256 bytes of scales per tile and chunk


def tile_strides(kblocks):
    """Byte strides of (nb, kb, lane) in one expert's pre-shuffled weight tiles."""
    return (kblocks * TILE_BYTES, TILE_BYTES, LANE_BYTES)


def tile_scale_strides(kblocks):
    """Byte strides of (nb, chunk, lane) in one expert's packed scale tiles (+ byte kb % 4)."""
    return (scale_chunks(kblocks) * SCALE_TILE_BYTES, SCALE_TILE_BYTES, SCALE_STEPS)


def tile_offset(nb, kb, lane, kblocks):
    """Byte offset (within one expert) of lane ``lane``'s 16 bytes of tile (nb, kb)."""
    s_nb, s_kb, s_lane = tile_strides(kblocks)
    return nb * s_nb + kb * s_kb + lane * s_lane


def tile_scale_offset(nb, kb, lane, kblocks):
    """Byte offset (within one expert) of lane ``lane``'s scale byte of tile (nb, kb)."""
    s_nb, s_q, s_lane = tile_scale_strides(kblocks)
    return nb * s_nb + (kb // SCALE_STEPS) * s_q + lane * s_lane + kb % SCALE_STEPS


def tile_source(nb, kb, lane):
    """(row, first byte of the row, scale column) a shuffled lane slot comes from."""
    row = nb * MFMA_N + operand_row(lane)
    byte = kb * (MFMA_K // 2) + operand_kblock(lane) * LANE_BYTES
    scol = kb * SCALES_PER_MFMA_K + operand_kblock(lane)
    return row, byte, scol


# --------------------------------------------------- A staging (LDS ring)
# The A rows of a block pass through an LDS ring of RING_SLOTS slots, one
# per stage of STAGE_STEPS 128-K steps, filled by buffer_load ... lds (each
# lane writes 16 bytes at M0 + 16 * lane) and read by ds_read_b128.  The DMA
# of stage u + A_DISTANCE is issued at the barrier of stage u; two more
# slots hold the stage being read and the one whose last reads may still be
# in flight (A operands are read one step ahead of their MFMAs).
STAGE_STEPS = 2
RING_SLOTS = 4
A_DISTANCE = RING_SLOTS - 2
DMA_BYTES = 16


def stage_row_bytes(fmt):
    """Bytes of one A row in one ring slot (256 K)."""
    return STAGE_STEPS * row_bytes(MFMA_K, fmt)


def lds_chunk(row, chunk, fmt):
    """Physical 16-byte chunk (within its row of a slot) of logical chunk ``chunk`` of row ``row``.

    An XOR swizzle (an involution for each row): fp4 rows are 128 bytes, two
    per 256-byte line of the 64 four-byte banks, so rows 2m, 2m + 1 share a
    line and (row >> 1) & 7 spreads 16 rows over all banks; fp8 rows fill a
    line and row & 15 does the same.  Without it the 16 lanes that read one
    chunk of 16 rows hit the same banks."""
    if fmt == "mxfp4":
        return chunk ^ ((row >> 1) & 7)
    return chunk ^ (row & 15)


def dma_rows_per_op(fmt):
    """A rows one wave-wide LDS DMA fills (64 lanes x 16 bytes)."""
    return WAVE * DMA_BYTES // stage_row_bytes(fmt)


def dma_ops(bm, fmt):
    """Wave-wide DMA operations per stage for a block of ``bm`` rows."""
    return max(1, bm // dma_rows_per_op(fmt))


def dma_lane(op, lane, fmt):
    """(row, logical chunk) lane ``lane`` of DMA operation ``op`` loads; it lands
    at byte ``op * 1024 + 16 * lane`` of the slot (row-major, swizzled)."""
    per_row = stage_row_bytes(fmt) // DMA_BYTES
    row = op * dma_rows_per_op(fmt) + lane // per_row
    return row, lds_chunk(row, lane % per_row, fmt)


def a_read_chunks(lane, step_in_stage, fmt):
    """Logical chunks (within the slot row) lane ``lane`` reads for one step, in register order."""
    base = step_in_stage * row_bytes(MFMA_K, fmt)
    return [(base + off) // DMA_BYTES for off, _ in operand_chunks(lane, fmt)]


# --------------------------------------------------------- gemm tile maps
# A block of ``waves`` waves computes bm rows x (16 * nt * waves) weight
# rows; wave w owns the nt 16-row tiles w * nt .. w * nt + nt - 1 of the
# block, over all bm rows (bm / 16 M tiles).
def block_rows(nt, waves):
    """Weight rows (N) one block covers."""
    return MFMA_N * nt * waves


def gemm1_cols(nt, waves):
    """Intermediate columns one gemm1 block produces (half its W1 rows)."""
    return block_rows(nt, waves) // 2


def gemm1_tile(gt, c0, intermediate, gate_up, nt, waves):
    """First W1 row of the block's tile ``gt`` (0 .. nt * waves - 1) for columns c0..

    separated: the first half of the tiles are gate rows c0 + 16 gt, the
    second half up rows I + c0 + ...; interleaved: rows 2 c0 + 16 gt (gate and
    up of column j are rows 2j, 2j + 1)."""
    cols = gemm1_cols(nt, waves)
    if gate_up == "separated":
        half = gt // (cols // MFMA_N)
        sub = gt % (cols // MFMA_N)
        return half * intermediate + c0 + sub * MFMA_N
    if gate_up == "interleaved":
        return 2 * c0 + gt * MFMA_N
    raise ValueError(f"gate_up: expected 'separated' or 'interleaved', got {gate_up!r}")


def gemm1_lds_col(gt, col, gate_up, nt, waves):
    """Column of the epilogue's [gate | up] f32 tile that result column ``col`` (0..15) of tile ``gt`` fills."""
    cols = gemm1_cols(nt, waves)
    if gate_up == "separated":
        return gt * MFMA_N + col  # gate tiles first, then up tiles: already [gate | up]
    if gate_up == "interleaved":
        return (col % 2) * cols + gt * (MFMA_N // 2) + col // 2
    raise ValueError(f"gate_up: expected 'separated' or 'interleaved', got {gate_up!r}")


# Epilogues run over passes of at most EPILOGUE_ROWS rows (LDS budget): the
# waves write the f32 results of the pass's M tiles, each thread then takes
# 8 consecutive columns of one row (gemm1; a quad of lanes holds one MX
# block) or a column pair over rows (gemm2).
EPILOGUE_ROWS = 32
LDS_PAD = 4  # f32 per row: rows 4 apart (one result lane group) start 16 banks apart


def epilogue_rows(bm):
    return min(bm, EPILOGUE_ROWS)


def gemm1_lds_stride(nt, waves):
    return 2 * gemm1_cols(nt, waves) + LDS_PAD


def gemm1_epilogue_item(tid, sweep, nt, waves):
    """(row in pass, first column) of the 8 columns thread ``tid`` takes in sweep
    ``sweep``; a row at or past ``epilogue_rows(bm)`` means the thread idles."""
    per_row = gemm1_cols(nt, waves) // 8
    rows = WAVE * waves // per_row
    return sweep * rows + tid // per_row, (tid % per_row) * 8


def gemm1_epilogue_sweeps(bm, nt, waves):
    per_row = gemm1_cols(nt, waves) // 8
    return max(1, epilogue_rows(bm) // (WAVE * waves // per_row))


def gemm2_lds_stride(nt, waves):
    return block_rows(nt, waves) + LDS_PAD


def gemm2_epilogue_item(tid, sweep, nt, waves):
    """(row in pass, first column) of the column pair thread ``tid`` adds in sweep ``sweep``."""
    per_row = block_rows(nt, waves) // 2
    rows = WAVE * waves // per_row
    return sweep * rows + tid // per_row, (tid % per_row) * 2


def gemm2_epilogue_sweeps(bm, nt, waves):
    per_row = block_rows(nt, waves) // 2
    rows = WAVE * waves // per_row
    if epilogue_rows(bm) % rows:
        raise ValueError(f"gemm2 epilogue: {rows} rows per sweep do not divide {epilogue_rows(bm)}")
    return epilogue_rows(bm) // rows


# ------------------------------------------------------------ K schedule
def k_split_steps(kblocks, k_splits):
    """128-K steps per split: a multiple of SCALE_STEPS (the packed scales'
    chunk), so every split starts on a chunk; the last split takes the rest."""
    per = round_up(-(-kblocks // k_splits), SCALE_STEPS)
    return per


def k_splits_used(kblocks, k_splits):
    """Splits that have steps (k_split_steps rounds up, so fewer may remain)."""
    return -(-kblocks // k_split_steps(kblocks, k_splits))


def k_split_range(s, kblocks, k_splits):
    """(first step, steps) of split ``s`` (Python ints)."""
    per = k_split_steps(kblocks, k_splits)
    first = s * per
    return first, min(per, kblocks - first)


PREFETCH_DEPTHS = (2, 4, 8)  # B prefetch distances in steps


def scale_lead(prefetch):
    """Steps between the load of a chunk's packed scales and its first MFMA:
    at least a whole chunk (they are issued after the B loads of a step, so a
    shorter lead would make the chunk's first MFMAs wait for them)."""
    return max(SCALE_STEPS, prefetch)


def scale_sets(prefetch):
    """Register sets for packed scales: chunk q's dwords are loaded at step
    4q - scale_lead, after chunk q - sets (last step 4(q - sets) + 3) used them."""
    return (scale_lead(prefetch) + SCALE_STEPS - 1) // SCALE_STEPS + 1


def loop_body_steps(prefetch):
    """Steps per body of the steady K loop: every rotation (B register sets,
    scale sets, ring slots, A double buffer) repeats in it, so each register
    and slot index in the body is static."""
    if prefetch not in PREFETCH_DEPTHS:
        raise ValueError(f"prefetch: expected one of {PREFETCH_DEPTHS}, got {prefetch}")
    body = STAGE_STEPS * RING_SLOTS
    for period in (prefetch, SCALE_STEPS * scale_sets(prefetch)):
        while body % period:
            body += STAGE_STEPS * RING_SLOTS
    return body


def steady_iterations(steps, prefetch):
    """Iterations of the steady loop over ``steps`` K steps: every load a
    steady step issues (B ``prefetch`` steps ahead, scales ``scale_lead``) exists; the
    remaining steps run unrolled after it.  (A's DMA may run past the last
    stage: it reads bytes inside the buffer or zeros, into unused slots.)"""
    return max(0, (steps - max(prefetch, scale_lead(prefetch))) // loop_body_steps(prefetch))


# ------------------------------------------------------------------- grids
# Block sizes and launch grids (the FFI launcher computes grids from these;
# the kernels declare the same block sizes).
SORT_BLOCK = WAVE  # one wave
# Large-T sort: entries per chunk (one wave each in the count and scatter
# launches), and the entry count from which the three-launch path is used.
SORT_CHUNK = 16 * WAVE
SORT_ONESHOT_MAX_ENTRIES = 4 * SORT_CHUNK
QUANT_BLOCK = 256  # threads; one MX block each
XCDS = 8  # gfx950: workgroup ids go round-robin to 8 XCDs


def sort_grid():
    return (1, 1, 1)


def sort_chunks(tokens, top_k):
    return max(1, -(-tokens * top_k // SORT_CHUNK))


def sort_chunk_grid(tokens, top_k):
    """Grid of the count and scatter launches of the large-T sort."""
    return (sort_chunks(tokens, top_k), 1, 1)


def quant_grid(rows, cols):
    blocks = rows * (cols // MX_BLOCK)
    return (max(1, (blocks + QUANT_BLOCK - 1) // QUANT_BLOCK), 1, 1)


# GEMM grids are (n_tiles, row_blocks, k_splits), as on the CUDA backend.
def max_row_blocks(entries, num_experts, bm):
    """The most bm-row blocks ``entries`` routed entries over ``num_experts``
    experts can fill: with u experts in use, sum(ceil(c_e / bm)) <= u +
    (entries - u) // bm, largest at u = min(E, entries)."""
    u = min(num_experts, entries)
    return max(1, u + (entries - u) // bm)


def n_tiles(n_rows, nt, waves):
    """Column tiles of a gemm over ``n_rows`` weight rows, padded to a multiple
    of XCDS: block (n, m, s) then runs on XCD n % 8 for every row block m, so
    the row blocks that share a weight tile share that XCD's L2 (the padding
    blocks exit at once)."""
    return round_up(-(-n_rows // block_rows(nt, waves)), XCDS)


def gemm_grid(n_rows, row_blocks, nt, waves, k_splits=1):
    """(n_tiles, row_blocks, k_splits): axis 0 = N tile, 1 = sorted row block, 2 = K split."""
    return (n_tiles(n_rows, nt, waves), row_blocks, k_splits)


def workgroup_xcd(n, m, s, grid):
    """XCD of block (n, m, s): the dispatcher hands linear ids round-robin to XCDs."""
    nx, ny, _ = grid
    return (n + nx * (m + ny * s)) % XCDS

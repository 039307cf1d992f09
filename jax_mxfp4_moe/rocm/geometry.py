"""Index math of the gfx950 kernels, written once over integers.

Every function here uses only ``+ - * // %`` on non-negative values and
static Python branches, so the same code runs on Python ints, NumPy arrays
(the host functional model, ``rocm_tile``) and traced ``fx.Int32`` values
(the FlyDSL kernels).

Scaled MFMA ``v_mfma_scale_f32_16x16x128_f8f6f4`` (CDNA4 ISA, "dense matrix
layouts" of the scaled MFMA): a wave of 64 lanes; lane ``l`` supplies, for
A (16 x 128, M x K), row ``l % 16`` and the 32 consecutive K elements
starting at ``32 * (l // 16)`` (16 bytes of fp4, 32 bytes of fp8), and one
E8M0 scale byte for that row and K block; B (128 x 16, K x N) the same with
column ``l % 16``.  The 16 x 16 f32 result: lane ``l`` holds rows
``4 * (l // 16) + i``, i = 0..3, of column ``l % 16``.
"""

from __future__ import annotations

WAVE = 64
MFMA_M = 16
MFMA_N = 16
MFMA_K = 128
K_PER_LANE = 32  # one MX block per lane and instruction
MX_BLOCK = 32
SCALES_PER_MFMA_K = MFMA_K // MX_BLOCK  # 4

# GEMM tiling shared by gemm1 and gemm2: a block of 4 waves computes BM rows
# and BN output columns; each wave owns BN / 4 columns (WAVE_N).
BM = 32
WAVES = 4
WAVE_N = 32
BN = WAVES * WAVE_N  # 128 output columns per block
M_TILES = BM // MFMA_M  # 2
K_GRANULE = MFMA_K  # weights' K is padded to this
N_GRANULE = BN  # and their N (rows) to this


def round_up(n, m):
    return (n + m - 1) // m * m


def padded_dims(hidden, intermediate):
    """(Hp, Ip): H and I padded to the kernels' granularity."""
    return round_up(hidden, max(K_GRANULE, N_GRANULE)), round_up(intermediate, max(K_GRANULE, N_GRANULE))


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


# ------------------------------------------------------ weight pre-shuffle
# A weight matrix [N, K] (fp4: K/2 bytes per row, scales K/32 per row) is
# stored as tiles of 16 rows x 128 K: tile (nb, kb) holds, lane by lane, the
# 16 bytes (and the one scale byte) that lane reads for the scaled MFMA, so
# one wave loads a B operand as 1024 (64) consecutive bytes.
TILE_BYTES = WAVE * K_PER_LANE // 2  # 1024 bytes of fp4 per 16 x 128 tile
LANE_BYTES = K_PER_LANE // 2  # 16


def tile_strides(kblocks):
    """Byte strides of (nb, kb, lane) in one expert's pre-shuffled weight tiles."""
    return (kblocks * TILE_BYTES, TILE_BYTES, LANE_BYTES)


def tile_scale_strides(kblocks):
    """Byte strides of (nb, kb, lane) in one expert's pre-shuffled scale tiles."""
    return (kblocks * WAVE, WAVE, 1)


def tile_offset(nb, kb, lane, kblocks):
    """Byte offset (within one expert) of lane ``lane``'s 16 bytes of tile (nb, kb)."""
    s_nb, s_kb, s_lane = tile_strides(kblocks)
    return nb * s_nb + kb * s_kb + lane * s_lane


def tile_scale_offset(nb, kb, lane, kblocks):
    """Byte offset (within one expert) of lane ``lane``'s scale byte of tile (nb, kb)."""
    s_nb, s_kb, s_lane = tile_scale_strides(kblocks)
    return nb * s_nb + kb * s_kb + lane * s_lane


def tile_source(nb, kb, lane):
    """(row, first byte of the row, scale column) a shuffled lane slot comes from."""
    row = nb * MFMA_N + operand_row(lane)
    byte = kb * (MFMA_K // 2) + operand_kblock(lane) * LANE_BYTES
    scol = kb * SCALES_PER_MFMA_K + operand_kblock(lane)
    return row, byte, scol


# ---------------------------------------------------------------- gemm1 map
# gemm1 block ``by`` computes intermediate columns c0 = by * BN .. c0 + BN.
# Its 2 * BN rows of W1 (gate and up) are 8 tiles of 16 rows, 2 per wave.
# Pre-activation values go to an LDS tile [BM, 2 * BN]; ``gate_up`` decides
# which W1 rows each tile reads and where gate and up land in LDS.
G1_TILES_PER_WAVE = 2 * WAVE_N // MFMA_N  # 4
G1_LDS_COLS = 2 * BN


def gemm1_tile(wave, t, c0, intermediate, gate_up):
    """(first W1 row, first LDS column) of wave ``wave``'s tile ``t`` (0..3)."""
    if gate_up == "separated":
        # tiles 0, 1: gate rows; 2, 3: up rows (I rows further); LDS [gate | up]
        half = t // 2
        sub = t % 2
        col = wave * WAVE_N + sub * MFMA_N
        return half * intermediate + c0 + col, half * BN + col
    if gate_up == "interleaved":
        # W1 row 2j is gate j, 2j + 1 is up j; LDS keeps that order
        col = wave * 2 * WAVE_N + t * MFMA_N
        return 2 * c0 + col, col
    raise ValueError(f"gate_up: expected 'separated' or 'interleaved', got {gate_up!r}")


def gemm1_lds_gate_up(j, gate_up):
    """LDS columns (gate, up) of local intermediate column j (0..BN-1)."""
    if gate_up == "separated":
        return j, BN + j
    if gate_up == "interleaved":
        return 2 * j, 2 * j + 1
    raise ValueError(f"gate_up: expected 'separated' or 'interleaved', got {gate_up!r}")


# Epilogue: thread ``tid`` < BM * BN / 32 quantises one MX block of the tile.
def epilogue_block(tid):
    """(row in tile, MX block of columns) thread ``tid`` quantises in gemm1."""
    return tid // (BN // MX_BLOCK), tid % (BN // MX_BLOCK)


# gemm2 epilogue: 2 adjacent output columns per atomic, 8 pairs per thread.
G2_PAIRS = BM * BN // 2
G2_THREADS = WAVES * WAVE


def gemm2_pair(tid, it):
    """(row in tile, first column in tile) of pair ``it`` of thread ``tid``."""
    p = it * G2_THREADS + tid
    return p // (BN // 2), (p % (BN // 2)) * 2


# ------------------------------------------------------------------- grids
# Block sizes and launch grids (the FFI launcher computes grids from these;
# the kernels declare the same block sizes).
SORT_BLOCK = WAVE  # one wave
# Large-T sort: entries per chunk (one wave each in the count and scatter
# launches), and the entry count from which the three-launch path is used.
SORT_CHUNK = 16 * WAVE
SORT_ONESHOT_MAX_ENTRIES = 4 * SORT_CHUNK
QUANT_BLOCK = 256  # one thread per MX block
GEMM_BLOCK = WAVES * WAVE


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
def gemm1_grid(num_sorted_blocks, intermediate_padded):
    return (intermediate_padded // BN, num_sorted_blocks, 1)


def gemm2_grid(num_sorted_blocks, hidden_padded):
    return (hidden_padded // BN, num_sorted_blocks, 1)

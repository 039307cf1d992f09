"""The CUDA backend's configuration: thresholds and the one block-configuration
table of the Triton kernels (sweeps behind it: bench/NOTES.md)."""

from __future__ import annotations

import dataclasses
import math

# ---------------------------------------------------------------------------
# Block configurations: the one heuristic table
# ---------------------------------------------------------------------------

NUM_SMS = 132  # H100 SXM / H200; used only to size split-K

# Sort: one program up to this many (token, slot) entries, else chunked
# (sort_chunk). A program places its entries 128 at a time, one batch after
# another (~5 us each on an H100: the one-program sort took 90 us at 2048 entries).
SORT_ONESHOT_MAX_ENTRIES = 512
SORT_OFFSETS_GROUP = 8  # chunk histograms per load in moe_sort_offsets


def sort_chunk(n: int) -> int:
    """Entries per program of the chunked sort of n entries: a power of two
    from 256 up, so that ~32 programs share the work."""
    return max(256, 1 << (-(-n // 32) - 1).bit_length())


# Decode: up to this many (token, slot) entries (and no expert mask), the gemm
# kernels derive their blocks from topk_ids themselves (DIRECT: no sort
# launch), gemm1 zeroes gemm2's accumulator (no memset) and gemm2's last
# program per column tile writes the output dtype (no cast launch). Every
# program recomputes the routing with O((T*k)^2) compares: at 64 entries that
# was ~2,800 SASS instructions per program, a fair share of a decode loop.
DIRECT_MAX = 32

# The Gluon prefill kernels where the table below names them (False: the
# dot_scaled kernels everywhere, for side-by-side measurements).
PREFILL_KERNELS = True

# moe_gemm's FOLD (the 2**126 of the raw E2M1 bits carried by the scale,
# 2**(byte - 1) as a bf16) needs every scale byte <= this.
FOLD_MAX_SCALE_BYTE = 128


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_n: int      # gemm1: intermediate columns (2x W1 rows); gemm2: H columns
    block_k: int
    swap: int         # operand order / upcast, cuda/kernels/moe_gemm.py SWAP:
                      # 0 tokens on the MMA's M side; 1, 2 weight rows on it (small BM)
    num_warps: int
    num_stages: int   # triton's software pipeline depth (cp.async copies in flight)
    split_k: int = 1  # set by choose_config
    fuse_x_quant: bool = True  # gemm1 only: MX-quantise A as it loads (else a pre-pass)


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """The Gluon prefill GEMMs (cuda/kernels/moe_wgmma.py): persistent CTAs
    of block_m // 16 consumer warps (one warpgroup per 64 token rows, async
    wgmma over block_m x block_n tiles) and a 4-warp fp4 producer."""
    block_n: int = 256         # gemm1: 2x intermediate columns (W1 rows); gemm2: H columns
    stages: int = 3            # operand ring (A and upcast B slots) depth
    w_stages: int = 5          # fp4 staging ring depth: the consumers issue the weights'
                               # TMA once a step is ready, and the producer runs up to
                               # stages - 1 steps ahead of them: w_stages - stages + 1
                               # steps of lead for the copy
    group_m: int = 8           # row blocks sharing each weight tile while it is in L2
    producer_regs: int = 96    # registers of the producer warps (setmaxnreg)
    maxnreg: int = 168         # the kernel's cap: 65536 / 384 threads; ptxas allocates
                               # every partition within it (the consumers' 128 f32
                               # accumulators at block_n 256 need ~160)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    block_m: int
    gemm1: GemmConfig
    gemm2: GemmConfig
    # Warps per SM the decode regimes aim for: split-K sizes the grid to it,
    # and moe_decode (both gemms in one kernel) is capped at the registers
    # that let that many warps fit (decode_maxnreg).
    warps_per_sm: int = 12
    # The Gluon wgmma kernels, where the regime uses them and the weights are
    # in the sm90 layout (else gemm1 / gemm2 above).
    prefill: PrefillConfig | None = None

    @property
    def decode_maxnreg(self) -> int:
        return decode_maxnreg(self.warps_per_sm)


def decode_maxnreg(warps_per_sm: int) -> int:
    """Registers per thread at which warps_per_sm warps fit an SM's 64K in
    total (its sub-partitions may hold fewer: programs_per_sm)."""
    return 65536 // (warps_per_sm * 32) // 8 * 8


def programs_per_sm(maxnreg: int, num_warps: int) -> int:
    """CTAs of num_warps warps at maxnreg registers per thread that one
    Hopper SM holds by registers: each of its 4 sub-partitions has 16K,
    handed out 256 per warp at a time (112 registers: 4 warps each, so 8
    2-warp CTAs, as Nsight Compute reports)."""
    per_warp = -(-maxnreg * 32 // 256) * 256
    return 4 * (16384 // per_warp) // num_warps


def gemm1_slice_steps(steps: int, split: int, programs: int, slots: int) -> int:
    """K steps per gemm1 slice in moe_decode (0: equal slices). When the
    programs outnumber the slots the last ones start only as the first end:
    the last slice (theirs, in ticket order) then takes about 0.6 of a
    slice, so that they end with the others (gpt-oss-120b T=1: 9, 9, 4.5
    steps instead of 8, 8, 6.5)."""
    if split < 2 or programs <= slots:
        return 0
    s = -(-5 * steps // (5 * split - 2))
    return s if (split - 1) * s < steps else 0


# Regimes by rows per expert r = T*k/E (routing is unknown at trace time; this
# is the balanced expectation), from sweeps on an H100 (bench/sweep.py,
# bench/NOTES.md). Small r streams weights (memory bound): weight rows on the
# MMA's M side (SWAP=2: the cheap elementwise fp4 upcast), token blocks of
# 8-64 rows (8 is one mma.sync n8 tile: at r <= 2 a block rarely holds more,
# and the smaller x operand takes a tenth of the decode loop's instructions
# and ~40 registers off), 2-warp mma.sync tiles (a 4-warp wgmma tile waits on
# shared memory: ~2x slower at T=8) and split-K sized so that every SM holds
# about warps_per_sm warps of weight streams (a program's K step is bound by
# its own instruction latency, so more programs per SM stream more; too many
# K slices cost partial sums, too few leave SMs with fewer programs). Large r
# is compute bound: 128 token rows x 128 W rows per 4-warp CTA, triton's
# dot_scaled upcast. In the MX modes x is quantised once by a pre-pass rather
# than once per N tile in gemm1's loop (which costs as much as the weight
# upcast at BM=16, and spills with split-K). Every loop is software-pipelined
# 3 deep (cp.async). The 8-row regime aims for 18 warps per SM: moe_decode
# capped at 112 registers (no spills in its K loops), of which an H100 runs
# 8 programs per SM (bench/trace_decode.py), with split-K sized for 9; that
# sizing measured best (gpt-oss-120b and deepseek-v3 at T=1, bench/NOTES.md).
# Past 64 rows per expert the Gluon kernels run (PrefillConfig; sm90 weights):
# 128 x 256 tiles, a 3-deep operand ring, 5-deep fp4 staging. On one H200
# (bench/NOTES.md, Session 9; bench layer times, one machine) gpt-oss-120b
# a16w4 T=4096 / 16384 took 2420 / 7239 us against the dot_scaled regime's
# 3933 / 11190 us. At 32 rows per expert (T=1024) a 128-row block is mostly
# padding (1534 us for gpt-oss-120b, standalone), so the 64-row mma.sync
# regime keeps T <= 64 rows per expert.
_REGIMES = (
    # (max rows per expert, BM, gemm1, gemm2, warps per SM[, prefill])
    (2, 8, GemmConfig(32, 128, 2, 2, 3, fuse_x_quant=False), GemmConfig(64, 128, 2, 2, 3), 18),
    (16, 16, GemmConfig(32, 128, 2, 2, 3, fuse_x_quant=False), GemmConfig(64, 128, 2, 2, 3),
     12),
    (32, 32, GemmConfig(32, 128, 2, 2, 3, fuse_x_quant=False), GemmConfig(64, 128, 2, 2, 3),
     12),
    (64, 64, GemmConfig(32, 128, 2, 4, 3, fuse_x_quant=False), GemmConfig(64, 128, 2, 4, 3),
     12),
    (math.inf, 128, GemmConfig(64, 64, 0, 4, 3, fuse_x_quant=False),
     GemmConfig(128, 64, 0, 4, 3), 12, PrefillConfig()),
)


def _split_k(ctas: int, cfg: GemmConfig, K: int, warps_per_sm: int) -> int:
    """K slices per tile so that about warps_per_sm warps per SM run, each
    slice keeping >= 4 K steps; 1 when the grid is already big enough."""
    target = NUM_SMS * warps_per_sm // cfg.num_warps
    return max(1, min(8, target // max(ctas, 1), K // cfg.block_k // 4))


def choose_config(T: int, k: int, E: int, H: int, I: int, *, deterministic: bool,
                  direct: bool = False) -> MoEConfig:
    """The block configuration for a layer call; direct: the kernels route
    from topk_ids themselves (no sort), which 8-row blocks need (the sort
    contract's blocks are sorting.BLOCK_SIZES rows)."""
    from jax_mxfp4_moe.numerics import sorting

    rows_per_expert = T * k / max(E, 1)
    for max_rows, bm, g1, g2, warps, *prefill in _REGIMES:
        if rows_per_expert <= max_rows and (direct or bm in sorting.BLOCK_SIZES):
            break
    # Split-K adds partial sums atomically (in no fixed order): not when the
    # caller asks for a deterministic result.
    if not deterministic:
        blocks = min(E, T * k) + T * k // bm  # expected active row blocks
        g1 = dataclasses.replace(
            g1, split_k=_split_k(blocks * -(-I // g1.block_n), g1, H, warps))
        g2 = dataclasses.replace(
            g2, split_k=_split_k(blocks * -(-H // g2.block_n), g2, I, warps))
    return MoEConfig(bm, g1, g2, warps, prefill[0] if prefill and PREFILL_KERNELS else None)


# ---------------------------------------------------------------------------
# The grouped matmuls of the layer's derivative (layer/autodiff.py gmm_p)
# ---------------------------------------------------------------------------

# The Gluon wgmma kernels where gmm_config names them (False: the Triton
# kernels everywhere, for side-by-side measurements).
GMM_WGMMA_KERNELS = True


@dataclasses.dataclass(frozen=True)
class GmmConfig:
    """Tiles of one grouped matmul (cuda/kernels/moe_gmm.py, moe_gmm_wgmma.py)."""
    block_n: int      # output columns per tile
    block_k: int      # contraction per step (transposed: weight rows)
    num_warps: int
    num_stages: int   # the Triton kernel's software pipeline depth
    wgmma: PrefillConfig | None = None  # the Gluon kernel's pipeline (else the Triton one)


def gmm_config(block_m: int, *, transpose: bool, layout: str) -> GmmConfig:
    """The tiles of a grouped matmul over blocks of block_m rows. With sm90
    weights and blocks of 64 or 128 rows (the derivative's block height past
    ~64 rows per expert: autodiff.grad_block_m), the Gluon kernel with the
    prefill GEMMs' pipeline: 128 (or 64) x 256 tiles, a 3-deep operand ring,
    5-deep fp4 staging. Otherwise the Triton kernel: tokens on the MMA's M
    side, 4 warps, 3-stage cp.async pipeline; transposed, 128 output
    columns (one sm90 layout tile along K) by 64 weight rows per step."""
    from jax_mxfp4_moe.cuda.layout import NAME
    if GMM_WGMMA_KERNELS and layout == NAME and block_m in (64, 128):
        return GmmConfig(256, 64, block_m // 16, 1, PrefillConfig())
    if transpose:
        return GmmConfig(128, 64, 4, 3)
    return GmmConfig(128 if block_m >= 64 else 64, 64 if block_m >= 64 else 128, 4, 3)


def prefill_supported(cfg: PrefillConfig, *, I: int, gate_up: str, layout: str) -> bool:
    """Whether the Gluon kernels read these weights: the sm90 layout (TMA
    boxes of its 64-row tiles), and for separated gate/up rows an up half
    that starts on a tile (I a multiple of 64)."""
    from jax_mxfp4_moe.cuda.layout import NAME, TILE_N
    return layout == NAME and (gate_up == "interleaved" or I % TILE_N == 0) \
        and cfg.block_n % (2 * TILE_N) == 0

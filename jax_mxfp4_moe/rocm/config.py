"""The ROCm backend's configuration: which kernels exist, their builder
configs per pipeline stage, the variants compiled for the presets, and the
gfx950 GEMM tile table: one place that picks, per call, the row block
BM (the sort contract's block size), and for gemm1 and gemm2 the weight
tiles per wave, waves per block, B prefetch depth, K splits and load policy.

Why these tiles (MI355X: 256 CUs in 8 XCDs, 4 SIMDs per CU; figures from
the ISA of these kernels, ``python -m jax_mxfp4_moe.tools.report --arch gfx950``;
no MI355X was available to measure):

- Decode (a few rows per expert): the weights are read once, so the work
  is a stream of 16-row x 128-K tiles (1 KB each).  gemm1: one tile per
  wave, four waves per block (gpt-oss T=1: 368 blocks); gemm2: two tiles
  per wave (each step's A operands feed two MFMAs; MFMA share of its K
  loop 29% at gpt-oss T=1, 15% with one), four waves per block, and K
  split when the blocks would still not fill the CUs twice over (gpt-oss
  T=1: 3 splits, 276 blocks; its atomics add the partial sums; not for
  the deterministic variant; its blocks need not divide H: columns past
  Hp add nothing).  Each wave keeps 8 steps of weights in flight.
  Loads are non-temporal: no row block re-reads a tile.
- Mid (tens of rows per expert): BM = 32, four tiles per wave (8 MFMAs per
  step per B load set), prefetch 2 steps.
- Prefill (T >= 512, or more rows per expert): BM = 64 (a8w4, whose A
  takes twice the LDS) or 128 (a4w4, two tiles per wave to stay within 256
  registers), four (two) tiles per wave: each weight tile serves 64 / 128
  rows from L2.  Waves and prefetch per GEMM (BM = 64: gemm1 4 waves,
  prefetch 2; gemm2 8 waves, a 512-column block, prefetch 4.  BM = 128:
  gemm1 8 waves, prefetch 4; gemm2 4 waves, prefetch 8) were chosen with
  the performance model (``tools.report --model``) among the tiles that
  meet the report's budgets (no scratch, LDS within half a CU, >= 2 waves
  per SIMD) and, for gemm1, blocks of 128 columns (a block must divide
  every padded I, a multiple of 128): at T = 4096 the layer models 9-18%
  faster than with the earlier four-wave, prefetch-2 tiles
  (bench/NOTES.md, issue 16).

The sort contract's block size is BM (``spec.BLOCK_SIZES``).
"""

from __future__ import annotations

import dataclasses

from jax_mxfp4_moe import spec
from jax_mxfp4_moe.numerics import sorting
from jax_mxfp4_moe.rocm import geometry as ix

ARCHS = ("gfx950",)
# Quant modes with gfx950 kernels: the scaled MFMA takes fp4 / fp8 operands
# (a16w4 would need a bf16 x fp4 MFMA, which gfx950 lacks).
QUANTS = ("a4w4", "a8w4")
# Presets whose kernels are compiled and checked in CI (spec.PRESETS).
PRESETS = ("gpt-oss-120b", "deepseek-v3")
NUM_CUS = 256  # MI355X


@dataclasses.dataclass(frozen=True)
class GemmTile:
    """One GEMM's tiling: ``tiles`` 16-row weight tiles per wave, ``waves`` per block."""

    tiles: int
    waves: int
    prefetch: int
    nt: bool  # non-temporal weight loads
    k_splits: int = 1

    def params(self) -> dict:
        """The kernel builders' keyword arguments."""
        return dict(tiles=self.tiles, waves=self.waves, prefetch=self.prefetch, nt=self.nt)


@dataclasses.dataclass(frozen=True)
class Tiles:
    bm: int
    gemm1: GemmTile
    gemm2: GemmTile
    name: str


# (name, bm, gemm1, gemm2) in order of size; ``choose`` takes the first that fits.
DECODE = Tiles(16, GemmTile(1, 4, 8, True), GemmTile(2, 4, 8, True), "decode")
MID = Tiles(32, GemmTile(4, 4, 2, False), GemmTile(4, 4, 2, False), "mid")
PREFILL = Tiles(64, GemmTile(4, 4, 2, False), GemmTile(4, 8, 4, False), "prefill")
PREFILL_A4W4 = Tiles(128, GemmTile(2, 8, 4, False), GemmTile(2, 4, 8, False), "prefill128")

# Rows per expert (T * k / E) up to which a regime is used; prefill from PREFILL_TOKENS tokens.
DECODE_MAX_ROWS = 4
MID_MAX_ROWS = 32
PREFILL_TOKENS = 512
BM128_MIN_ROWS = 128


def min_waves_per_simd(bm: int) -> int:
    """The occupancy a GEMM of ``bm`` rows must keep (the report's budget):
    decode tiles hide HBM latency with waves as well as prefetch (4); the mid
    tile keeps 3 (a8w4's fp8 A operands take 8 registers each); prefill
    tiles hold 64-128 rows of accumulators and need 2."""
    return 4 if bm <= 16 else 3 if bm <= 32 else 2


def regimes(quant: str) -> tuple:
    """Every Tiles a call in mode ``quant`` can get."""
    return (DECODE, MID, PREFILL) + ((PREFILL_A4W4,) if quant == "a4w4" else ())


def choose(*, tokens: int, top_k: int, num_experts: int, hidden: int, intermediate: int, quant: str,
           deterministic: bool = False) -> Tiles:
    """The tiles for a call with ``tokens`` rows (static under jit)."""
    rows = tokens * top_k / max(num_experts, 1)
    if tokens >= PREFILL_TOKENS or rows > MID_MAX_ROWS:
        t = PREFILL_A4W4 if quant == "a4w4" and rows >= BM128_MIN_ROWS else PREFILL
    elif rows <= DECODE_MAX_ROWS:
        t = DECODE
    else:
        t = MID
    return dataclasses.replace(t, gemm2=dataclasses.replace(t.gemm2, k_splits=gemm2_splits(
        t, tokens=tokens, top_k=top_k, num_experts=num_experts, hidden=hidden, intermediate=intermediate,
        deterministic=deterministic)))


def gemm2_splits(t: Tiles, *, tokens, top_k, num_experts, hidden, intermediate, deterministic) -> int:
    """K splits of gemm2: enough that the expected live blocks cover the CUs
    twice, at most K / 7 of them (each split keeps about 7 steps or more:
    gpt-oss-120b's 23 steps split 8 + 8 + 7); 1 when deterministic."""
    if deterministic or t.name != DECODE.name:
        return 1
    Hp, Ip = ix.padded_dims(hidden, intermediate)
    n = tokens * top_k
    live_rows = min(num_experts, n) + n // t.bm  # expected live row blocks
    blocks = live_rows * -(-Hp // ix.block_rows(t.gemm2.tiles, t.gemm2.waves))
    kblocks = Ip // ix.MFMA_K
    want = -(-2 * NUM_CUS // max(blocks, 1))
    return max(1, min(want, kblocks // 7, 4))


def tiles_for(layer: spec.LayerSpec, tokens: int, *, deterministic: bool = False) -> Tiles:
    """``choose`` for a layer spec."""
    return choose(tokens=tokens, top_k=layer.top_k, num_experts=layer.num_experts, hidden=layer.hidden,
                  intermediate=layer.intermediate, quant=layer.quant, deterministic=deterministic)


# ------------------------------------------------------------ builder configs
def sort_config(*, num_experts, top_k, has_mask, block_m, stage="oneshot"):
    if stage not in sorting.SORT_STAGES:
        raise ValueError(f"stage: expected one of {sorting.SORT_STAGES}, got {stage!r}")
    if block_m not in spec.BLOCK_SIZES:
        raise ValueError(f"block_m: expected one of {spec.BLOCK_SIZES}, got {block_m!r}")
    return dict(num_experts=int(num_experts), top_k=int(top_k), block_m=int(block_m),
                has_mask=bool(has_mask), stage=stage)


def quant_config(*, cols, fmt, in_dtype):
    return dict(cols=int(cols), fmt=fmt, in_dtype=in_dtype)


def gemm1_config(layer: spec.LayerSpec, tiles: Tiles):
    """Builder config of gemm1 with ``tiles.bm`` rows and ``tiles.gemm1``."""
    return dict(hidden=layer.hidden, intermediate=layer.intermediate,
                num_experts=layer.num_experts, quant=layer.quant, activation=layer.activation,
                gate_up=layer.gate_up, has_bias=layer.has_b1, bm=tiles.bm, **tiles.gemm1.params())


def gemm2_tile(tiles: Tiles, *, deterministic=False) -> GemmTile:
    """gemm2's tile; the deterministic mode (a runtime argument of the same
    code object) has no K split: each (token, slot) row is written once."""
    return dataclasses.replace(tiles.gemm2, k_splits=1) if deterministic else tiles.gemm2


def gemm2_config(layer: spec.LayerSpec, tiles: Tiles, *, deterministic=False):
    """Builder config of gemm2 (one code object serves the atomic and, with
    one K split, the deterministic mode)."""
    tile = gemm2_tile(tiles, deterministic=deterministic)
    cfg = dict(hidden=layer.hidden, intermediate=layer.intermediate,
               num_experts=layer.num_experts, quant=layer.quant, has_bias=layer.has_b2,
               bm=tiles.bm, **tile.params())
    if tile.k_splits > 1:
        cfg["k_splits"] = int(tile.k_splits)
    return cfg


def variants(layer: spec.LayerSpec, *, tiles: Tiles, in_dtype="bf16", has_mask=False):
    """{stage: (kernel module, builder config)} of one pipeline configuration."""
    Hp, _ = ix.padded_dims(layer.hidden, layer.intermediate)
    return {
        **{f"sort_{st}": ("sort", sort_config(num_experts=layer.num_experts, top_k=layer.top_k,
                                              has_mask=has_mask, block_m=tiles.bm, stage=st))
           for st in sorting.SORT_STAGES},
        "quant": ("quant", quant_config(cols=Hp, fmt=layer.mode.act_format, in_dtype=in_dtype)),
        "gemm1": ("gemm1", gemm1_config(layer, tiles)),
        "gemm2": ("gemm2", gemm2_config(layer, tiles)),
        "gemm2_det": ("gemm2", gemm2_config(layer, tiles, deterministic=True)),
    }


# Token counts whose tiles the presets ship (each regime of the table, and the
# decode K splits of T = 1).
SHIPPED_TOKENS = (1, 64, 256, 4096)


def shipped_variants():
    """Every (module, config) compiled for the presets: both quants, every
    regime of the tile table, bf16 and f32 activations, atomic and
    deterministic gemm2."""
    out = {}
    for name in PRESETS:
        for quant in QUANTS:
            layer = spec.PRESETS[name].replace(quant=quant)
            for tokens in SHIPPED_TOKENS:
                tiles = tiles_for(layer, tokens)
                for in_dtype in ("bf16", "f32"):
                    for mod, cfg in variants(layer, tiles=tiles, in_dtype=in_dtype).values():
                        out[(mod, tuple(sorted(cfg.items(), key=lambda kv: kv[0])))] = (mod, cfg)
    return list(out.values())

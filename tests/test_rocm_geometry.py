"""Host-side checks of the gfx950 kernels' geometry (no flydsl, no GPU): the
packed scale layouts, the LDS ring (DMA placement, swizzle, bank spread),
the K schedule, launch grids and their XCD placement, the tile table, and
that the quantiser's hardware-conversion sequence is the project's rule on
every input class (``functional_model.quantize_model`` against
``numerics.formats``, exhaustively where feasible)."""

import ml_dtypes
import numpy as np
import pytest

from jax_mxfp4_moe import spec
from jax_mxfp4_moe.numerics import formats, sorting
from jax_mxfp4_moe.rocm import config as rocm_config, functional_model as fm
from jax_mxfp4_moe.rocm import geometry as ix, layout as rocm_layout

FMTS = ("mxfp4", "mxfp8")


# ------------------------------------------------------------ packed scales
@pytest.mark.parametrize("k", [128, 512, 640, 2944, 7168])
def test_activation_scale_layout_is_a_bijection_lanes_can_load(k):
    blocks = k // 32
    offs = [ix.act_scale_offset(0, b, k) for b in range(blocks)]
    assert len(set(offs)) == blocks and max(offs) < ix.act_scale_row_bytes(k)
    for b in range(blocks):
        kb, g = divmod(b, 4)
        # the lane (row, K block g) of step kb finds it in its chunk's dword, byte kb % 4
        dword = ix.act_scale_offset(0, (kb // 4) * 16 + g, k)
        assert dword % 4 == 0 and offs[b] == dword + kb % 4
    s = np.random.default_rng(k).integers(0, 256, (3, blocks), dtype=np.uint8)
    packed = rocm_layout.pack_act_scales(s, k)
    np.testing.assert_array_equal(rocm_layout.unpack_act_scales(packed, k), s)
    assert packed.sum() == s.astype(np.int64).sum()  # unused bytes are zero


def test_weight_scale_dwords_hold_four_steps_of_one_lane():
    kblocks = 23
    for nb in (0, 3):
        for lane in (0, 17, 63):
            base = ix.tile_scale_offset(nb, 0, lane, kblocks)
            for kb in range(kblocks):
                off = ix.tile_scale_offset(nb, kb, lane, kblocks)
                assert off // 4 == (base + (kb // 4) * ix.SCALE_TILE_BYTES) // 4 and off % 4 == kb % 4


# ----------------------------------------------------------------- LDS ring
@pytest.mark.parametrize("fmt", FMTS)
def test_lds_swizzle_is_an_involution_per_row(fmt):
    chunks = ix.stage_row_bytes(fmt) // 16
    for row in range(128):
        perm = [ix.lds_chunk(row, c, fmt) for c in range(chunks)]
        assert sorted(perm) == list(range(chunks))
        assert [ix.lds_chunk(row, p, fmt) for p in perm] == list(range(chunks))


@pytest.mark.parametrize("bm", [16, 32, 64, 128])
@pytest.mark.parametrize("fmt", FMTS)
def test_dma_then_ds_read_returns_every_lanes_operand_bytes(bm, fmt):
    """A stage of distinct bytes written by the DMA lanes is read back by the
    MFMA lanes as exactly the bytes of (row, K) their operand needs."""
    srow = ix.stage_row_bytes(fmt)
    src = np.arange(bm * srow, dtype=np.int64).reshape(bm, srow)  # byte id = row * srow + byte
    slot = np.full(max(ix.dma_ops(bm, fmt), 1) * 1024, -1, np.int64)
    lanes = np.arange(64)
    for op in range(ix.dma_ops(bm, fmt)):
        row, chunk = ix.dma_lane(op, lanes, fmt)
        assert (row < bm).all()
        slot[op * 1024 + lanes[:, None] * 16 + np.arange(16)] = src[row[:, None], chunk[:, None] * 16 + np.arange(16)]
    assert (slot[: bm * srow] >= 0).all()  # the ops fill the slot
    step_bytes = ix.row_bytes(128, fmt)
    for h in range(ix.STAGE_STEPS):
        for m in range(bm // 16):
            rows = m * 16 + ix.operand_row(lanes)
            got = np.concatenate([slot[(rows * srow + ix.lds_chunk(rows, c, fmt) * 16)[:, None] + np.arange(16)]
                                  for c in ix.a_read_chunks(lanes, h, fmt)], axis=1)
            pieces = len(ix.operand_chunks(0, fmt))
            off = np.array([[ix.operand_chunks(lane, fmt)[p][0] for p in range(pieces)] for lane in lanes])
            want = np.concatenate([src[rows[:, None], h * step_bytes + off[:, p, None] + np.arange(16)]
                                   for p in range(pieces)], axis=1)
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", FMTS)
def test_ds_reads_of_one_k_block_spread_over_all_banks(fmt):
    """The 16 lanes that read one K block of 16 rows (one ds_read_b128 group)
    hit 16 distinct 16-byte bank groups of a 256-byte bank line (64 banks x
    4 bytes, gfx950): no bank conflict.  Without the swizzle they would all
    share two."""
    srow = ix.stage_row_bytes(fmt)
    for h in range(ix.STAGE_STEPS):
        for g in range(4):
            lanes = g * 16 + np.arange(16)
            for p, c in enumerate(ix.a_read_chunks(lanes, h, fmt)):
                rows = ix.operand_row(lanes)
                addr = rows * srow + ix.lds_chunk(rows, c, fmt) * 16
                assert len(set(((addr // 16) % 16).tolist())) == 16
                plain = rows * srow + c * 16
                assert len(set(((plain // 16) % 16).tolist())) <= 2


# ----------------------------------------------------------------- K loop
@pytest.mark.parametrize("kblocks", [1, 2, 7, 16, 23, 56])
@pytest.mark.parametrize("splits", [1, 2, 3, 4])
def test_k_splits_tile_the_k_range_on_scale_chunks(kblocks, splits):
    used = ix.k_splits_used(kblocks, splits)
    assert 1 <= used <= splits
    covered = []
    for s in range(used):
        first, steps = ix.k_split_range(s, kblocks, splits)
        assert first % ix.SCALE_STEPS == 0 and steps >= 1
        covered += list(range(first, first + steps))
    assert covered == list(range(kblocks))


@pytest.mark.parametrize("prefetch", ix.PREFETCH_DEPTHS)
def test_steady_loop_issues_only_loads_that_exist(prefetch):
    body = ix.loop_body_steps(prefetch)
    assert body % prefetch == 0 and body % (ix.SCALE_STEPS * ix.scale_sets(prefetch)) == 0
    assert body % (ix.STAGE_STEPS * ix.RING_SLOTS) == 0
    # a chunk's scale set is free when its dwords are loaded
    lead, sets = ix.scale_lead(prefetch), ix.scale_sets(prefetch)
    for q in range(sets, 40):
        assert 4 * (q - sets) + 3 < 4 * q - lead
    for steps in range(1, 80):
        iters = ix.steady_iterations(steps, prefetch)
        last = iters * body - 1
        if iters:
            assert last + prefetch < steps and last + lead < steps + ix.SCALE_STEPS


# ----------------------------------------------------------------- grids
def _routing(T, k, E, rng, kind):
    if kind == "spread":  # distinct experts per token, as routers produce
        return np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32)
    if kind == "skewed":
        return np.minimum(rng.geometric(0.3, (T, k)) - 1, E - 1).astype(np.int32)
    return rng.integers(0, E, (T, k)).astype(np.int32)


@pytest.mark.parametrize("bm", sorting.BLOCK_SIZES)
@pytest.mark.parametrize("T,k,E", [(1, 4, 128), (8, 8, 256), (64, 4, 128), (300, 8, 16), (40, 2, 4)])
def test_launched_row_blocks_bound_every_routing(T, k, E, bm):
    rng = np.random.default_rng(T + bm)
    bound = ix.max_row_blocks(T * k, E, bm)
    assert bound <= sorting.num_blocks(T, k, E, bm)
    for kind in ("spread", "skewed", "uniform"):
        ids = _routing(T, k, E, rng, kind)
        _, _, _, nv = fm.sort_model(ids, np.ones((T, k), np.float32), num_experts=E, block_m=bm)
        assert nv[0] // bm <= bound
    # and the bound is reached: min(E, n) experts with one entry each, the rest on one expert
    n = T * k
    u = min(E, n)
    counts = np.ones(u, np.int64)
    counts[0] += n - u
    assert sum(-(-c // bm) for c in counts) == bound


@pytest.mark.parametrize("preset", rocm_config.PRESETS)
@pytest.mark.parametrize("T", [1, 8, 64])
def test_live_blocks_spread_over_all_xcds(preset, T):
    """Workgroup ids go round-robin to the 8 XCDs; the live blocks (the first
    row blocks) of every gemm land on each XCD equally (within one block)."""
    p = spec.PRESETS[preset]
    E, k, H, I = p.num_experts, p.top_k, p.hidden, p.intermediate
    Hp, Ip = ix.padded_dims(H, I)
    for quant in rocm_config.QUANTS:
        t = rocm_config.choose(tokens=T, top_k=k, num_experts=E, hidden=H, intermediate=I, quant=quant)
        ids = _routing(T, k, E, np.random.default_rng(T), "spread")
        _, _, _, nv = fm.sort_model(ids, np.ones((T, k), np.float32), num_experts=E, block_m=t.bm)
        live = nv[0] // t.bm
        for n_rows, tile, cols in ((2 * Ip, t.gemm1, 2 * Ip), (Hp, t.gemm2, Hp)):
            grid = ix.gemm_grid(n_rows, ix.max_row_blocks(T * k, E, t.bm), tile.tiles, tile.waves, tile.k_splits)
            assert grid[0] % ix.XCDS == 0
            per_xcd = np.zeros(ix.XCDS, np.int64)
            for s in range(grid[2]):
                for m in range(live):
                    for n in range(grid[0]):
                        if n * ix.block_rows(tile.tiles, tile.waves) < cols:
                            per_xcd[ix.workgroup_xcd(n, m, s, grid)] += 1
            assert per_xcd.max() - per_xcd.min() <= live * grid[2]  # at most the padding tiles of each row
            assert per_xcd.min() > 0


# ------------------------------------------------------------- tile table
@pytest.mark.parametrize("preset", rocm_config.PRESETS)
@pytest.mark.parametrize("T", [1, 8, 64, 512, 4096])
@pytest.mark.parametrize("quant", rocm_config.QUANTS)
def test_tile_table_choices(preset, T, quant):
    p = spec.PRESETS[preset]
    dims = dict(top_k=p.top_k, num_experts=p.num_experts, hidden=p.hidden, intermediate=p.intermediate)
    t = rocm_config.choose(tokens=T, quant=quant, **dims)
    assert t.bm in sorting.BLOCK_SIZES
    if T >= 512:
        assert t.bm >= 64  # prefill
    if quant == "a8w4":
        assert t.bm <= 64  # its A ring (4 slots x bm x 256 B) stays within 64 KB
    cols1 = ix.gemm1_cols(t.gemm1.tiles, t.gemm1.waves)
    assert cols1 % 32 == 0 and t.gemm1.k_splits == 1
    assert ix.N_GRANULE % cols1 == 0  # a gemm1 block divides every padded I (the kernel refuses others)
    assert rocm_config.choose(tokens=T, quant=quant, deterministic=True, **dims).gemm2.k_splits == 1
    if T == 1:  # decode: every CU gets work from each GEMM
        Hp, Ip = ix.padded_dims(p.hidden, p.intermediate)
        live = min(p.num_experts, T * p.top_k)
        g1 = live * -(-Ip // cols1)
        g2 = live * -(-Hp // ix.block_rows(t.gemm2.tiles, t.gemm2.waves)) * t.gemm2.k_splits
        assert g1 >= rocm_config.NUM_CUS and g2 >= rocm_config.NUM_CUS, (g1, g2)


# --------------------------------------------- quantiser: hardware sequence
def _f32_patterns(max_bits):
    """Every f32 in [-max, max] whose low 11 mantissa bits are 0, 1, 0x3FF, 0x400,
    0x401 or 0x7FF: all exponents, the top 12 mantissa bits exhaustively, and
    every round/sticky class of both conversions."""
    hi = np.arange(0, (max_bits >> 11) + 1, dtype=np.int64) << 11
    bits = (hi[:, None] | np.array([0, 1, 0x3FF, 0x400, 0x401, 0x7FF])).ravel()
    bits = bits[bits <= max_bits]
    bits = np.concatenate([bits, bits | (1 << 31)])
    return bits.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("fmt,max_bits", [("mxfp4", 0x40C00000), ("mxfp8", 0x43E00000)])
def test_modelled_conversion_is_round_to_nearest_even(fmt, max_bits):
    """The bit-level model of the conversion instructions (written from the
    ISA's statement) against ml_dtypes over every rounding class in range."""
    q = _f32_patterns(max_bits)
    got = (fm.hw_cvt_e2m1 if fmt == "mxfp4" else fm.hw_cvt_e4m3)(q)
    want = formats.e2m1_encode_np(q) if fmt == "mxfp4" else formats.e4m3_encode_np(q)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", FMTS)
def test_scaled_blocks_never_need_saturation(fmt):
    """For every finite block maximum (all bf16 values; every f32 exponent
    with the mantissa classes the rule reads), amax * 2**(127 - byte) stays
    at or below the element maximum: the conversion never saturates."""
    emax = {"mxfp4": 2, "mxfp8": 8}[fmt]
    elem_max = 6.0 if fmt == "mxfp4" else 448.0
    bf16 = (np.arange(0x7F80, dtype=np.uint32) << 16).view(np.float32)
    exps = np.arange(0, 255, dtype=np.uint32) << 23
    mant = np.array([0, 1, 0x1FFFFF, 0x200000, 0x3FFFFF, 0x400000, 0x400001, 0x5FFFFF, 0x600000, 0x7FFFFF], np.uint32)
    f32 = (exps[:, None] | mant[None, :]).ravel().view(np.float32)
    amax = np.concatenate([bf16, f32]).astype(np.float32)
    byte = fm._scale_byte(amax.view(np.uint32) & 0x7FFFFFFF, fmt)
    finite = byte < 255
    assert np.array_equal(byte, formats.e8m0_scale_np(amax, fmt).astype(np.int64))
    scaled = np.ldexp(amax[finite].astype(np.float64), (127 - byte[finite]).astype(np.int64))
    assert scaled.max() <= elem_max and scaled.max() > elem_max / 2
    del emax


@pytest.mark.parametrize("fmt", FMTS)
def test_quantiser_sequence_equals_the_rule_for_every_bf16_element_and_scale(fmt):
    """Every bf16 element under every finite scale byte whose blocks can hold
    it: ldexp + the conversion (the kernels' sequence) == the rule's element
    conversion (formats)."""
    x = (np.arange(0, 1 << 16, dtype=np.uint32) << 16).view(np.float32)
    x = x[np.isfinite(x)]
    elem_max = 6.0 if fmt == "mxfp4" else 448.0
    conv = fm.hw_cvt_e2m1 if fmt == "mxfp4" else fm.hw_cvt_e4m3
    enc = formats.e2m1_encode_np if fmt == "mxfp4" else formats.e4m3_encode_np
    for byte in range(255):
        q = np.ldexp(x.astype(np.float64), 127 - byte)
        ok = np.abs(q) <= elem_max  # a block with this byte has |x| * 2**(127 - byte) <= max
        q32 = np.ldexp(x[ok], np.int32(127 - byte)).astype(np.float32)
        np.testing.assert_array_equal(conv(q32), enc(q[ok].astype(np.float32)), err_msg=f"byte {byte}")


@pytest.mark.parametrize("fmt", FMTS)
def test_quantiser_model_equals_formats_on_mixed_blocks(fmt):
    """Whole blocks (the integer maximum, the scale byte, both paths):
    normal, subnormal, zero, huge, and NaN / Inf blocks (the integer path)."""
    rng = np.random.default_rng(7)
    n = 4000
    x = rng.standard_normal((n, 32)).astype(np.float32) * np.exp2(rng.integers(-140, 127, (n, 1))).astype(np.float32)
    x[::7, :5] = 0.0
    x[1::11] = 0.0
    x[2::13, 3] = np.nan
    x[3::17, 9] = np.inf
    x[4::19, 1] = -np.inf
    x[5::23] *= np.float32(2.0 ** -20)
    x[6::29, 0] = -0.0
    codes, scales = fm.quantize_model(x, fmt)
    if fmt == "mxfp4":
        want_q, want_s = formats.quantize_mxfp4_np(x)
        codes = formats.pack_fp4(codes)
    else:
        want_q, want_s = formats.quantize_mxfp8_np(x)
    np.testing.assert_array_equal(scales, want_s)
    np.testing.assert_array_equal(codes, want_q)
    assert (scales == 255).any() and (scales == 0).any()


def test_quantiser_model_rejects_what_the_isa_does_not_state():
    with pytest.raises(ValueError):
        fm.hw_cvt_e2m1(np.array([6.5], np.float32))
    with pytest.raises(ValueError):
        fm.hw_cvt_e4m3(np.array([np.nan], np.float32))
    assert ml_dtypes is not None

"""Host-side checks of the gfx950 backend (no flydsl, no GPU): the weight
pre-shuffle, the code-object metadata reader, the sort kernel's algorithm
against the jnp sorter (every block size), and the functional model of the
kernels against the NumPy reference for every mode and tile variant, with
negative controls.  Geometry, the quantiser's hardware sequence and the
tile table: ``test_rocm_geometry.py``."""

import dataclasses
import functools
import struct

import jax.numpy as jnp
import numpy as np
import pytest

import accuracy
import moe_cases
from jax_mxfp4_moe.layer import layouts
from jax_mxfp4_moe.numerics import reference, sorting
from jax_mxfp4_moe.rocm import config as rocm_config, elf as rocm_elf, functional_model as rocm_tile
from jax_mxfp4_moe.rocm import geometry as ix, layout as rocm_layout


# ------------------------------------------------------------ pre-shuffle
@pytest.mark.parametrize("N,K", [(16, 128), (48, 256), (32, 384)])
def test_tile_source_is_a_bijection(N, K):
    seen = set()
    for nb in range(N // 16):
        for kb in range(K // 128):
            for lane in range(64):
                row, byte, scol = ix.tile_source(nb, kb, lane)
                for j in range(16):
                    seen.add((row, byte + j))
                assert scol == (byte * 2) // 32  # the scale of the lane's 32 elements
    assert seen == {(r, b) for r in range(N) for b in range(K // 2)}


def test_shuffle_places_each_lane_slot_from_tile_source():
    rng = np.random.default_rng(0)
    E, N, K = 2, 32, 256
    w = rng.integers(0, 256, (E, N, K // 2), dtype=np.uint8)
    s = rng.integers(0, 256, (E, N, K // 32), dtype=np.uint8)
    wt, st = (np.asarray(a) for a in rocm_layout.shuffle(jnp.asarray(w), jnp.asarray(s)))
    flat_w = wt.reshape(E, -1)
    flat_s = st.reshape(E, -1)
    kblocks = K // 128
    for nb in range(N // 16):
        for kb in range(kblocks):
            for lane in range(64):
                row, byte, scol = ix.tile_source(nb, kb, lane)
                off = ix.tile_offset(nb, kb, lane, kblocks)
                np.testing.assert_array_equal(flat_w[:, off:off + 16], w[:, row, byte:byte + 16])
                assert (flat_s[:, ix.tile_scale_offset(nb, kb, lane, kblocks)] == s[:, row, scol]).all()


@pytest.mark.parametrize("H,I,bias", [(256, 256, True), (160, 96, False), (2880 // 9, 2880 // 9, True)])
def test_layout_pack_unpack_round_trip(H, I, bias):
    rng = np.random.default_rng(1)
    E = 3
    canon = {
        "w1": rng.integers(0, 256, (E, 2 * I, H // 2), dtype=np.uint8),
        "w1_scale": rng.integers(0, 256, (E, 2 * I, H // 32), dtype=np.uint8),
        "w2": rng.integers(0, 256, (E, H, I // 2), dtype=np.uint8),
        "w2_scale": rng.integers(0, 256, (E, H, I // 32), dtype=np.uint8),
    }
    if bias:
        canon["b1"] = rng.standard_normal((E, 2 * I)).astype(np.float32)
        canon["b2"] = rng.standard_normal((E, H)).astype(np.float32)
    lay = layouts.get("gfx950")
    dims = dict(num_experts=E, hidden=H, intermediate=I)
    packed = lay.pack({k: jnp.asarray(v) for k, v in canon.items()}, **dims)
    Hp, Ip = ix.padded_dims(H, I)
    assert packed["w1"].shape == (E, 2 * Ip // 16, Hp // 128, 64, 16)
    q = ix.scale_chunks(Ip // 128)
    assert packed["w2_scale"].shape == (E, Hp // 16, q, 64, ix.SCALE_STEPS)
    back = lay.unpack(packed, **dims)
    assert set(back) == set(canon)
    for k in canon:
        np.testing.assert_array_equal(np.asarray(back[k]), canon[k], err_msg=k)
    # padding is zeros (so padded K contributes nothing and padded rows are zero)
    w1_full, _ = rocm_layout.unshuffle(packed["w1"], packed["w1_scale"])
    assert not np.asarray(w1_full)[:, 2 * I:].any() and not np.asarray(w1_full)[:, :, H // 2:].any()
    # packed scale bytes of steps past K (the last chunk's tail) are zero
    kb = Ip // 128
    tail = np.asarray(packed["w2_scale"])
    assert not tail[:, :, -1, :, kb - (q - 1) * ix.SCALE_STEPS:].any()


def test_moeweights_to_gfx950_and_back():
    w = moe_cases.make_weights(moe_cases.Shape("s", E=2, k=1, H=96, I=64), gate_up="interleaved")
    g = w.to_layout("gfx950")
    assert g.layout == "gfx950"
    c = g.canonical()
    for k, v in w.arrays().items():
        np.testing.assert_array_equal(np.asarray(getattr(c, k)), np.asarray(v), err_msg=k)


# ------------------------------------------------------ metadata reader
def _mp_str(s):
    b = s.encode()
    return bytes([0xA0 | len(b)]) + b if len(b) < 32 else b"\xd9" + bytes([len(b)]) + b


def test_msgpack_reader_decodes_the_amdgpu_types():
    blob = (b"\x84" + _mp_str("amdhsa.kernels") + b"\x91\x83" + _mp_str(".name") + _mp_str("k")
            + _mp_str(".args") + b"\x92\x82" + _mp_str(".offset") + b"\x00" + _mp_str(".size") + b"\x08"
            + b"\x82" + _mp_str(".offset") + b"\x08" + _mp_str(".size") + b"\x04"
            + _mp_str(".vgpr_count") + b"\xcd\x01\x00"
            + _mp_str("neg") + b"\xff" + _mp_str("flag") + b"\xc3"
            + _mp_str("version") + b"\x92\x01\x02")
    out = rocm_elf.msgpack_loads(blob)
    assert out == {"amdhsa.kernels": [{".name": "k", ".args": [{".offset": 0, ".size": 8},
                                                               {".offset": 8, ".size": 4}],
                                       ".vgpr_count": 256}],
                   "neg": -1, "flag": True, "version": [1, 2]}
    with pytest.raises(ValueError):
        rocm_elf.msgpack_loads(blob[:-1])


def test_elf_reader_rejects_non_amdgpu_objects():
    with pytest.raises(ValueError, match="ELF"):
        rocm_elf.kernel_metadata(b"not an elf")
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<H", header, 18, 62)  # EM_X86_64
    with pytest.raises(ValueError, match="EM_AMDGPU"):
        rocm_elf.kernel_metadata(bytes(header))


def test_hidden_kernel_arguments_are_refused():
    md = {".name": "k", ".kernarg_segment_size": 16,
          ".args": [{".offset": 0, ".size": 8, ".value_kind": "global_buffer"},
                    {".offset": 8, ".size": 8, ".value_kind": "hidden_block_count_x"}]}
    with pytest.raises(ValueError, match="hidden"):
        rocm_elf.kernarg_offsets(md)


# ------------------------------------------------------------------ sort
SORT_CASES = [
    # T, k, E, mask
    (1, 4, 128, None),
    (7, 8, 256, None),
    (64, 4, 16, None),
    (300, 2, 8, None),
    (1500, 4, 32, "half"),  # several chunks of the large-T sort
    (50, 3, 12, "half"),
    (0, 2, 4, None),
]


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("T,k,E,mask,bm", [c + (32,) for c in SORT_CASES] + [
    (c + (bm,)) for bm in (16, 64, 128) for c in (SORT_CASES[1], SORT_CASES[4])])
def test_sort_kernel_model_equals_jnp_sorter(T, k, E, mask, chunked, bm):
    rng = np.random.default_rng(T * 31 + E)
    ids = rng.integers(-2, E + 3, (T, k)).astype(np.int32)  # includes out-of-range ids
    wts = rng.random((T, k)).astype(np.float32)
    expert_mask = None if mask is None else (np.arange(E) % 2 == 0).astype(np.int32)
    got = rocm_tile.sort_model(ids, wts, num_experts=E, block_m=bm, expert_mask=expert_mask, chunked=chunked)
    want = sorting.moe_sort(jnp.asarray(ids), jnp.asarray(wts), num_experts=E, block_m=bm,
                            expert_mask=None if expert_mask is None else jnp.asarray(expert_mask))
    names = ("sorted_token_ids", "sorted_weights", "sorted_expert_ids", "num_valid")
    for name, g, w in zip(names, got, want):
        np.testing.assert_array_equal(g, np.asarray(w), err_msg=name)


@pytest.mark.parametrize("BM", sorting.BLOCK_SIZES)
def test_sort_model_contract_invariants(BM):
    T, k, E = 40, 4, 8
    rng = np.random.default_rng(5)
    ids = rng.integers(0, E, (T, k)).astype(np.int32)
    ids[3, 1] = E  # dropped
    sid, sw, se, nv = rocm_tile.sort_model(ids, np.ones((T, k), np.float32), num_experts=E, block_m=BM)
    assert len(sid) == sorting.sorted_size(T, k, E, BM) and nv[1] == T and nv[0] % BM == 0
    valid = sid[: nv[0]] != ((k << 24) | T)
    entries = sid[: nv[0]][valid]
    assert len(entries) == T * k - 1 and len(set(entries.tolist())) == len(entries)
    tok, slot = entries & 0xFFFFFF, entries >> 24
    assert (ids[tok, slot] == np.repeat(se[: nv[0] // BM], BM)[valid]).all()
    assert (se[nv[0] // BM:] == -1).all() and (sw[: nv[0]][~valid] == 0).all()


# ------------------------------------------------- functional tile model
MODEL_CASES = [
    # shape, gate_up, activation, quant, bias
    (moe_cases.Shape("pad", E=4, k=2, H=160, I=96), "interleaved", "swiglu_oai", "a4w4", True),
    (moe_cases.Shape("pad", E=4, k=2, H=160, I=96), "separated", "silu", "a8w4", False),
    (moe_cases.Shape("even", E=4, k=3, H=256, I=128), "separated", "swiglu_oai", "a8w4", True),
    (moe_cases.Shape("even", E=4, k=3, H=256, I=128), "interleaved", "silu", "a4w4", False),
]


def _tile_variants():
    """Every tiling the table ships (by regime and mode), plus gemm2 K splits."""
    out = []
    for quant in ("a4w4", "a8w4"):
        for t in rocm_config.regimes(quant):
            out.append((quant, t))
        for ks in (2, 3):
            out.append((quant, dataclasses.replace(rocm_config.DECODE, gemm2=dataclasses.replace(
                rocm_config.DECODE.gemm2, k_splits=ks), name=f"decode-ks{ks}")))
    return out


@functools.lru_cache(maxsize=None)
def _model_case(quant, case):
    """(inputs, gfx950 weights, reference output) of MODEL_CASES' ``case``-th case of ``quant``."""
    shape, gate_up, activation, _, bias = [c for c in MODEL_CASES if c[3] == quant][case]
    w = moe_cases.make_weights(shape, gate_up=gate_up, bias=bias)
    x, tw, ti = moe_cases.make_tokens(shape, 9)
    ti = np.asarray(ti).copy()
    ti[0, 0] = shape.E + 1  # an id that is "not here"
    ref = reference.moe(np.asarray(x), w, tw, ti, quant=quant, activation=activation)
    return (np.asarray(x), np.asarray(tw), ti), w.to_layout("gfx950"), activation, ref


@pytest.mark.parametrize("quant,tiles", _tile_variants(), ids=lambda v: getattr(v, "name", v))
@pytest.mark.parametrize("case", range(2))
def test_kernel_model_matches_reference_for_every_tile_variant(quant, tiles, case):
    (x, tw, ti), wl, activation, ref = _model_case(quant, case)
    y = rocm_tile.moe_model(x, wl, tw, ti, quant=quant, activation=activation, tiles=tiles)
    accuracy.assert_close(y, ref)


@pytest.mark.parametrize("quant", ["a4w4", "a8w4"])
def test_kernel_model_deterministic_mode_matches_reference(quant):
    shape, gate_up, activation, _, bias = [c for c in MODEL_CASES if c[3] == quant][1]
    w = moe_cases.make_weights(shape, gate_up=gate_up, bias=bias)
    x, tw, ti = moe_cases.make_tokens(shape, 7)
    ref = reference.moe(np.asarray(x), w, tw, ti, quant=quant, activation=activation)
    y = rocm_tile.moe_model(np.asarray(x), w.to_layout("gfx950"), np.asarray(tw), np.asarray(ti), quant=quant,
                            activation=activation, deterministic=True, tiles=rocm_config.MID)
    accuracy.assert_close(y, ref)


def test_kernel_model_with_an_expert_mask():
    shape, gate_up, activation, quant, bias = MODEL_CASES[3]
    w = moe_cases.make_weights(shape, gate_up=gate_up, bias=bias)
    x, tw, ti = moe_cases.make_tokens(shape, 6)
    mask = np.array([1, 0, 1, 1], np.int32)
    local = [e for e in range(shape.E) if mask[e]]
    wl = dataclasses.replace(w, **{k: (None if v is None else np.asarray(v)[local]) for k, v in w.arrays().items()},
                             num_experts=len(local))
    y = rocm_tile.moe_model(np.asarray(x), wl.to_layout("gfx950"), np.asarray(tw), np.asarray(ti), quant=quant,
                            activation=activation, expert_mask=mask, tiles=rocm_config.MID)
    ti_local = np.where(mask[np.asarray(ti)] == 1, np.cumsum(mask)[np.asarray(ti)] - 1, shape.E + 5)
    ref = reference.moe(np.asarray(x), wl, tw, ti_local, quant=quant, activation=activation)
    accuracy.assert_close(y, ref)


def test_operand_placement_covers_each_k_once():
    j = np.arange(32)
    for fmt, nbytes in (("mxfp4", 16), ("mxfp8", 32)):
        ks = np.concatenate([ix.operand_k(lane, j, fmt) for lane in range(0, 64, 16)])
        assert sorted(ks.tolist()) == list(range(128))
        for lane in range(64):
            chunks = ix.operand_chunks(lane, fmt)
            assert sum(n for _, n in chunks) == nbytes
            # register-order elements come from the chunk bytes in order
            per_byte = 2 if fmt == "mxfp4" else 1
            k_from_bytes = [off * per_byte + e for off, n in chunks for e in range(n * per_byte)]
            assert k_from_bytes == ix.operand_k(lane, j, fmt).tolist()
            assert ix.scale_lane(ix.operand_row(lane), ix.operand_kblock(lane)) == lane


def _model_error(quant, tiles=None, intermediate=256):
    shape = moe_cases.Shape("even", E=2, k=2, H=512, I=intermediate)
    w = moe_cases.make_weights(shape, gate_up="separated", bias=False)
    x, tw, ti = moe_cases.make_tokens(shape, 4)
    ref = reference.moe(np.asarray(x), w, tw, ti, quant=quant, activation="silu")
    y = rocm_tile.moe_model(np.asarray(x), w.to_layout("gfx950"), np.asarray(tw), np.asarray(ti), quant=quant,
                            activation="silu", tiles=tiles or rocm_config.MID)
    return y, ref


# Negative controls: each plausible indexing bug below must fail the same bound.
def test_kernel_model_catches_a_wrong_lane_to_k_mapping(monkeypatch):
    # fp8 operands read as 32 consecutive K elements per lane (the fp4 placement)
    monkeypatch.setattr(ix, "operand_chunks", lambda lane, fmt: [((lane // 16) * 32, 16), ((lane // 16) * 32 + 16, 16)]
                        if fmt == "mxfp8" else [((lane // 16) * 16, 16)])
    y, ref = _model_error("a8w4")
    with pytest.raises(AssertionError):
        accuracy.assert_close(y, ref)


def test_kernel_model_catches_a_swizzle_the_reads_do_not_undo(monkeypatch):
    # the DMA lanes write swizzled, the ds_read lanes read unswizzled
    real = ix.lds_chunk
    dma_lane = ix.dma_lane
    monkeypatch.setattr(ix, "lds_chunk", lambda row, chunk, fmt: chunk)
    monkeypatch.setattr(ix, "dma_lane", lambda op, lane, fmt: (
        dma_lane(op, lane, fmt)[0], real(dma_lane(op, lane, fmt)[0], lane % (ix.stage_row_bytes(fmt) // 16), fmt)))
    y, ref = _model_error("a4w4")
    with pytest.raises(AssertionError):
        accuracy.assert_close(y, ref)


def test_kernel_model_catches_the_scale_byte_of_the_wrong_step(monkeypatch):
    # op_sel picks byte (step + 1) % 4 of the packed dword
    real = rocm_tile._dword_byte
    monkeypatch.setattr(rocm_tile, "_dword_byte", lambda flat, off, sel, limit=None: real(flat, off, (sel + 1) % 4, limit))
    y, ref = _model_error("a4w4")
    with pytest.raises(AssertionError):
        accuracy.assert_close(y, ref)


def test_kernel_model_catches_overlapping_k_splits(monkeypatch):
    # every split starts at step 0
    real = ix.k_split_range
    monkeypatch.setattr(ix, "k_split_range", lambda s, kblocks, k_splits: (0, real(s, kblocks, k_splits)[1]))
    t = dataclasses.replace(rocm_config.DECODE, gemm2=dataclasses.replace(rocm_config.DECODE.gemm2, k_splits=2))
    y, ref = _model_error("a4w4", t, intermediate=1024)  # 8 K steps: two splits of 4
    with pytest.raises(AssertionError):
        accuracy.assert_close(y, ref)


class _FakeClient:
    def __init__(self, platform, version):
        self.platform, self.platform_version = platform, version


class _FakeDevice:
    def __init__(self, platform, cc, kind="AMD Instinct MI355X", client=("rocm", "rocm 7.0")):
        self.platform, self.compute_capability, self.device_kind = platform, cc, kind
        self.client = _FakeClient(*client)


def test_device_arch_detection():
    from jax_mxfp4_moe.rocm import backend as rocm

    from jax_mxfp4_moe import spec

    assert rocm.device_arch(_FakeDevice("gpu", "gfx950:sramecc+:xnack-")) == "gfx950"
    assert rocm.device_arch(_FakeDevice("rocm", None, kind="gfx942")) == "gfx942"
    assert rocm.device_arch(_FakeDevice("gpu", "9.0", kind="NVIDIA H100", client=("cuda", "cuda 12"))) is None
    assert rocm.device_arch(_FakeDevice("cpu", None, kind="cpu", client=("cpu", "cpu"))) is None
    assert not rocm.available()  # this machine has no ROCm device
    layer = spec.PRESETS["gpt-oss-120b"]
    for quant in ("a4w4", "a8w4"):  # lowerable here (an export needs no device)
        assert rocm.unsupported(layer.replace(quant=quant)) is None
    assert "a16w4" in rocm.unsupported(layer.replace(quant="a16w4"))


def test_modes_without_gfx950_kernels_lower_the_jnp_path_with_a_warning(monkeypatch):
    """Placed on ROCm, a16w4 (no gfx950 kernels) lowers the jnp path, saying so."""
    import jax
    import jax_mxfp4_moe as mm
    from jax_mxfp4_moe.layer import primitive
    from jax_mxfp4_moe.runtime import ffi

    monkeypatch.setattr(primitive, "_warned", set())  # the warning is once per process

    shape = moe_cases.Shape("s", E=4, k=2, H=64, I=64)
    w = moe_cases.make_weights(shape)
    x, tw, ti = moe_cases.make_tokens(shape, 3)
    f = jax.jit(lambda *a: mm.moe(*a, activation="silu", quant="a16w4"))
    with pytest.warns(UserWarning, match="runs as jnp on rocm"):
        text = f.trace(x, w, tw, ti).lower(lowering_platforms=("rocm",)).as_text()
    assert ffi.TARGET not in text
    # the jnp path as backend="jnp" lowers it there (on accelerators: ragged_dot)
    g = jax.jit(lambda *a: mm.moe(*a, activation="silu", quant="a16w4", backend="jnp"))
    jnp_text = g.trace(x, w, tw, ti).lower(lowering_platforms=("rocm",)).as_text()
    assert text.count("chlo.ragged_dot") == jnp_text.count("chlo.ragged_dot") > 0

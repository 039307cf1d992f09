"""Execution of the gfx950 kernels on an AMD GPU (``pytest -m rocm``).

Written for an MI355X; NOT executed by this project's CI (no AMD GPU there):
every kernel against its oracle (sort vs the jnp sorter for every block
size, quant vs formats bit for bit, gemm1/gemm2 vs the NumPy functional
model for every tile variant of the tile table, gemm2's K splits and its
deterministic mode), and the whole ``moe`` against ``reference.moe`` for all
modes, layouts and activations, at small shapes and at the presets' shapes
for T in {1, 7, 64, 1000} and the prefill regimes.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import accuracy
import moe_cases
from jax_mxfp4_moe import spec
from jax_mxfp4_moe.numerics import formats, reference, sorting
from jax_mxfp4_moe.rocm import backend as rocm, config as rocm_config, geometry as ix, functional_model as rocm_tile
from jax_mxfp4_moe.rocm import layout as rocm_layout
from jax_mxfp4_moe.layer.weights import from_mxfp4

pytestmark = pytest.mark.rocm

TOKENS = (1, 7, 64, 1000)
# The presets also run at T where the table picks the prefill tiles (BM 64 / 128).
PRESET_TOKENS = TOKENS + (4096,)
# Rows of a T=1000 problem checked against the float64 reference (each
# token's output depends on its own row only; the reference is slow).
REF_ROWS = 48


def _routing(T, E, k, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    ids = np.argsort(-logits, axis=1)[:, :k].astype(np.int32)
    w = rng.random((T, k)).astype(np.float32)
    return jnp.asarray(w / w.sum(1, keepdims=True)), jnp.asarray(ids)


def _random_mxfp4_weights(E, H, I, *, gate_up, bias, seed=0):
    """Random valid MXFP4 bytes (a float model of the preset size would not fit in memory)."""
    rng = np.random.default_rng(seed)
    u8 = lambda *s: rng.integers(0, 256, s, dtype=np.uint8)  # noqa: E731
    sc = lambda *s: rng.integers(119, 123, s, dtype=np.uint8)  # noqa: E731
    b1 = rng.standard_normal((E, 2 * I)).astype(np.float32) * 0.1 if bias else None
    b2 = rng.standard_normal((E, H)).astype(np.float32) * 0.1 if bias else None
    return from_mxfp4(u8(E, 2 * I, H // 2), sc(E, 2 * I, H // 32), u8(E, H, I // 2), sc(E, H, I // 32), b1, b2,
                      gate_up=gate_up)


# ------------------------------------------------------------------ sort
@pytest.mark.parametrize("bm", sorting.BLOCK_SIZES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("preset", rocm_config.PRESETS)
@pytest.mark.parametrize("masked", [False, True])
def test_sort_kernel_equals_jnp_sorter(T, preset, masked, bm):
    p = spec.PRESETS[preset]
    E, k = p.num_experts, p.top_k
    rng = np.random.default_rng(T)
    ids = jnp.asarray(rng.integers(-1, E + 2, (T, k)), jnp.int32)  # some ids are "not here"
    tw = jnp.asarray(rng.random((T, k)), jnp.float32)
    mask = jnp.asarray(rng.integers(0, 2, E), jnp.int32) if masked else None
    got = jax.jit(lambda i, w: rocm.sort(i, w, num_experts=E, block_m=bm, expert_mask=mask))(ids, tw)
    want = sorting.moe_sort(ids, tw, num_experts=E, block_m=bm, expert_mask=mask)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# ----------------------------------------------------------------- quant
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("T,K", [(1, 256), (37, 2944), (1000, 7168)])
def test_quant_kernel_is_bit_exact(fmt, dtype, T, K):
    rng = np.random.default_rng(K + T)
    x = rng.standard_normal((T, K)) * np.exp2(rng.integers(-20, 20, (T, K // 32, 1))).repeat(32, -1).reshape(T, K)
    x[0, :32] = 0.0  # an all-zero block
    x[-1, 32:64] = 448.0 * 3  # large values (fp8 clipping)
    x = jnp.asarray(x, dtype)
    x = x.at[1, :32].set(jnp.nan).at[2, 64:96].set(jnp.inf)  # NaN / Inf blocks take the integer path
    q, s = jax.jit(lambda v: rocm.quantize(v, fmt))(x)
    wq, ws = formats.quantize(x, fmt)
    packed = np.asarray(s)
    np.testing.assert_array_equal(rocm_layout.unpack_act_scales(packed, K), np.asarray(ws))
    np.testing.assert_array_equal(packed, rocm_layout.pack_act_scales(np.asarray(ws), K))  # unused bytes zeroed
    np.testing.assert_array_equal(np.asarray(q), np.asarray(wq))


# ---------------------------------------------------------- gemm1, gemm2
def _stages(shape, T, quant, activation, gate_up, bias, tiles, deterministic=False):
    w = moe_cases.make_weights(shape, gate_up=gate_up, bias=bias).to_layout("gfx950")
    x, tw, ti = moe_cases.make_tokens(shape, T)
    layer = spec.LayerSpec.for_weights(w, shape.k, activation=activation, quant=quant)
    Hp, _ = ix.padded_dims(shape.H, shape.I)
    s = rocm.sort(ti, tw, num_experts=shape.E, block_m=tiles.bm)
    xq, xs = rocm.quantize(jnp.pad(x, ((0, 0), (0, Hp - shape.H))), layer.mode.act_format)
    inter, inter_s = rocm.gemm1(xq, xs, w, s, layer=layer, tokens=T, tiles=tiles)
    y = rocm.gemm2(inter, inter_s, w, s, layer=layer, tokens=T, tiles=tiles, deterministic=deterministic)
    return w, s, xq, xs, inter, inter_s, y


GEMM_CASES = [
    (moe_cases.Shape("pad", E=4, k=2, H=160, I=96), "a4w4", "swiglu_oai", "interleaved", True),
    (moe_cases.Shape("even", E=8, k=4, H=256, I=1024), "a8w4", "silu", "separated", False),
    (moe_cases.Shape("even", E=8, k=4, H=512, I=1024), "a4w4", "silu", "separated", True),
    (moe_cases.Shape("pad", E=4, k=2, H=160, I=96), "a8w4", "swiglu_oai", "interleaved", False),
]


def _tile_variants(quant):
    """Every regime of the table for ``quant``, and the decode tile with gemm2 split in two."""
    split = dataclasses.replace(rocm_config.DECODE, gemm2=dataclasses.replace(rocm_config.DECODE.gemm2, k_splits=2),
                                name="decode-ks2")
    return list(rocm_config.regimes(quant)) + [split]


@pytest.mark.parametrize("case,tiles,deterministic", [
    (case, tiles, det) for case, c in enumerate(GEMM_CASES) for tiles in _tile_variants(c[1]) for det in (False, True)],
    ids=lambda v: getattr(v, "name", str(v)))
def test_gemm_kernels_match_the_functional_model(case, tiles, deterministic):
    shape, quant, activation, gate_up, bias = GEMM_CASES[case]
    if deterministic:
        tiles = dataclasses.replace(tiles, gemm2=dataclasses.replace(tiles.gemm2, k_splits=1))
    T = 33
    w, s, xq, xs, inter, inter_s, y = _stages(shape, T, quant, activation, gate_up, bias, tiles, deterministic)
    s_np = [np.asarray(a) for a in s]
    b1 = None if w.b1 is None else np.asarray(w.b1)
    b2 = None if w.b2 is None else np.asarray(w.b2)
    kw = dict(tokens=T, top_k=shape.k, hidden=shape.H, intermediate=shape.I, quant=quant, bm=tiles.bm)
    m_inter, m_inter_s = rocm_tile.gemm1_model(
        np.asarray(xq), np.asarray(xs), np.asarray(w.w1), np.asarray(w.w1_scale), b1, s_np[0], s_np[2], s_np[3],
        activation=activation, gate_up=gate_up, tiles=tiles.gemm1.tiles, waves=tiles.gemm1.waves, **kw)
    used = s_np[3][0]
    fmt = "mxfp4" if quant == "a4w4" else "mxfp8"
    deq = formats.dequantize_mxfp4_np if fmt == "mxfp4" else formats.dequantize_mxfp8_np
    Ip = ix.padded_dims(shape.H, shape.I)[1]
    got = deq(np.asarray(inter)[:used], rocm_layout.unpack_act_scales(np.asarray(inter_s)[:used], Ip))
    want = deq(m_inter[:used], rocm_layout.unpack_act_scales(m_inter_s[:used], Ip))
    # f32 accumulation order and the hardware exp / rcp may move a value across a rounding boundary: rare, one step
    accuracy.assert_close(got, want.astype(np.float64), rel=1e-2, max_abs=5e-2)
    assert np.mean(np.asarray(inter)[:used] != m_inter[:used]) < 1e-2
    m_y = rocm_tile.gemm2_model(np.asarray(inter), np.asarray(inter_s), np.asarray(w.w2), np.asarray(w.w2_scale), b2,
                                s_np[0], s_np[1], s_np[2], s_np[3], tiles=tiles.gemm2.tiles,
                                waves=tiles.gemm2.waves, k_splits=tiles.gemm2.k_splits, deterministic=deterministic,
                                **kw)
    if deterministic:
        m_y = m_y.reshape(T, shape.k, -1).sum(axis=1)
    accuracy.assert_close(np.asarray(y, np.float32), m_y.astype(np.float64), rel=1e-2, max_abs=2e-2)


# ------------------------------------------------------------- whole moe
SMALL = [
    (quant, activation, gate_up, bias)
    for quant in rocm_config.QUANTS
    for activation in spec.ACTIVATION_KINDS
    for gate_up in ("separated", "interleaved")
    for bias in (False, True)
]


@pytest.mark.parametrize("quant,activation,gate_up,bias", SMALL)
@pytest.mark.parametrize("layout", ["canonical", "gfx950"])
def test_moe_matches_reference_small(quant, activation, gate_up, bias, layout):
    shape = moe_cases.GPT_OSS_LIKE if gate_up == "interleaved" else moe_cases.DEEPSEEK_LIKE
    w = moe_cases.make_weights(shape, gate_up=gate_up, bias=bias, layout=layout)
    x, tw, ti = moe_cases.make_tokens(shape, 23)
    y = jax.jit(lambda *a: moe_cases.backend_moe(rocm, *a, activation=activation, quant=quant))(x, w, tw, ti)
    ref = reference.moe(np.asarray(x), w.canonical(), tw, ti, quant=quant, activation=activation)
    accuracy.assert_close(y, ref)


@pytest.mark.parametrize("T", PRESET_TOKENS)
@pytest.mark.parametrize("quant", rocm_config.QUANTS)
@pytest.mark.parametrize("preset", rocm_config.PRESETS)
def test_moe_matches_reference_at_presets(preset, quant, T):
    p = spec.PRESETS[preset]
    E, k, H, I = p.num_experts, p.top_k, p.hidden, p.intermediate
    w = _random_mxfp4_weights(E, H, I, gate_up=p.gate_up, bias=p.has_b1)
    wl = w.to_layout("gfx950")
    tw, ti = _routing(T, E, k, seed=T)
    x = jnp.asarray(np.random.default_rng(T).standard_normal((T, H)), jnp.bfloat16)
    y = jax.jit(lambda *a: moe_cases.backend_moe(rocm, *a, activation=p.activation, quant=quant))(x, wl, tw, ti)
    rows = slice(0, min(T, REF_ROWS))
    ref = reference.moe(np.asarray(x)[rows], w, np.asarray(tw)[rows], np.asarray(ti)[rows], quant=quant,
                        activation=p.activation)
    accuracy.assert_close(np.asarray(y)[rows], ref)


@pytest.mark.parametrize("quant,floor", [("a4w4", 0.97), ("a8w4", 0.998)])
def test_cosine_against_the_unquantised_activation_reference(quant, floor):
    shape = moe_cases.GPT_OSS_LIKE
    w = moe_cases.make_weights(shape, gate_up="interleaved", bias=True)
    x, tw, ti = moe_cases.make_tokens(shape, 64)
    y = jax.jit(lambda *a: moe_cases.backend_moe(rocm, *a, activation="swiglu_oai", quant=quant))(x, w, tw, ti)
    exact = reference.moe(np.asarray(x), w, tw, ti, quant=quant, activation="swiglu_oai", quantize_activations=False)
    quantised = reference.moe(np.asarray(x), w, tw, ti, quant=quant, activation="swiglu_oai")
    cos = accuracy.cosine(np.asarray(y, np.float32), exact)
    print(f"{quant}: cosine vs unquantised activations {cos:.4f} (reference {accuracy.cosine(quantised, exact):.4f})")
    assert cos >= floor and cos >= accuracy.cosine(quantised, exact) - 2e-3


@pytest.mark.parametrize("quant", rocm_config.QUANTS)
def test_deterministic_mode_is_reproducible_and_accurate(quant):
    shape = moe_cases.DEEPSEEK_LIKE
    w = moe_cases.make_weights(shape, bias=True)
    x, tw, ti = moe_cases.make_tokens(shape, 200)
    f = jax.jit(lambda *a: moe_cases.backend_moe(rocm, *a, activation="silu", quant=quant, deterministic=True))
    y1 = np.asarray(f(x, w, tw, ti), np.float32)
    y2 = np.asarray(f(x, w, tw, ti), np.float32)
    np.testing.assert_array_equal(y1, y2)
    accuracy.assert_close(y1, reference.moe(np.asarray(x), w, tw, ti, quant=quant, activation="silu"))


def test_ids_not_here_contribute_nothing_and_t0_is_empty():
    shape = moe_cases.DEEPSEEK_LIKE
    w = moe_cases.make_weights(shape, bias=True)
    x, tw, ti = moe_cases.make_tokens(shape, 5)
    f = jax.jit(lambda *a: moe_cases.backend_moe(rocm, *a, activation="silu", quant="a8w4"))
    y = f(x, w, tw, jnp.full_like(ti, shape.E + 7))
    assert not np.asarray(y, np.float32).any()
    y0 = f(x[:0], w, tw[:0], ti[:0])
    assert y0.shape == (0, shape.H)


def test_public_api_runs_the_rocm_kernels():
    from jax_mxfp4_moe import moe

    shape = moe_cases.GPT_OSS_LIKE
    w = moe_cases.make_weights(shape, gate_up="interleaved")
    x, tw, ti = moe_cases.make_tokens(shape, 7)
    y = jax.jit(lambda *a: moe(*a, activation="swiglu_oai", quant="a4w4", backend="rocm"))(x, w, tw, ti)
    ref = reference.moe(np.asarray(x), w, tw, ti, quant="a4w4", activation="swiglu_oai")
    accuracy.assert_close(y, ref)

"""MX formats: element conversion against ml_dtypes, the scale rule, jnp vs NumPy."""

import ml_dtypes
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from jax_mxfp4_moe.numerics import formats as F

EDGE = [0.0, -0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -6.0, 7.0, 1e30, -1e30,
        np.inf, -np.inf, np.nan, 448.0, 464.0, 480.0, -500.0, 2.0 ** -9, 2.0 ** -10,
        3 * 2.0 ** -11, 1e-40, -1e-40, 0.5, 0.4999, 0.75000006]

f32s = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
f32_arrays = hnp.arrays(np.float32, 64, elements=f32s)  # one shape: one compile
_e2m1 = jax.jit(F.e2m1_encode)
_e4m3 = jax.jit(F.e4m3_encode)


@settings(max_examples=200, deadline=None)
@given(f32_arrays)
def test_e2m1_encode_matches_ml_dtypes(v):
    expect = v.astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    np.testing.assert_array_equal(np.asarray(_e2m1(v)), expect)
    np.testing.assert_array_equal(F.e2m1_encode_np(v), expect)


def test_e2m1_encode_edges_and_ties():
    v = np.array(EDGE, np.float32)
    expect = v.astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    np.testing.assert_array_equal(np.asarray(F.e2m1_encode(jnp.asarray(v))), expect)
    # ties go to the even code: 0.25 -> 0, 0.75 -> 1.0, 2.5 -> 2, 5 -> 4
    assert [F.E2M1_VALUES[c & 7] for c in F.e2m1_encode_np(np.array([0.25, 0.75, 2.5, 5.0]))] == [0, 1, 2, 4]


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, 64,
                  elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False)))
def test_e4m3_encode_matches_ml_dtypes_saturating(v):
    expect = np.clip(v, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(np.asarray(_e4m3(v)), expect)
    np.testing.assert_array_equal(F.e4m3_encode_np(v), expect)
    assert not np.isnan(F.e4m3_decode_np(expect)).any()  # saturated, never NaN


def test_decode_tables():
    codes = np.arange(16, dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(F.e2m1_decode(jnp.asarray(codes))),
                                  codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32))
    bits = np.arange(256, dtype=np.uint8)
    ref = bits.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    got = np.asarray(F.e4m3_decode(jnp.asarray(bits)))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(got[~np.isnan(ref)], ref[~np.isnan(ref)])


@pytest.mark.parametrize("amax, fmt, byte", [
    (4.0, "mxfp4", 127),        # 4/4 = 1.0 -> 2**0
    (6.0, "mxfp4", 128),        # 1.5 rounds up -> 2**1, elements <= 3
    (5.96, "mxfp4", 127),       # 1.49 -> 2**0, 5.96 -> 6 (saturating)
    (1.0, "mxfp4", 125),        # 0.25 -> 2**-2
    (0.0, "mxfp4", 0),          # zero block -> smallest scale
    (256.0, "mxfp8", 127),
    (448.0, "mxfp8", 128),      # 1.75 -> 2**1, elements <= 224
    (383.0, "mxfp8", 127),      # 1.496 -> 2**0, elements <= 383 < 448
    (1.0, "mxfp8", 119),        # 2**-8
    (np.inf, "mxfp4", 255), (np.nan, "mxfp8", 255),
])
def test_scale_rule_hand_cases(amax, fmt, byte):
    assert int(F.e8m0_scale_np(np.float32(amax), fmt)) == byte
    assert int(F.e8m0_scale(jnp.float32(amax), fmt)) == byte


def test_scale_rule_is_flydsl_f32_to_e8m0():
    """The bit rule of FlyDSL's f32_to_e8m0 written out on float32 bits."""
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.uniform(0, 10, 1000), np.exp(rng.uniform(-80, 80, 1000)),
                        [2.0 ** -127, 2.0 ** -127 * 1.5, 2.0 ** -126 * 0.75]]).astype(np.float32)
    u = v.view(np.uint32)
    exp = (u >> 23) & 0xFF
    rnd = ((u & 0x400000) > 0) & (((u & 0x200000) > 0) | ((u & 0x1FFFFF) > 0) | (exp > 0))
    expect = np.where(rnd, exp + 1, exp)
    np.testing.assert_array_equal(F.e8m0_scale_np(v * np.float32(4), "mxfp4"), expect)


def _blocky(rng, rows, k):
    """Values with a wide dynamic range across and inside blocks."""
    x = rng.standard_normal((rows, k)) * np.exp(rng.uniform(-30, 30, (rows, 1)))
    x *= np.exp(rng.uniform(-6, 0, (rows, k)))  # small elements next to large ones
    return x.astype(np.float32)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_quantize_jnp_equals_numpy_bitwise(fmt):
    rng = np.random.default_rng(1)
    x = _blocky(rng, 64, 256)
    x[0, :32] = 0.0
    x[1, 3] = np.nan
    x[2, 40] = np.inf
    x[3, 64:96] = -0.0
    qn, sn = (F.quantize_mxfp4_np if fmt == "mxfp4" else F.quantize_mxfp8_np)(x)
    qj, sj = F.quantize(jnp.asarray(x), fmt)
    np.testing.assert_array_equal(np.asarray(sj), sn)
    np.testing.assert_array_equal(np.asarray(qj), qn)
    assert sn[1, 0] == 255 and sn[2, 1] == 255 and sn[0, 0] == 0


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["mxfp4", "mxfp8"]), st.integers(0, 2**31))
def test_quantize_dequantize_error_bound(fmt, seed):
    """Every element lands within half a step of its format at the block's scale,
    and nothing saturates beyond the element maximum (the rule avoids clipping)."""
    rows, blocks = 4, 4
    x = _blocky(np.random.default_rng(seed), rows, 32 * blocks)
    if fmt == "mxfp4":
        q, s = F.quantize_mxfp4_np(x)
        d = F.dequantize_mxfp4_np(q, s, np.float64)
        dj = np.asarray(F.dequantize_mxfp4(jnp.asarray(q), jnp.asarray(s)))
        rel_step = 0.5  # E2M1 has 1 mantissa bit
    else:
        q, s = F.quantize_mxfp8_np(x)
        d = F.dequantize_mxfp8_np(q, s, np.float64)
        dj = np.asarray(F.dequantize_mxfp8(jnp.asarray(q), jnp.asarray(s)))
        rel_step = 0.125
    np.testing.assert_array_equal(dj, d.astype(np.float32))
    scale = np.repeat(F.e8m0_to_float_np(s), 32, axis=-1)
    amax = np.repeat(np.abs(x).reshape(rows, blocks, 32).max(-1), 32, axis=-1)
    assert (amax <= (6.0 if fmt == "mxfp4" else 448.0) * scale).all()  # no clipping
    # half a step of the element's binade, or of the subnormal step
    sub_step = scale * (0.5 if fmt == "mxfp4" else 2.0 ** -9)
    err = np.abs(d - x)
    binade = 2.0 ** np.floor(np.log2(np.maximum(np.abs(x), 1e-300)))
    assert (err <= np.maximum(binade * rel_step / 2, sub_step / 2) * (1 + 1e-6)).all()


def test_pack_order_low_nibble_first():
    codes = np.array([[1, 2, 3, 4]], np.uint8)
    np.testing.assert_array_equal(F.pack_fp4(codes), [[0x21, 0x43]])
    np.testing.assert_array_equal(F.unpack_fp4(F.pack_fp4(codes)), codes)
    np.testing.assert_array_equal(np.asarray(F.pack_fp4(jnp.asarray(codes))), [[0x21, 0x43]])


def test_leading_shapes_and_errors():
    x = np.random.default_rng(2).standard_normal((2, 3, 64)).astype(np.float32)
    q, s = F.quantize_mxfp4(jnp.asarray(x))
    assert q.shape == (2, 3, 32) and s.shape == (2, 3, 2)
    q8, s8 = F.quantize_mxfp8_np(x)
    assert q8.shape == (2, 3, 64) and s8.shape == (2, 3, 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        F.quantize_mxfp4(jnp.ones((4, 48)))
    with pytest.raises(ValueError, match="fmt"):
        F.quantize(jnp.ones((4, 32)), "mxfp6")

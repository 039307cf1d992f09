"""The oracle itself: against dense float64 math, and its quantiser against formats.py
(two independent implementations of one rule)."""

import numpy as np
import pytest

import jax_mxfp4_moe as mm
from jax_mxfp4_moe.numerics import formats, reference

GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, -0.5, -1, -1.5, -2, -3, -4])


def exact_fp4_weights(rng, shape):
    """Floats that MXFP4 holds exactly: under the scale rule a block with max |v| = 4 * 2**s
    gets scale 2**s, so fp4 grid values times 2**s quantise losslessly."""
    v = rng.choice(GRID, shape)
    v[..., ::32] = 4.0
    return v * np.exp2(rng.integers(-4, 2, shape[:-1] + (1,)))


@pytest.mark.parametrize("gate_up", ["separated", "interleaved"])
@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
def test_reference_equals_dense_float64(gate_up, activation):
    rng = np.random.default_rng(0)
    E, k, H, I, T = 3, 2, 64, 32, 5
    w1, w2 = exact_fp4_weights(rng, (E, 2 * I, H)), exact_fp4_weights(rng, (E, H, I)) / 8
    b1, b2 = rng.standard_normal((E, 2 * I)), rng.standard_normal((E, H))
    w = mm.prepare_weights(w1, w2, b1, b2, gate_up=gate_up)
    np.testing.assert_array_equal(formats.dequantize_mxfp4_np(w.w1, w.w1_scale), w1)  # lossless
    x = rng.standard_normal((T, H)).astype(np.float32) / 8
    ids = rng.integers(0, E, (T, k)).astype(np.int32)
    ids[0, 1] = E + 2  # not here
    tw = rng.random((T, k)).astype(np.float32)
    got = reference.moe(x, w, tw, ids, activation=activation, quantize_activations=False)
    want = np.zeros((T, H))
    for t in range(T):
        for j in range(k):
            e = ids[t, j]
            if e >= E:
                continue
            h = w1[e] @ x[t].astype(np.float64) + np.float32(b1[e])
            g, u = (h[:I], h[I:]) if gate_up == "separated" else (h[0::2], h[1::2])
            if activation == "silu":
                a = g / (1 + np.exp(-g)) * u
            else:
                g, u = np.minimum(g, 7.0), np.clip(u, -7.0, 7.0)
                a = g / (1 + np.exp(-1.702 * g)) * (u + 1)
            want[t] += tw[t, j] * (w2[e] @ a + np.float32(b2[e]))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("quant, fmt", [("a4w4", "mxfp4"), ("a8w4", "mxfp8")])
def test_reference_quantiser_equals_formats(quant, fmt):
    rng = np.random.default_rng(1)
    v = rng.standard_normal((40, 128)) * np.exp(rng.uniform(-30, 30, (40, 1)))
    v *= np.exp(rng.uniform(-5, 0, v.shape))
    v[0, :32] = 0
    v[1, 5] = np.nan
    v = v.astype(np.float32)
    q, s = formats.quantize_mxfp4_np(v) if fmt == "mxfp4" else formats.quantize_mxfp8_np(v)
    want = (formats.dequantize_mxfp4_np if fmt == "mxfp4" else formats.dequantize_mxfp8_np)(q, s, np.float64)
    got = np.stack([reference.quantize_dequantize(row, quant) for row in v])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok], want[ok])


def test_reference_rejects_other_layouts_and_modes():
    w = mm.prepare_weights(np.ones((1, 64, 32)), np.ones((1, 32, 32)))
    x, tw, ti = np.ones((1, 32), np.float32), np.ones((1, 1), np.float32), np.zeros((1, 1), np.int32)
    with pytest.raises(ValueError, match="quant"):
        reference.moe(x, w, tw, ti, quant="a2w4")
    with pytest.raises(ValueError, match="activation"):
        reference.moe(x, w, tw, ti, activation="relu")

"""The NumPy oracle: the MoE layer computed in float64, one (token, slot) at a time.

Written independently of the jnp and kernel paths: it decodes fp4/fp8/e8m0
with ml_dtypes and its own arithmetic, never sorts, and shares nothing with
them but the constants of the formats.  Experts are visited one at a time only
so that each expert's weights are decoded once; every (token, slot)
contribution is computed on its own.

Activation quantisation follows the rule stated in formats.py, re-derived here
from its definition: scale = 2**e with e from the float32 value amax / 2**emax
rounded at the mantissa's halfway point 1.5, elements rounded to nearest even
and saturated (MXFP8 clipped at 448).  ``quantize_activations=False`` skips it
(weights stay MXFP4): the accuracy baseline.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from jax_mxfp4_moe.numerics.formats import E8M0_BIAS, E8M0_NAN, FP8_MAX, MX_BLOCK  # constants only
from jax_mxfp4_moe.spec import as_activation, quant_mode  # names and parameters only

_EMAX = {"a4w4": 2, "a8w4": 8}


def _e8m0_value(byte):
    b = np.asarray(byte).astype(np.int64)
    return np.where(b == E8M0_NAN, np.nan, 2.0 ** (b - E8M0_BIAS).astype(np.float64))


def _fp4_decode(packed):
    packed = np.asarray(packed, np.uint8)
    codes = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    codes[..., 0::2] = packed & 0xF
    codes[..., 1::2] = packed >> 4
    return codes.view(ml_dtypes.float4_e2m1fn).astype(np.float64)


def _dequant_fp4(packed, scale):
    v = _fp4_decode(packed)
    s = np.repeat(_e8m0_value(scale), MX_BLOCK, axis=-1)
    with np.errstate(invalid="ignore"):
        return v * s


def _scale_exponent(amax32: np.float32, emax: int) -> int:
    """Biased E8M0 byte for one block, from the rule's definition."""
    v = np.float32(amax32) / np.float32(2.0 ** emax)
    if not np.isfinite(v):
        return E8M0_NAN
    if v == 0:
        return 0
    m, e = math.frexp(float(v))          # v = m * 2**e, m in [0.5, 1)
    biased = e - 1 + E8M0_BIAS           # float32 biased exponent of v
    if biased <= 0:                      # float32 denormal: exponent field 0
        # round up only when the value is past half of 2**-126 (bit 22 plus more)
        frac = float(v) / 2.0 ** -126    # in (0, 1)
        return 1 if frac > 0.5 else 0
    return min(biased + (1 if m >= 0.75 else 0), E8M0_NAN)


def quantize_dequantize(v: np.ndarray, quant: str) -> np.ndarray:
    """Round a float vector (length a multiple of 32) through the mode's format."""
    v = np.asarray(v, np.float64)
    if quant == "a16w4":
        return v.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    v32 = v.astype(np.float32)
    out = np.empty(v.shape, np.float64)
    for start in range(0, v.shape[-1], MX_BLOCK):
        blk = v32[start:start + MX_BLOCK]
        amax = np.float32(np.nan) if np.isnan(blk).any() else np.max(np.abs(blk))
        byte = _scale_exponent(amax, _EMAX[quant])
        if byte == E8M0_NAN:
            out[start:start + MX_BLOCK] = np.nan
            continue
        scaled = (blk.astype(np.float64) * 2.0 ** (E8M0_BIAS - byte)).astype(np.float32)
        if quant == "a4w4":
            elem = scaled.astype(ml_dtypes.float4_e2m1fn)
        else:
            elem = np.clip(scaled, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
        out[start:start + MX_BLOCK] = elem.astype(np.float64) * 2.0 ** (byte - E8M0_BIAS)
    return out


def _act(h, activation, gate_up):
    I = h.shape[-1] // 2
    if gate_up == "separated":
        g, u = h[..., :I], h[..., I:]
    else:
        g, u = h[..., 0::2], h[..., 1::2]
    if activation.name == "silu":
        return g / (1.0 + np.exp(-g)) * u
    if activation.name == "swiglu_oai":
        alpha, limit = activation.param("alpha"), activation.param("limit")
        g = np.minimum(g, limit)
        u = np.clip(u, -limit, limit)
        return g / (1.0 + np.exp(-alpha * g)) * (u + 1.0)
    raise NotImplementedError(f"reference: no definition of activation {activation.name!r}")


def moe(x, weights, topk_weights, topk_ids, *, activation="silu", quant: str = "a16w4",
        quantize_activations: bool = True) -> np.ndarray:
    """y [..., H] float64 for canonical-layout MoEWeights (docs/DESIGN.md §1);
    x [..., H], topk_* [..., k]; activation a name or ``spec.Activation``."""
    if weights.layout != "canonical":
        raise ValueError(f"weights: the reference reads the canonical layout, got {weights.layout!r}")
    activation = as_activation(activation)
    quant_mode(quant)
    lead = np.shape(x)[:-1]
    x = np.reshape(x, (-1, np.shape(x)[-1]))
    topk_ids = np.reshape(np.asarray(topk_ids), (-1, np.shape(topk_ids)[-1]))
    topk_weights = np.reshape(np.asarray(topk_weights), (-1, np.shape(topk_weights)[-1]))
    x = np.asarray(np.asarray(x).astype(np.float32), np.float64)
    ids = np.asarray(topk_ids).astype(np.int64)
    tw = np.asarray(topk_weights).astype(np.float64)
    T, H = x.shape
    E = weights.num_experts
    b1 = None if weights.b1 is None else np.asarray(weights.b1, np.float64)
    b2 = None if weights.b2 is None else np.asarray(weights.b2, np.float64)

    def q(v):
        return quantize_dequantize(v, quant) if quantize_activations else v

    xq = np.stack([q(x[t]) for t in range(T)]) if T else x
    y = np.zeros((T, H), np.float64)
    for e in range(E):
        pairs = np.argwhere(ids == e)
        if not len(pairs):
            continue
        w1 = _dequant_fp4(np.asarray(weights.w1[e]), np.asarray(weights.w1_scale[e]))
        w2 = _dequant_fp4(np.asarray(weights.w2[e]), np.asarray(weights.w2_scale[e]))
        for t, j in pairs:
            with np.errstate(invalid="ignore", over="ignore"):
                h = w1 @ xq[t]
                if b1 is not None:
                    h = h + b1[e]
                a = q(_act(h, activation, weights.gate_up))
                o = w2 @ a
                if b2 is not None:
                    o = o + b2[e]
                y[t] += tw[t, j] * o
    return y.reshape(*lead, H)

"""moe() on the jnp path against the NumPy reference, under jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mxfp4_moe as mm
from jax_mxfp4_moe.numerics import reference

from accuracy import assert_close, cosine
from moe_cases import DEEPSEEK_LIKE, GPT_OSS_LIKE, make_tokens, make_weights


@functools.lru_cache(maxsize=None)
def jitted(activation, quant, deterministic=False):
    return jax.jit(functools.partial(mm.moe, activation=activation, quant=quant,
                                     deterministic=deterministic, backend="jnp"))


@pytest.mark.parametrize("shape", [GPT_OSS_LIKE, DEEPSEEK_LIKE], ids=lambda s: s.name)
@pytest.mark.parametrize("gate_up", ["separated", "interleaved"])
@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
@pytest.mark.parametrize("quant", ["a16w4", "a8w4", "a4w4"])
def test_moe_matches_reference(shape, gate_up, activation, quant):
    w = make_weights(shape, gate_up=gate_up, bias=(activation == "swiglu_oai"))
    x, tw, ti = make_tokens(shape, 13)
    y = jitted(activation, quant)(x, w, tw, ti)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, reference.moe(x, w, tw, ti, activation=activation, quant=quant))


@pytest.mark.parametrize("quant, min_cos", [("a16w4", 0.9999), ("a8w4", 0.998), ("a4w4", 0.97)])
def test_cosine_against_unquantised_activations(quant, min_cos):
    """Accuracy cost of activation quantisation (README table)."""
    w = make_weights(GPT_OSS_LIKE, gate_up="interleaved")
    x, tw, ti = make_tokens(GPT_OSS_LIKE, 32)
    y = np.asarray(jitted("swiglu_oai", quant)(x, w, tw, ti).astype(jnp.float32))
    exact = reference.moe(x, w, tw, ti, activation="swiglu_oai", quant=quant, quantize_activations=False)
    assert cosine(y, exact) >= min_cos


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_other_input_dtypes(dtype):
    w = make_weights(GPT_OSS_LIKE)
    x, tw, ti = make_tokens(GPT_OSS_LIKE, 5, dtype=dtype)
    y = jitted("silu", "a8w4")(x, w, tw, ti)
    assert y.dtype == dtype
    assert_close(y, reference.moe(x, w, tw, ti, quant="a8w4"))


def test_single_token_and_one_expert_and_out_of_range_ids():
    w = make_weights(DEEPSEEK_LIKE)
    x, tw, ti = make_tokens(DEEPSEEK_LIKE, 1)
    assert_close(jitted("silu", "a4w4")(x, w, tw, ti), reference.moe(x, w, tw, ti, quant="a4w4"))
    x, tw, _ = make_tokens(DEEPSEEK_LIKE, 40)
    ti = jnp.full((40, 8), 3, jnp.int32)
    assert_close(jitted("silu", "a16w4")(x, w, tw, ti), reference.moe(x, w, tw, ti))
    bad = ti.at[:, ::2].set(jnp.array([-1, 16, 1000, -7]))
    y = jitted("silu", "a16w4")(x, w, tw, bad)
    ref = reference.moe(x, w, tw, bad)
    assert_close(y, ref)
    # only the odd slots (expert 3) contribute
    only_odd = reference.moe(x, w, tw.at[:, ::2].set(0), ti)
    np.testing.assert_allclose(ref, only_odd, rtol=1e-12, atol=1e-12)


def test_all_ids_out_of_range_gives_zero():
    w = make_weights(GPT_OSS_LIKE)
    x, tw, _ = make_tokens(GPT_OSS_LIKE, 6)
    y = jitted("silu", "a16w4")(x, w, tw, jnp.full((6, 4), 99, jnp.int32))
    assert not np.asarray(y.astype(jnp.float32)).any()


def test_expert_mask_selects_local_experts():
    """Weights holding experts {2, 5} with a mask give the global result restricted to them."""
    full = make_weights(GPT_OSS_LIKE)
    keep = np.zeros(8, bool)
    keep[[2, 5]] = True
    local = mm.from_mxfp4(full.w1[keep], full.w1_scale[keep], full.w2[keep], full.w2_scale[keep],
                          full.b1[keep], full.b2[keep], gate_up=full.gate_up)
    x, tw, ti = make_tokens(GPT_OSS_LIKE, 11)
    f = jax.jit(lambda x, w, tw, ti, m: mm.moe(x, w, tw, ti, expert_mask=m))
    y = f(x, local, tw, ti, jnp.asarray(keep))
    masked_w = jnp.where(jnp.isin(ti, jnp.array([2, 5])), tw, 0.0)
    assert_close(y, reference.moe(x, full, masked_w, ti))


def test_deterministic_flag_same_result_on_jnp_path():
    w = make_weights(GPT_OSS_LIKE)
    x, tw, ti = make_tokens(GPT_OSS_LIKE, 9)
    a = jitted("silu", "a4w4", True)(x, w, tw, ti)
    b = jitted("silu", "a4w4", False)(x, w, tw, ti)
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


def test_zero_tokens():
    w = make_weights(GPT_OSS_LIKE)
    x = jnp.zeros((0, 256), jnp.bfloat16)
    y = jax.jit(mm.moe)(x, w, jnp.zeros((0, 4)), jnp.zeros((0, 4), jnp.int32))
    assert y.shape == (0, 256) and y.dtype == jnp.bfloat16


def test_nan_in_x_propagates_to_its_token_only():
    w = make_weights(GPT_OSS_LIKE)
    x, tw, ti = make_tokens(GPT_OSS_LIKE, 4)
    x = x.at[1, 7].set(jnp.nan)
    for quant in ("a16w4", "a4w4"):
        y = np.asarray(jitted("silu", quant)(x, w, tw, ti).astype(jnp.float32))
        assert np.isnan(y[1]).all()
        assert np.isfinite(y[[0, 2, 3]]).all()


def test_repeated_calls_and_export_round_trip():
    w = make_weights(GPT_OSS_LIKE, gate_up="interleaved")
    x, tw, ti = make_tokens(GPT_OSS_LIKE, 8)
    f = jax.jit(functools.partial(mm.moe, activation="swiglu_oai", quant="a8w4"))
    y1, y2 = f(x, w, tw, ti), f(x, w, tw, ti)
    np.testing.assert_array_equal(np.asarray(y1.astype(jnp.float32)), np.asarray(y2.astype(jnp.float32)))
    exported = jax.export.export(f)(x, w, tw, ti)
    restored = jax.export.deserialize(exported.serialize())
    y3 = restored.call(x, w, tw, ti)
    np.testing.assert_array_equal(np.asarray(y3.astype(jnp.float32)), np.asarray(y1.astype(jnp.float32)))

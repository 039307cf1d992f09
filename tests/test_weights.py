"""MoEWeights: quantisation of float weights, layouts, the gpt-oss checkpoint loader."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_mxfp4_moe as mm
from jax_mxfp4_moe.numerics import formats, reference
from jax_mxfp4_moe.layer import layouts

from accuracy import assert_close
from moe_cases import GPT_OSS_LIKE, Shape, make_tokens, make_weights


def test_prepare_weights_quantises_each_row_block():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((2, 64, 64)).astype(np.float32)
    w2 = rng.standard_normal((2, 64, 32)).astype(np.float32)
    w = mm.prepare_weights(w1, w2)
    q, s = formats.quantize_mxfp4_np(w1)
    np.testing.assert_array_equal(np.asarray(w.w1), q)
    np.testing.assert_array_equal(np.asarray(w.w1_scale), s)
    assert (w.num_experts, w.hidden, w.intermediate) == (2, 64, 32)
    assert w.b1 is None and not w.has_bias


def test_weights_are_a_pytree_under_jit():
    w = make_weights(GPT_OSS_LIKE)
    leaves = jax.tree_util.tree_leaves(w)
    assert len(leaves) == 6
    out = jax.jit(lambda w: w)(w)
    assert out.gate_up == w.gate_up and out.num_experts == w.num_experts


def test_layout_registry_round_trip():
    class Reversed:  # a toy layout: experts stored in reverse order
        name = "test-reversed"

        def pack(self, canon, **dims):
            return {k: v[::-1] for k, v in canon.items()}

        def unpack(self, arrays, **dims):
            return {k: v[::-1] for k, v in arrays.items()}

    layouts.register(Reversed())
    w = make_weights(GPT_OSS_LIKE)
    r = w.to_layout("test-reversed")
    assert r.layout == "test-reversed"
    np.testing.assert_array_equal(np.asarray(r.w1[0]), np.asarray(w.w1[-1]))
    back = r.canonical()
    for name in ("w1", "w1_scale", "w2", "w2_scale", "b1", "b2"):
        np.testing.assert_array_equal(np.asarray(getattr(back, name)), np.asarray(getattr(w, name)))
    # the jnp path reads any registered layout
    x, tw, ti = make_tokens(GPT_OSS_LIKE, 3)
    y = mm.moe(x, r, tw, ti, backend="jnp")
    assert_close(y, reference.moe(x, w, tw, ti))
    with pytest.raises(ValueError, match="layout"):
        layouts.get("no-such-layout")


def _fp4_blocks(values):
    """Float values (exact fp4 x power-of-two) -> gpt-oss blocks/scales, written here
    independently of the package with ml_dtypes."""
    E, N, K = values.shape
    vb = values.reshape(E, N, K // 32, 32)
    amax = np.abs(vb).max(-1)
    exp = np.where(amax > 0, np.floor(np.log2(np.maximum(amax, 1e-30))) - 2, 0).astype(np.int32)
    codes = (vb / np.exp2(exp)[..., None]).astype(np.float32).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return packed, (exp + 127).astype(np.uint8), (codes.view(ml_dtypes.float4_e2m1fn).astype(np.float64)
                                                 * np.exp2(exp)[..., None]).reshape(E, N, K)


def test_gpt_oss_safetensors_loader(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    E, H, I, layer = 4, 64, 32, 7
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -6])
    w1 = rng.choice(grid, (E, 2 * I, H)) * np.exp2(rng.integers(-3, 3, (E, 2 * I, 1)))
    w2 = rng.choice(grid, (E, H, I)) * np.exp2(rng.integers(-3, 3, (E, H, 1)))
    blk1, sc1, w1_exact = _fp4_blocks(w1)
    blk2, sc2, w2_exact = _fp4_blocks(w2)
    b1 = rng.standard_normal((E, 2 * I)).astype(np.float32)
    b2 = rng.standard_normal((E, H)).astype(np.float32)
    p = f"model.layers.{layer}.mlp.experts."
    path = tmp_path / "model-00001.safetensors"
    save_file({p + "gate_up_proj_blocks": blk1.reshape(E, 2 * I, H // 32, 16), p + "gate_up_proj_scales": sc1,
               p + "gate_up_proj_bias": b1, p + "down_proj_blocks": blk2.reshape(E, H, I // 32, 16),
               p + "down_proj_scales": sc2, p + "down_proj_bias": b2,
               "model.layers.0.mlp.experts.down_proj_bias": b2}, str(path))
    w = mm.from_gpt_oss(str(path), layer)
    assert w.gate_up == "interleaved" and (w.num_experts, w.hidden, w.intermediate) == (E, H, I)

    # the layer computed straight from the float weights, gpt-oss style
    x, tw, ti = make_tokens(Shape("gpt-oss-tiny", E=E, k=2, H=H, I=I), 5)
    y = mm.moe(x, w, tw, ti, activation="swiglu_oai", backend="jnp")
    xs = np.asarray(x.astype(jnp.float32), np.float64)
    want = np.zeros((5, H))
    for t in range(5):
        for j in range(2):
            e = int(ti[t, j])
            h = w1_exact[e] @ xs[t] + b1[e]
            g, u = np.minimum(h[0::2], 7.0), np.clip(h[1::2], -7.0, 7.0)
            with np.errstate(over="ignore"):  # exp(-1.702 g) overflows to inf for very negative g: a = -0
                a = (g / (1 + np.exp(-1.702 * g)) * (u + 1)).astype(np.float32).astype(ml_dtypes.bfloat16)
            want[t] += float(tw[t, j]) * (w2_exact[e] @ a.astype(np.float64) + b2[e])
    assert_close(y, want)
    with pytest.raises(ValueError, match=r"layer 3 has no gpt-oss MoE block.*the layers with one are 7"):
        mm.from_gpt_oss(str(path), 3)

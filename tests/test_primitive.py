"""moe as a JAX primitive: jaxprs, placement-driven lowering, vmap, rank-3 x,
multi-platform export, and the jnp path's grouped-matmul forms (derivatives:
test_autodiff.py)."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mxfp4_moe as mm
from jax_mxfp4_moe.layer import primitive
from jax_mxfp4_moe.numerics import jnp_layer, reference
from jax_mxfp4_moe.runtime import ffi

from accuracy import assert_close
from moe_cases import GPT_OSS_LIKE, make_tokens, make_weights

W = make_weights(GPT_OSS_LIKE, gate_up="interleaved")
BF16_ULP = 2.0 ** -7  # relative spacing of bf16 values


def layer(quant="a16w4", backend="auto", **kw):
    return functools.partial(mm.moe, activation="swiglu_oai", quant=quant, backend=backend, **kw)


def f32(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32))


def test_jaxpr_shows_the_primitive_with_its_spec():
    x, tw, ti = make_tokens(GPT_OSS_LIKE, 5)
    jaxpr = jax.make_jaxpr(layer("a8w4"))(x, W, tw, ti)
    eqns = [e for e in jaxpr.jaxpr.eqns if e.primitive is primitive.moe_p]
    assert len(eqns) == 1
    spec = eqns[0].params["spec"]
    assert (spec.num_experts, spec.top_k, spec.hidden, spec.intermediate) == (8, 4, 256, 256)
    assert spec.quant == "a8w4" and spec.activation == mm.Activation("swiglu_oai")
    assert spec.has_b1 and spec.has_b2 and eqns[0].params["layout"] == "canonical"
    assert eqns[0].outvars[0].aval.shape == x.shape


def _hlo(f, args, platform):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_lowering_follows_the_platform(monkeypatch):
    """cpu lowers the jnp path; cuda and rocm lower their kernels' FFI calls,
    so the backend is chosen where the computation is placed."""
    pytest.importorskip("triton", reason="the [cuda] extra compiles the CUDA kernels")
    pytest.importorskip("flydsl", reason="the [rocm] extra compiles the gfx950 kernels")
    if not ffi.available():
        pytest.skip("launcher extension not built")
    x, tw, ti = make_tokens(GPT_OSS_LIKE, 5)
    args = (x, W, tw, ti)
    assert ffi.TARGET not in _hlo(layer("a4w4"), args, "cpu")
    assert ffi.TARGET in _hlo(layer("a4w4"), args, "cuda")
    assert ffi.TARGET in _hlo(layer("a4w4"), args, "rocm")
    # gfx950 has no a16w4 kernels: the rocm lowering runs jnp and says so once
    monkeypatch.setattr(primitive, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ffi.TARGET not in _hlo(layer("a16w4"), args, "rocm")
    assert any("jnp" in str(w.message) and "a16w4" in str(w.message) for w in caught)


def test_forced_backend_on_the_wrong_platform_names_both():
    x, tw, ti = make_tokens(GPT_OSS_LIKE, 3)
    with pytest.raises(ValueError, match="backend: 'cuda' runs on cuda devices.*placed on 'cpu'"):
        jax.jit(layer(backend="cuda"))(x, W, tw, ti)
    with pytest.raises(ValueError, match="backend: 'rocm' cannot run this layer"):
        _hlo(layer("a16w4", backend="rocm"), (x, W, tw, ti), "rocm")


def test_backend_jnp_lowers_jnp_everywhere():
    x, tw, ti = make_tokens(GPT_OSS_LIKE, 3)
    for platform in ("cpu", "cuda", "rocm"):
        assert ffi.TARGET not in _hlo(layer("a4w4", backend="jnp"), (x, W, tw, ti), platform)


def test_device_platform_names():
    assert primitive.device_platform(jax.devices("cpu")[0]) == "cpu"


@pytest.mark.parametrize("quant", ["a16w4", "a4w4"])
def test_vmap_one_axis_matches_a_loop(quant):
    B, T = 3, 6
    xs, tws, tis = zip(*(make_tokens(GPT_OSS_LIKE, T, seed=s) for s in range(B)))
    x, tw, ti = jnp.stack(xs), jnp.stack(tws), jnp.stack(tis)
    f = jax.jit(layer(quant))
    batched = jax.jit(jax.vmap(layer(quant), in_axes=(0, None, 0, 0)))(x, W, tw, ti)
    looped = jnp.stack([f(x[b], W, tw[b], ti[b]) for b in range(B)])
    assert batched.shape == (B, T, GPT_OSS_LIKE.H)
    np.testing.assert_allclose(f32(batched), f32(looped), rtol=BF16_ULP, atol=1e-6)
    # an unbatched argument is shared by every batch entry
    shared = jax.vmap(layer(quant), in_axes=(0, None, None, None))(x, W, tw[0], ti[0])
    for b in range(B):
        np.testing.assert_allclose(f32(shared[b]), f32(f(x[b], W, tw[0], ti[0])), rtol=BF16_ULP,
                                   atol=1e-6)


def test_vmap_two_axes_matches_a_loop():
    A, B, T = 2, 3, 4
    toks = [[make_tokens(GPT_OSS_LIKE, T, seed=10 * a + b) for b in range(B)] for a in range(A)]
    x = jnp.stack([jnp.stack([t[0] for t in row]) for row in toks])
    tw = jnp.stack([jnp.stack([t[1] for t in row]) for row in toks])
    ti = jnp.stack([jnp.stack([t[2] for t in row]) for row in toks])
    inner = jax.vmap(layer(), in_axes=(0, None, 0, 0))
    # the outer axis in the middle of tw / ti: every batch axis may sit anywhere
    outer = jax.vmap(inner, in_axes=(0, None, 1, 1))
    y = jax.jit(outer)(x, W, jnp.swapaxes(tw, 0, 1), jnp.swapaxes(ti, 0, 1))
    f = jax.jit(layer())
    for a in range(A):
        for b in range(B):
            np.testing.assert_allclose(f32(y[a, b]), f32(f(x[a, b], W, tw[a, b], ti[a, b])),
                                       rtol=BF16_ULP, atol=1e-6)


def test_vmap_over_a_stack_of_layers_runs_each_layer():
    layers = [make_weights(GPT_OSS_LIKE, gate_up="interleaved", seed=s) for s in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    x, tw, ti = make_tokens(GPT_OSS_LIKE, 5)
    y = jax.jit(jax.vmap(layer(), in_axes=(None, 0, None, None)))(x, stacked, tw, ti)
    f = jax.jit(layer())
    for i, w in enumerate(layers):
        np.testing.assert_array_equal(f32(y[i]), f32(f(x, w, tw, ti)))


def test_rank3_x_is_tokens_over_leading_axes():
    B, S = 2, 5
    x, tw, ti = make_tokens(GPT_OSS_LIKE, B * S)
    y3 = jax.jit(layer("a8w4"))(x.reshape(B, S, -1), W, tw.reshape(B, S, -1), ti.reshape(B, S, -1))
    y2 = jax.jit(layer("a8w4"))(x, W, tw, ti)
    assert y3.shape == (B, S, GPT_OSS_LIKE.H)
    np.testing.assert_array_equal(f32(y3).reshape(B * S, -1), f32(y2))
    assert_close(y3.reshape(B * S, -1), reference.moe(x, W, tw, ti, activation="swiglu_oai",
                                                      quant="a8w4"))
    with pytest.raises(ValueError, match="topk_ids"):
        mm.moe(x.reshape(B, S, -1), W, tw, ti)


def test_multi_platform_export_round_trip():
    """One artifact for cpu, cuda and rocm, exported on this CPU machine; its
    CPU variant runs and gives the jit result."""
    pytest.importorskip("triton", reason="the [cuda] extra compiles the CUDA kernels")
    pytest.importorskip("flydsl", reason="the [rocm] extra compiles the gfx950 kernels")
    pytest.importorskip("flatbuffers", reason="jax.export serialisation needs flatbuffers")
    if not ffi.available():
        pytest.skip("launcher extension not built")
    x, tw, ti = make_tokens(GPT_OSS_LIKE, 7)
    f = jax.jit(layer("a4w4"))
    exp = jax.export.export(f, platforms=("cpu", "cuda", "rocm"),
                            disabled_checks=ffi.export_disabled_checks())(x, W, tw, ti)
    assert exp.platforms == ("cpu", "cuda", "rocm")
    text = exp.mlir_module()
    assert ffi.TARGET in text  # the GPU variants launch kernels
    restored = jax.export.deserialize(exp.serialize())
    np.testing.assert_array_equal(f32(restored.call(x, W, tw, ti)), f32(f(x, W, tw, ti)))


@pytest.mark.parametrize("T", [1, 9, 64])
def test_cpu_strategies_agree(T):
    """Every grouped-matmul form of the jnp path computes the same layer."""
    w = make_weights(GPT_OSS_LIKE, gate_up="interleaved")
    x, tw, ti = make_tokens(GPT_OSS_LIKE, T)
    ti = ti.at[0, 0].set(-1)  # an entry routed nowhere
    spec = mm.LayerSpec(8, 4, 256, 256, mm.Activation("swiglu_oai"), "interleaved", "a8w4",
                        has_b1=True, has_b2=True)
    ref = reference.moe(x, w, tw, ti, activation="swiglu_oai", quant="a8w4")
    outs = {}
    for strategy, bm in (("blocks", 1), ("blocks", 4), ("blocks", 32), ("dense", 0), ("ragged", 1)):
        y = jax.jit(functools.partial(jnp_layer.moe, spec=spec, strategy=strategy, block_m=bm))(
            x, w, tw, ti)
        assert_close(y, ref)
        outs[(strategy, bm)] = f32(y)
    first = next(iter(outs.values()))
    for y in outs.values():
        np.testing.assert_allclose(y, first, rtol=BF16_ULP, atol=1e-6)


def test_cpu_strategy_choice_follows_the_cost_model():
    # decode: one block per routed entry; prefill: blocks of many rows
    assert jnp_layer.choose_strategy(1, 4, 32) == ("blocks", 1)
    strategy, bm = jnp_layer.choose_strategy(4096, 4, 32)
    assert strategy == "blocks" and bm >= 64
    assert jnp_layer.choose_strategy(64, 4, 32, platform="cuda") == ("ragged", 1)

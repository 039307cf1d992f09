"""Every misuse of moe() fails at trace time with an error naming the argument."""

import jax
import jax.numpy as jnp
import pytest

import jax_mxfp4_moe as mm

from moe_cases import GPT_OSS_LIKE, make_tokens, make_weights

W = make_weights(GPT_OSS_LIKE)
X, TW, TI = make_tokens(GPT_OSS_LIKE, 4)


def call(**kw):
    args = dict(x=X, weights=W, topk_weights=TW, topk_ids=TI)
    args.update(kw)
    opts = {k: args.pop(k) for k in list(args) if k not in ("x", "weights", "topk_weights", "topk_ids")}
    return jax.jit(lambda x, w, tw, ti: mm.moe(x, w, tw, ti, backend="jnp", **opts))(
        args["x"], args["weights"], args["topk_weights"], args["topk_ids"])


@pytest.mark.parametrize("kw, err, match", [
    (dict(x=X[0]), ValueError, "x: expected"),
    (dict(x=X[None]), ValueError, "topk_ids: expected \\[1, 4, k\\]"),  # rank 3 needs [1, T, k] routing
    (dict(x=X.astype(jnp.int32)), TypeError, "x: expected dtype"),
    (dict(x=jnp.zeros((4, 128), jnp.bfloat16)), ValueError, "x: hidden size"),
    (dict(topk_ids=TI[:3]), ValueError, "topk_ids"),
    (dict(topk_ids=TI.astype(jnp.float32)), TypeError, "topk_ids: expected an integer"),
    (dict(topk_weights=TW[:, :2]), ValueError, "topk_weights"),
    (dict(topk_weights=TI), TypeError, "topk_weights: expected a float"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(quant="a4w8"), ValueError, "quant"),
    (dict(expert_mask=jnp.ones(3, bool)), ValueError, "expert_mask"),
    (dict(expert_mask=jnp.ones(8, jnp.float32)), TypeError, "expert_mask"),
])
def test_bad_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        call(**kw)


def test_unknown_backend_and_weights_type():
    with pytest.raises(ValueError, match="backend"):
        mm.moe(X, W, TW, TI, backend="cuda-magic")
    with pytest.raises(TypeError, match="weights"):
        mm.moe(X, {"w1": 1}, TW, TI)


def test_kernel_backend_without_its_gpu():
    for name in ("cuda", "rocm"):
        with pytest.raises(ValueError, match=f"backend: '{name}' runs on {name} devices"):
            mm.moe(X, W, TW, TI, backend=name)
    with pytest.raises(ValueError, match="backend: expected one of"):
        mm.moe(X, W, TW, TI, backend="triton")  # the kernel language is not a backend name


def test_too_many_tokens():
    big = jax.ShapeDtypeStruct((1 << 24, 256), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1 << 24, 4), jnp.int32)
    tw = jax.ShapeDtypeStruct((1 << 24, 4), jnp.float32)
    with pytest.raises(ValueError, match="x: at most"):
        jax.eval_shape(lambda x, w, a, b: mm.moe(x, w, a, b), big, W, tw, ids)


def test_weight_shape_and_config_errors():
    import dataclasses
    with pytest.raises(ValueError, match="weights.w2"):
        call(weights=dataclasses.replace(W, w2=W.w2[:, :, :-1]))
    with pytest.raises(TypeError, match="weights.w1_scale"):
        call(weights=dataclasses.replace(W, w1_scale=W.w1_scale.astype(jnp.int32)))
    with pytest.raises(ValueError, match="gate_up"):
        call(weights=dataclasses.replace(W, gate_up="stacked"))
    with pytest.raises(ValueError, match="layout"):
        call(weights=dataclasses.replace(W, layout="nope"))
    with pytest.raises(ValueError, match="multiples of 32"):
        mm.prepare_weights(jnp.ones((2, 64, 48)), jnp.ones((2, 48, 32)))
    with pytest.raises(ValueError, match="w2"):
        mm.prepare_weights(jnp.ones((2, 64, 64)), jnp.ones((2, 64, 64)))
    with pytest.raises(ValueError, match="gate_up"):
        mm.prepare_weights(jnp.ones((2, 64, 64)), jnp.ones((2, 64, 32)), gate_up="x")
    with pytest.raises(ValueError, match="b1"):
        mm.prepare_weights(jnp.ones((2, 64, 64)), jnp.ones((2, 64, 32)), b1=jnp.ones((2, 32)))

"""Derivatives of moe (issue: training through frozen MXFP4 experts).

The layer is exactly differentiable in topk_weights and b2 (check_grads
against finite differences, forward and reverse).  In x and b1 the
quantise-dequantise steps (bf16 rounding in a16w4, MX in a8w4/a4w4) are
piecewise constant, so there the derivative is the straight-through one,
held against an independent float64 NumPy statement of it (below), forward
(jvp) and reverse (vjp, and <vjp(ct), v> = <ct, jvp(v)>).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_mxfp4_moe as mm
from jax_mxfp4_moe.numerics import reference

from moe_cases import GPT_OSS_LIKE, ODD_K, make_tokens, make_weights


# ---------------------------------------------------------------------------
# The straight-through derivative in float64 NumPy, from the reference's math
# ---------------------------------------------------------------------------


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _gate_up(gate_up, I):
    return ((slice(0, I), slice(I, None)) if gate_up == "separated"
            else (slice(0, None, 2), slice(1, None, 2)))


def _act_partials(h, activation, gate_up):
    """act(h) and its partial derivatives in gate and up (elementwise)."""
    sg, su = _gate_up(gate_up, h.shape[-1] // 2)
    g, u = h[sg], h[su]
    if activation.name == "silu":
        s = _sigmoid(g)
        return g * s * u, (s + g * s * (1 - s)) * u, g * s
    alpha, limit = activation.param("alpha"), activation.param("limit")
    live_g, live_u = g < limit, np.abs(u) < limit
    g, u = np.minimum(g, limit), np.clip(u, -limit, limit)
    s = _sigmoid(alpha * g)
    return (g * s * (u + 1), np.where(live_g, (s + alpha * g * s * (1 - s)) * (u + 1), 0.0),
            np.where(live_u, g * s, 0.0))


def _act_and_jvp(h, dh, activation, gate_up):
    sg, su = _gate_up(gate_up, h.shape[-1] // 2)
    a, pg, pu = _act_partials(h, activation, gate_up)
    return a, pg * dh[sg] + pu * dh[su]


def ste_jvp_np(x, w, tw, ids, dx, dtw, db1, db2, *, activation, quant):
    """(y, dy) in float64: quantise-dequantise is the identity for tangents."""
    activation = mm.Activation(activation) if isinstance(activation, str) else activation
    x = np.asarray(np.asarray(x, np.float32), np.float64)
    dx = np.asarray(dx, np.float64)
    tw, dtw = np.asarray(tw, np.float64), np.asarray(dtw, np.float64)
    ids = np.asarray(ids)
    T, H = x.shape
    y, dy = np.zeros((T, H)), np.zeros((T, H))
    b1 = np.asarray(w.b1, np.float64) if w.b1 is not None else None
    b2 = np.asarray(w.b2, np.float64) if w.b2 is not None else None
    for t in range(T):
        xq = reference.quantize_dequantize(x[t], quant)
        for j, e in enumerate(ids[t]):
            if not 0 <= e < w.num_experts:
                continue
            w1 = mm.dequantize_mxfp4_np(np.asarray(w.w1[e]), np.asarray(w.w1_scale[e]), np.float64)
            w2 = mm.dequantize_mxfp4_np(np.asarray(w.w2[e]), np.asarray(w.w2_scale[e]), np.float64)
            h = w1 @ xq + (b1[e] if b1 is not None else 0)
            dh = w1 @ dx[t] + (db1[e] if db1 is not None else 0)
            a, da = _act_and_jvp(h, dh, activation, w.gate_up)
            o = w2 @ reference.quantize_dequantize(a, quant) + (b2[e] if b2 is not None else 0)
            do = w2 @ da + (db2[e] if db2 is not None else 0)
            y[t] += tw[t, j] * o
            dy[t] += tw[t, j] * do + dtw[t, j] * o
    return y, dy


def ste_vjp_np(x, w, tw, ids, ct, *, activation, quant):
    """(dx, dtw, db1, db2) = J^T ct of the straight-through derivative, float64."""
    activation = mm.Activation(activation) if isinstance(activation, str) else activation
    x = np.asarray(np.asarray(x, np.float32), np.float64)
    ct, tw, ids = np.asarray(ct, np.float64), np.asarray(tw, np.float64), np.asarray(ids)
    E, (T, H) = w.num_experts, x.shape
    dx, dtw = np.zeros_like(x), np.zeros_like(tw)
    db1, db2 = np.zeros((E, 2 * w.intermediate)), np.zeros((E, H))
    b1 = np.asarray(w.b1, np.float64) if w.b1 is not None else 0 * db1
    b2 = np.asarray(w.b2, np.float64) if w.b2 is not None else 0 * db2
    sg, su = _gate_up(w.gate_up, w.intermediate)
    for t in range(T):
        xq = reference.quantize_dequantize(x[t], quant)
        for j, e in enumerate(ids[t]):
            if not 0 <= e < E:
                continue
            w1 = mm.dequantize_mxfp4_np(np.asarray(w.w1[e]), np.asarray(w.w1_scale[e]), np.float64)
            w2 = mm.dequantize_mxfp4_np(np.asarray(w.w2[e]), np.asarray(w.w2_scale[e]), np.float64)
            h = w1 @ xq + b1[e]
            a, pg, pu = _act_partials(h, activation, w.gate_up)
            o = w2 @ reference.quantize_dequantize(a, quant) + b2[e]
            dtw[t, j] += ct[t] @ o
            do = tw[t, j] * ct[t]
            db2[e] += do
            da = w2.T @ do
            dh = np.zeros_like(h)
            dh[sg], dh[su] = da * pg, da * pu
            db1[e] += dh
            dx[t] += w1.T @ dh
    return dx, dtw, db1, db2


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


# Every mode with both activations (and gate/up placements); the sm90 layout
# once (gmm_p unpacks one matrix at a time from it).
CASES = [(quant, act, gate_up, "canonical") for quant in ("a16w4", "a8w4", "a4w4")
         for act, gate_up in (("silu", "separated"), ("swiglu_oai", "interleaved"))]
CASES.append(("a4w4", "swiglu_oai", "interleaved", "sm90"))


def _problem(act, gate_up, layout, T=5, seed=0):
    w = make_weights(GPT_OSS_LIKE, gate_up=gate_up, bias=True, seed=seed, layout=layout)
    x, tw, ids = make_tokens(GPT_OSS_LIKE, T, seed=seed + 1, dtype=jnp.float32)
    if act == "swiglu_oai":
        x = x * 3.0  # large pre-activations: the clamp at 7 is active on some entries
    ids = ids.at[0, 1].set(-1).at[2, 0].set(GPT_OSS_LIKE.E + 3)  # ids that route nowhere
    return w, x, tw, ids


def _layer(w, ids, act, quant):
    def f(x, tw, b1, b2):
        ww = dataclasses.replace(w, b1=b1, b2=b2)
        return mm.moe(x, ww, tw, ids, activation=act, quant=quant)
    return f


@pytest.mark.parametrize("quant,act,gate_up,layout", CASES)
def test_jvp_and_vjp_are_the_straight_through_derivative(quant, act, gate_up, layout):
    w, x, tw, ids = _problem(act, gate_up, layout)
    rng = np.random.default_rng(3)
    tang = [jnp.asarray(rng.standard_normal(np.shape(a)), jnp.float32) for a in (x, tw, w.b1, w.b2)]
    f = jax.jit(_layer(w, ids, act, quant))
    args = (x, tw, w.b1, w.b2)
    y, dy = jax.jit(functools.partial(jax.jvp, f))(args, tuple(tang))
    wc = w.canonical()
    ry, rdy = ste_jvp_np(x, wc, tw, ids, *tang, activation=act, quant=quant)
    assert _rel(y, ry) < 1e-2  # the forward under differentiation is the layer
    assert _rel(dy, rdy) < 1e-2, _rel(dy, rdy)
    # reverse: the transpose of that jvp, <ct, J v> = <J^T ct, v>
    # (half along J v, so that <ct, J v> is not a cancelling sum)
    noise = rng.standard_normal(np.shape(y))
    ct = jnp.asarray(noise + np.asarray(dy) * np.linalg.norm(noise) / np.linalg.norm(dy),
                     jnp.float32)
    _, pullback = jax.vjp(f, *args)
    grads = pullback(ct)
    lhs = float(jnp.vdot(ct, dy))
    rhs = sum(float(jnp.vdot(g, v)) for g, v in zip(grads, tang))
    # gmm_p's operands are bf16 (exact for the weights, not for tangents and
    # cotangents), so J and J^T agree to bf16's unit roundoff (2^-8) on the
    # scale of the product |ct| |J v|; with ct half along J v that scale is
    # ~1.4 |lhs|, so a wrong transpose, off by O(|lhs|), cannot pass.
    scale = float(jnp.linalg.norm(ct) * jnp.linalg.norm(dy))
    assert abs(lhs - rhs) <= 2.0**-8 * scale, (lhs, rhs, scale)
    # and each gradient against NumPy's J^T ct of the STE definition
    for name, g, want in zip(("x", "topk_weights", "b1", "b2"), grads,
                             ste_vjp_np(x, wc, tw, ids, ct, activation=act, quant=quant)):
        assert _rel(g, want) < 1e-2, (name, _rel(g, want))


@pytest.mark.parametrize("quant", ["a16w4", "a8w4", "a4w4"])
def test_check_grads_where_the_layer_is_smooth(quant):
    """y is linear in topk_weights and in b2 (after the last rounding):
    finite differences agree, forward and reverse."""
    w, x, tw, ids = _problem("swiglu_oai", "interleaved", "canonical", T=5)
    f = _layer(w, ids, "swiglu_oai", quant)
    check_grads(lambda tw, b2: f(x, tw, w.b1, b2), (tw, w.b2), order=1, modes=("fwd", "rev"),
                atol=2e-2, rtol=2e-2, eps=1e-2)


def test_odd_k_expert_mask_and_deterministic():
    w = make_weights(ODD_K, bias=True)
    x, tw, ids = make_tokens(ODD_K, 9, dtype=jnp.float32)
    keep = np.array([True, False, True, True])
    local = mm.from_mxfp4(w.w1[keep], w.w1_scale[keep], w.w2[keep], w.w2_scale[keep], w.b1[keep],
                          w.b2[keep])

    def f(x, tw):
        return mm.moe(x, local, tw, ids, expert_mask=jnp.asarray(keep), deterministic=True)

    rng = np.random.default_rng(0)
    dx = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    dtw = jnp.asarray(rng.standard_normal(tw.shape), jnp.float32)
    _, dy = jax.jvp(f, (x, tw), (dx, dtw))
    masked = jnp.where(jnp.isin(ids, jnp.array([1])), -1, ids)  # expert 1 lives elsewhere
    _, rdy = ste_jvp_np(x, w, tw, masked, dx, dtw, None, None, activation="silu", quant="a16w4")
    assert _rel(dy, rdy) < 1e-2


def test_grad_of_a_router_through_the_layer_and_vmap_of_grad():
    w, x, _, _ = _problem("silu", "separated", "canonical", T=6)
    router = jnp.asarray(np.random.default_rng(0).standard_normal((GPT_OSS_LIKE.H, GPT_OSS_LIKE.E)) * 0.1,
                         jnp.float32)

    def loss(router, x):
        tw, ids = mm.topk_softmax(x @ router, GPT_OSS_LIKE.k)
        return jnp.mean(mm.moe(x, w, tw, ids, quant="a8w4") ** 2)

    g = jax.jit(jax.grad(loss))(router, x)
    assert g.shape == router.shape and np.isfinite(np.asarray(g)).all() and np.abs(g).max() > 0
    xs = jnp.stack([x, x * 0.5, -x])
    gs = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(router, xs)
    for i in range(3):
        np.testing.assert_allclose(gs[i], jax.grad(loss)(router, xs[i]), rtol=2e-2, atol=1e-6)


def test_frozen_experts_get_no_gradient():
    w, x, tw, ids = _problem("silu", "separated", "canonical", T=4)
    g = jax.grad(lambda w: jnp.sum(mm.moe(x, w, tw, ids)), allow_int=True)(w)
    for name in ("w1", "w1_scale", "w2", "w2_scale"):
        assert getattr(g, name).dtype == jax.dtypes.float0  # integer data: no tangent space
    assert np.abs(g.b1).max() > 0 and np.abs(g.b2).max() > 0
    with pytest.raises(TypeError, match="uint8"):  # jax.grad itself names the integer inputs
        jax.grad(lambda w: jnp.sum(mm.moe(x, w, tw, ids)))(w)


def test_linearize_and_jvp_of_zero_tangents():
    w, x, tw, ids = _problem("silu", "separated", "canonical", T=3)
    f = _layer(w, ids, "silu", "a4w4")
    y, lin = jax.linearize(lambda x: f(x, tw, w.b1, w.b2), x)
    assert lin(jnp.zeros_like(x)).shape == y.shape and not np.asarray(lin(jnp.zeros_like(x))).any()
    _, dy = jax.jvp(lambda tw: f(x, tw, w.b1, w.b2), (tw,), (jnp.zeros_like(tw),))
    assert not np.asarray(dy).any()


@pytest.mark.parametrize("which", ["w1", "w2"])
def test_grouped_matmul_forms_and_transpose(which):
    """gmm_p: the CPU form (gathered blocks) and the accelerators' (ragged_dot)
    agree with a float64 dequantised product, blocks of expert -1 give zeros,
    and the transpose rule is the adjoint: <gmm(a), b> = <a, gmm^T(b)>."""
    from jax_mxfp4_moe.layer import autodiff

    w = make_weights(GPT_OSS_LIKE, seed=4)
    dims = dict(num_experts=8, hidden=256, intermediate=256)
    n, k = autodiff.matrix_shape(which, tuple(dims.items()))
    bm = 16
    be = jnp.asarray([1, 1, 2, 4, 4, 4, 7, -1, -1], jnp.int32)
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.standard_normal((len(be) * bm, k)), jnp.bfloat16).astype(jnp.float32)
    b = jnp.asarray(rng.standard_normal((len(be) * bm, n)), jnp.bfloat16).astype(jnp.float32)
    wm, sm = getattr(w, which), getattr(w, which + "_scale")
    dense = mm.dequantize_mxfp4_np(np.asarray(wm), np.asarray(sm), np.float64)  # [E, n, k]
    want = np.zeros((len(be) * bm, n))
    for blk, e in enumerate(np.asarray(be)):
        if e >= 0:
            want[blk * bm:(blk + 1) * bm] = np.asarray(a, np.float64)[blk * bm:(blk + 1) * bm] @ dense[e].T
    params = dict(which=which, layer_dims=tuple(sorted(dims.items())), layout="canonical", block_m=bm,
                  transpose=False, scale_max=None)
    for platform in ("cpu", "cuda"):
        got = autodiff.gmm_jnp(a, be, wm, sm, platform=platform, **params)
        assert _rel(got, want) < 1e-6
        assert not np.asarray(got)[7 * bm:].any()
    f = lambda a: autodiff.gmm(a, be, wm, sm, which=which, dims=dims, layout="canonical", block_m=bm)
    (at,) = jax.linear_transpose(f, a)(b)
    lhs, rhs = float(jnp.vdot(f(a), b)), float(jnp.vdot(a, at))
    assert abs(lhs - rhs) <= 1e-4 * abs(lhs)

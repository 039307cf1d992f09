"""Routing helpers against plain NumPy loops."""

import numpy as np
import jax.numpy as jnp
import pytest

from jax_mxfp4_moe.layer import routing


def _softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def _topk(v, k):
    return list(np.argsort(-v, kind="stable")[:k])


@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_topk(renormalize):
    logits = np.random.default_rng(0).standard_normal((9, 16)).astype(np.float32)
    w, ids = routing.softmax_topk(jnp.asarray(logits), 4, renormalize=renormalize)
    for t in range(9):
        p = _softmax(logits[t].astype(np.float64))
        top = _topk(p, 4)
        want = p[top] / (p[top].sum() if renormalize else 1.0)
        assert list(np.asarray(ids[t])) == top
        np.testing.assert_allclose(np.asarray(w[t]), want, rtol=1e-5)


def test_topk_softmax():
    logits = np.random.default_rng(1).standard_normal((7, 32)).astype(np.float32)
    w, ids = routing.topk_softmax(jnp.asarray(logits), 4)
    for t in range(7):
        top = _topk(logits[t], 4)
        assert list(np.asarray(ids[t])) == top
        np.testing.assert_allclose(np.asarray(w[t]), _softmax(logits[t][top].astype(np.float64)), rtol=1e-5)
    assert ids.dtype == jnp.int32


def test_sigmoid_group_topk_deepseek():
    rng = np.random.default_rng(2)
    T, E, G, TG, k, scale = 6, 32, 8, 3, 6, 2.5
    logits = rng.standard_normal((T, E)).astype(np.float32)
    bias = rng.standard_normal(E).astype(np.float32) * 0.5
    w, ids = routing.sigmoid_group_topk(jnp.asarray(logits), k, bias=jnp.asarray(bias), num_groups=G,
                                        topk_groups=TG, routed_scaling_factor=scale)
    for t in range(T):
        s = 1 / (1 + np.exp(-logits[t].astype(np.float64)))
        c = s + bias
        gscore = [sorted(c[g * 4:(g + 1) * 4])[-2:] for g in range(G)]
        groups = _topk(np.array([sum(x) for x in gscore]), TG)
        allowed = np.full(E, -np.inf)
        for g in groups:
            allowed[g * 4:(g + 1) * 4] = c[g * 4:(g + 1) * 4]
        top = _topk(allowed, k)
        assert sorted(np.asarray(ids[t]).tolist()) == sorted(top)
        want = s[top] / s[top].sum() * scale
        got = dict(zip(np.asarray(ids[t]).tolist(), np.asarray(w[t]).tolist()))
        np.testing.assert_allclose([got[e] for e in top], want, rtol=1e-5)


def test_routing_errors():
    with pytest.raises(ValueError, match="k"):
        routing.softmax_topk(jnp.zeros((2, 4)), 5)
    with pytest.raises(ValueError, match="num_groups"):
        routing.sigmoid_group_topk(jnp.zeros((2, 12)), 2, bias=jnp.zeros(12), num_groups=5, topk_groups=1)
    with pytest.raises(ValueError, match="bias"):
        routing.sigmoid_group_topk(jnp.zeros((2, 12)), 2, bias=jnp.zeros(11), num_groups=4, topk_groups=1)

"""The derivative's grouped matmuls on an H100/H200 (cuda.backend.gmm: the
Gluon wgmma kernels and the Triton ones), against a float64 NumPy oracle
and gmm_jnp, and jax.grad of moe on the GPU against the CPU path's."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mxfp4_moe as mm
from jax_mxfp4_moe.layer import autodiff

import accuracy
import moe_cases

pytestmark = pytest.mark.gpu

cuda = pytest.importorskip("jax_mxfp4_moe.cuda.backend")
from jax_mxfp4_moe.cuda import config as cuda_config  # noqa: E402

# H not a multiple of a 256-column output tile, 2I not of a 256-row one,
# enough row blocks that the persistent CTAs take several units each.
WIDE = moe_cases.Shape("wide", E=8, k=4, H=640, I=448)
GMM_SHAPES = (moe_cases.GPT_OSS_LIKE, moe_cases.ODD_K, WIDE)


@pytest.fixture(scope="module", autouse=True)
def _needs_hopper():
    if not cuda.available():
        pytest.skip("needs a CUDA sm_90 GPU and the built FFI launcher")


def _experts(E, n_blocks, seed):
    """Block experts with some -1 (dead) blocks, one of them first."""
    rng = np.random.default_rng(seed)
    be = rng.integers(-1, E, n_blocks)
    be[0] = -1
    be[-1] = E - 1
    return be.tolist()


def _gmm_on_gpu(w, lhs, be, **params):
    which = params["which"]
    f = jax.jit(lambda a, b, wv, ws: cuda.gmm(a, b, wv, ws, **params))
    return np.asarray(f(jnp.asarray(lhs), jnp.asarray(be), getattr(w, which),
                        getattr(w, which + "_scale")))


@pytest.mark.parametrize("block_m", [16, 32, 64, 128])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("which", ["w1", "w2"])
@pytest.mark.parametrize("layout", ["canonical", "sm90"])
def test_grouped_matmul_matches_float64_and_gmm_jnp(layout, which, transpose, block_m):
    """Both orientations and matrices, both layouts, every block height (sm90
    at 64 and 128 rows: the Gluon kernel), dead blocks (exactly 0), odd K and
    N; with the 2**126 of the upcast folded into the scales or not (the
    same bits)."""
    for s, shape in enumerate(GMM_SHAPES):
        n_blocks = max(3, 5120 // block_m) if shape is WIDE else 5
        w, lhs, be = moe_cases.gmm_problem(shape, which=which, transpose=transpose,
                                           layout=layout, block_m=block_m,
                                           experts=_experts(shape.E, n_blocks, s), seed=s)
        params = moe_cases.gmm_params(w, which=which, transpose=transpose, block_m=block_m)
        got = _gmm_on_gpu(w, lhs, be, **params)
        want = moe_cases.gmm_oracle(w, which, lhs, be, block_m, transpose)
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.all(got[np.repeat(be < 0, block_m)] == 0), shape.name
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < 1e-5, (shape.name, err)
        if shape is moe_cases.GPT_OSS_LIKE:  # and the jnp lowering of gmm_p
            jnp_out = np.asarray(jax.jit(lambda a, b, wv, ws: autodiff.gmm_jnp(
                a, b, wv, ws, **params))(jnp.asarray(lhs), jnp.asarray(be), getattr(w, which),
                                         getattr(w, which + "_scale")))
            assert np.linalg.norm(got - jnp_out) / np.linalg.norm(jnp_out) < 1e-5
        if shape is moe_cases.ODD_K:
            unfolded = _gmm_on_gpu(w, lhs, be, **dict(params, scale_max=None))
            np.testing.assert_array_equal(unfolded, got)


@pytest.mark.parametrize("transpose", [False, True])
def test_grouped_matmul_with_no_live_block_and_repeated_calls(transpose):
    """Every block dead: all zeros (the Gluon kernel runs no unit at all);
    the same call twice gives the same bits."""
    shape = WIDE
    for be in ([-1] * 7, _experts(shape.E, 40, 9)):
        w, lhs, be = moe_cases.gmm_problem(shape, which="w1", transpose=transpose, layout="sm90",
                                           block_m=128, experts=be)
        params = moe_cases.gmm_params(w, which="w1", transpose=transpose, block_m=128)
        assert cuda_config.gmm_config(128, transpose=transpose, layout="sm90").wgmma is not None
        a = _gmm_on_gpu(w, lhs, be, **params)
        np.testing.assert_array_equal(_gmm_on_gpu(w, lhs, be, **params), a)
        if np.all(be < 0):
            assert not np.any(a)


# ---------------------------------------------------------------------------
# jax.grad of the layer on the GPU against the CPU path
# ---------------------------------------------------------------------------

GRAD_CASES = {
    # rows per expert -> autodiff.grad_block_m: 150 -> 128 (sm90: Gluon), 10 -> 16
    # (Triton), ODD_K 50 -> 64 (sm90: Gluon, one consumer warpgroup)
    "sm90 T=300 swiglu interleaved a16w4": ("sm90", 300, moe_cases.GPT_OSS_LIKE, "swiglu_oai",
                                           "interleaved", "a16w4"),
    "canonical T=300 swiglu interleaved a8w4": ("canonical", 300, moe_cases.GPT_OSS_LIKE,
                                               "swiglu_oai", "interleaved", "a8w4"),
    "sm90 T=20 silu separated a16w4": ("sm90", 20, moe_cases.GPT_OSS_LIKE, "silu", "separated",
                                      "a16w4"),
    "sm90 odd K T=100 silu separated a4w4": ("sm90", 100, moe_cases.ODD_K, "silu", "separated",
                                             "a4w4"),
    "sm90 wide T=1024 swiglu separated a16w4": ("sm90", 1024, WIDE, "swiglu_oai", "separated",
                                               "a16w4"),
}


def _grad_fn(shape, ids, act, quant):
    def loss(x, tw, b1, b2, w, ct):
        y = mm.moe(x, dataclasses.replace(w, b1=b1, b2=b2), tw, ids, activation=act, quant=quant)
        return jnp.sum(y.astype(jnp.float32) * ct)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_grad_on_gpu_matches_the_cpu_path(name):
    """Gradients in x, topk_weights, b1 and b2 (ids out of range on some
    slots, the swiglu clamp active on some entries) within the forward's
    tolerances of the CPU path's (jnp)."""
    layout, T, shape, act, gate_up, quant = GRAD_CASES[name]
    w = moe_cases.make_weights(shape, gate_up=gate_up, bias=True, layout=layout)
    x, tw, ids = moe_cases.make_tokens(shape, T, seed=T, dtype=jnp.float32)
    x = x * 2.0
    ids = ids.at[0, 1].set(-1).at[T // 2, 0].set(shape.E + 3)
    ct = jnp.asarray(np.random.default_rng(T).standard_normal((T, shape.H)), jnp.float32)
    bm = autodiff.grad_block_m(T, shape.k, shape.E)
    wgmma = cuda_config.gmm_config(bm, transpose=True, layout=layout).wgmma is not None
    assert wgmma == (layout == "sm90" and bm >= 64), name
    args = (x, tw, w.b1, w.b2, w, ct)
    gpu = _grad_fn(shape, ids, act, quant)(*args)
    cpu_dev = jax.devices("cpu")[0]
    cpu = _grad_fn(shape, jax.device_put(ids, cpu_dev), act, quant)(*jax.device_put(args, cpu_dev))
    for arg, g, c in zip(("x", "topk_weights", "b1", "b2"), gpu, cpu):
        assert g.shape == c.shape, arg
        accuracy.assert_close(np.asarray(g), np.asarray(c, np.float64))


def test_vmap_of_grad_on_gpu():
    """vmap over two token batches of the gradient in x (gmm_p's batching
    folds the batch into its row blocks) equals each batch's own."""
    shape = moe_cases.GPT_OSS_LIKE
    w = moe_cases.make_weights(shape, gate_up="interleaved", bias=True, layout="sm90")
    T = 300
    x0, tw, ids = moe_cases.make_tokens(shape, T, seed=1, dtype=jnp.float32)
    x1 = jnp.flip(x0, 0)
    gx = jax.grad(lambda x: jnp.sum(mm.moe(x, w, tw, ids, activation="swiglu_oai") ** 2))
    batched = jax.jit(jax.vmap(gx))(jnp.stack([x0, x1]))
    for i, x in enumerate((x0, x1)):
        accuracy.assert_close(np.asarray(batched[i]), np.asarray(jax.jit(gx)(x), np.float64))

"""The CUDA backend on an H100/H200: Triton kernels launched by ffi.launch,
compared with independent oracles (the NumPy reference, formats' NumPy
quantisers, the jnp sort contract)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mxfp4_moe.numerics import formats, reference, sorting
from jax_mxfp4_moe.tools.bench import PRESETS, random_weights
from jax_mxfp4_moe.layer.weights import MoEWeights

import accuracy
import moe_cases

pytestmark = pytest.mark.gpu

cuda = pytest.importorskip("jax_mxfp4_moe.cuda.backend")
from jax_mxfp4_moe.cuda import config as cuda_config  # noqa: E402

QUANTS = ("a16w4", "a8w4", "a4w4")
ACTS = ("silu", "swiglu_oai")


@pytest.fixture(scope="module", autouse=True)
def _needs_hopper():
    if not cuda.available():
        pytest.skip("needs a CUDA sm_90 GPU and the built FFI launcher")


def run(x, w, tw, ids, **kw):
    f = jax.jit(lambda w, x, tw, ids: moe_cases.backend_moe(cuda, x, w, tw, ids, **kw))  # weights as arguments
    return np.asarray(f(w, x, tw, ids).astype(jnp.float32))


# ---------------------------------------------------------------------------
# Kernels one by one
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_quantize_kernel_bit_exact(fmt):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((37, 512)) * np.exp(rng.uniform(-20, 20, (37, 1)))).astype(np.float32)
    x[5, :32] = 0.0                     # an all-zero block
    x[6, 40] = np.inf                   # Inf -> NaN scale
    x[7, 70] = np.nan                   # NaN -> NaN scale
    x[8, 3] = 1e-40                     # denormal input
    q, s = jax.jit(lambda v: cuda.quantize(v, fmt))(jnp.asarray(x))
    rq, rs = (formats.quantize_mxfp4_np if fmt == "mxfp4" else formats.quantize_mxfp8_np)(x)
    np.testing.assert_array_equal(np.asarray(s), rs)
    finite = np.setdiff1d(np.arange(37), [6, 7])  # elements of NaN-scale blocks carry no value
    np.testing.assert_array_equal(np.asarray(q)[finite], rq[finite])


def _sort_both(ids, tw, E, BM, mask=None):
    m = None if mask is None else jnp.asarray(mask)
    got = jax.jit(lambda i, w: cuda.sort(i, w, num_experts=E, block_m=BM, expert_mask=m))(
        jnp.asarray(ids), jnp.asarray(tw))
    want = sorting.moe_sort(jnp.asarray(ids), jnp.asarray(tw), num_experts=E, block_m=BM,
                            expert_mask=m)
    return [np.asarray(a) for a in got], [np.asarray(a) for a in want]


@pytest.mark.parametrize("T,k,E,BM", [(1, 4, 128, 16), (7, 8, 256, 16), (64, 4, 32, 64),
                                      (1000, 8, 256, 128), (3000, 8, 64, 32), (16384, 8, 256, 128)])
def test_sort_kernel_matches_contract(T, k, E, BM):
    rng = np.random.default_rng(T)
    ids = rng.integers(-3, E + 3, (T, k)).astype(np.int32)  # some out of range
    tw = rng.random((T, k)).astype(np.float32)
    got, want = _sort_both(ids, tw, E, BM)
    for name, g, w in zip(sorting.SortResult._fields, got, want):
        np.testing.assert_array_equal(g, w, err_msg=name)


@pytest.mark.parametrize("T", [5, 3000])
def test_sort_kernel_all_to_one_expert_and_mask(T):
    rng = np.random.default_rng(1)
    ids = np.full((T, 4), 3, np.int32)
    got, want = _sort_both(ids, rng.random((T, 4)).astype(np.float32), 8, 16)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    mask = (rng.random(64) < 0.5).astype(np.int32)
    ids = rng.integers(0, 64, (T, 4)).astype(np.int32)
    got, want = _sort_both(ids, rng.random((T, 4)).astype(np.float32), 64, 32, mask)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------------
# The whole layer, small shapes: every mode x gate/up layout x activation x
# bias, with weights in the canonical and the sm90 layout
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 7, 64, 257])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gate_up", ["separated", "interleaved"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("quant", QUANTS)
def test_moe_small_matches_reference(quant, activation, gate_up, bias, T):
    """At T=257 (128 rows per expert) sm90 weights take the Gluon wgmma
    kernels, canonical ones the dot_scaled kernels."""
    shape = moe_cases.GPT_OSS_LIKE
    w = moe_cases.make_weights(shape, gate_up=gate_up, bias=bias)
    x, tw, ids = moe_cases.make_tokens(shape, T, seed=T)
    ref = reference.moe(x, w, tw, ids, activation=activation, quant=quant)
    same_kernels = cuda_config.choose_config(T, shape.k, shape.E, shape.H, shape.I,
                                             deterministic=True).prefill is None
    for deterministic in (False, True):
        ys = [run(x, wl, tw, ids, activation=activation, quant=quant, deterministic=deterministic)
              for wl in (w, w.to_layout("sm90"))]
        for y in ys:
            accuracy.assert_close(y, ref)
        if deterministic and same_kernels:  # the layouts differ only in where the kernels
            np.testing.assert_array_equal(ys[0], ys[1])  # find the scales


def _force_prefill(monkeypatch, **prefill):
    """choose_config as the table says, with the Gluon kernels at any T."""
    import dataclasses
    choose = cuda_config.choose_config

    def forced(T, k, E, H, I, **kw):
        c = choose(max(T, 1 << 16), k, E, H, I, **kw)  # the prefill regime's row of the table
        return dataclasses.replace(c, prefill=dataclasses.replace(c.prefill, **prefill))
    monkeypatch.setattr(cuda, "choose_config", forced)


@pytest.mark.parametrize("T", [1, 7, 64, 129])
@pytest.mark.parametrize("quant", QUANTS)
def test_prefill_kernels_at_any_T(monkeypatch, quant, T):
    """The Gluon kernels at T where most 128-row blocks are padding, one
    block, or few units per CTA (the persistent grid's tail), both gate/up
    layouts, deterministic and atomic, and a narrower tile (BN 128, 4-deep
    ring) on odd H and I (K not a multiple of a 128-wide layout tile). An
    all-true expert mask keeps small T on the sorted path (the decode
    kernel routes T * k <= 32 entries itself)."""
    for prefill, shape, gate_up in (({}, moe_cases.GPT_OSS_LIKE, "interleaved"),
                                    ({}, moe_cases.DEEPSEEK_LIKE, "separated"),
                                    (dict(block_n=128, stages=4, w_stages=6),
                                     moe_cases.Shape("odd", E=8, k=4, H=320, I=192), "separated")):
        _force_prefill(monkeypatch, **prefill)
        w = moe_cases.make_weights(shape, gate_up=gate_up, bias=T % 2 == 1, layout="sm90")
        x, tw, ids = moe_cases.make_tokens(shape, T, seed=T)
        ref = reference.moe(x, w.canonical(), tw, ids, activation="swiglu_oai", quant=quant)
        everyone = jnp.ones(shape.E, bool)
        for deterministic in (False, True):
            y = run(x, w, tw, ids, activation="swiglu_oai", quant=quant, deterministic=deterministic,
                    expert_mask=everyone)
            accuracy.assert_close(y, ref)


def test_prefill_kernels_repeatable_and_masked_routings(monkeypatch):
    """Deterministic results are bitwise repeatable; every id out of range
    (no unit at all: y = 0), all tokens on one expert (a long run of full
    blocks), some ids out of range; an expert mask with local weights."""
    shape = moe_cases.DEEPSEEK_LIKE
    w = moe_cases.make_weights(shape, layout="sm90")
    T = 300
    assert cuda_config.choose_config(T, shape.k, shape.E, shape.H, shape.I,
                                     deterministic=True).prefill is not None
    x, tw, ids = moe_cases.make_tokens(shape, T)
    f = jax.jit(lambda x, tw, ids: moe_cases.backend_moe(cuda, x, w, tw, ids, activation="silu",
                                                         quant="a16w4", deterministic=True))
    a = np.asarray(f(x, tw, ids))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(x, tw, ids)), a)
    cases = {
        "all to one expert": jnp.full(ids.shape, 5, jnp.int32),
        "out of range ids": ids.at[:, 1].set(-1).at[:, 2].set(shape.E + 7),
        "no valid id": jnp.full(ids.shape, shape.E, jnp.int32),
    }
    for name, i in cases.items():
        y = run(x, w, tw, i, activation="silu", quant="a8w4")
        ref = reference.moe(x, w.canonical(), tw, i, activation="silu", quant="a8w4")
        if not np.any(ref):
            assert not np.any(y), name
        else:
            accuracy.assert_close(y, ref)
    full = moe_cases.make_weights(shape)
    mask = np.zeros(shape.E, bool)
    mask[[1, 4, 6, 9, 15]] = True
    local = MoEWeights(*(None if a is None else a[mask] for a in
                         (full.w1, full.w1_scale, full.w2, full.w2_scale, full.b1, full.b2)),
                       num_experts=int(mask.sum()), hidden=full.hidden,
                       intermediate=full.intermediate, gate_up=full.gate_up).to_layout("sm90")
    _force_prefill(monkeypatch)
    y = run(x, local, tw, ids, activation="silu", quant="a16w4", expert_mask=jnp.asarray(mask))
    ids_masked = jnp.where(jnp.asarray(mask)[ids], ids, -1)
    accuracy.assert_close(y, reference.moe(x, full, tw, ids_masked, activation="silu",
                                           quant="a16w4"))


@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize("regime", range(len(cuda_config._REGIMES)))
def test_every_config_regime_and_split_k(monkeypatch, regime, split):
    """Each row of the config table at small shapes (where the heuristic would
    pick it for other T), with K split 2 ways and 3 ways (H = 2 K steps: one
    slice is empty), and with x's MX quantisation fused into gemm1's loads."""
    import dataclasses
    _, bm, g1, g2, warps, *_ = cuda_config._REGIMES[regime]
    shape = moe_cases.GPT_OSS_LIKE
    w = moe_cases.make_weights(shape, gate_up="interleaved", bias=True, layout="sm90")
    for fuse in (False, True):
        cfg = cuda_config.MoEConfig(
            bm, dataclasses.replace(g1, split_k=split, fuse_x_quant=fuse),
            dataclasses.replace(g2, split_k=split), warps)
        monkeypatch.setattr(cuda, "choose_config", lambda *a, cfg=cfg, **k: cfg)
        for quant, T in (("a16w4", 7), ("a8w4", 64), ("a4w4", 1)):
            if bm not in sorting.BLOCK_SIZES and T * shape.k > cuda_config.DIRECT_MAX:
                continue  # 8-row blocks exist only where the kernels route themselves
            x, tw, ids = moe_cases.make_tokens(shape, T, seed=T)
            ref = reference.moe(x, w.canonical(), tw, ids, activation="swiglu_oai", quant=quant)
            y = run(x, w, tw, ids, activation="swiglu_oai", quant=quant)
            accuracy.assert_close(y, ref)


@pytest.mark.parametrize("T", [3, 50, 300])  # the one-launch decode kernel, the sorted path,
@pytest.mark.parametrize("shape", [moe_cases.GPT_OSS_LIKE, moe_cases.ODD_K])  # the wgmma kernels
def test_scale_fold_gives_the_same_bits_and_large_scales_stay_exact(shape, T):
    """With every scale byte <= 128 (recorded by from_mxfp4) the upcast's
    2**126 rides on the scales; it gives the bits of the two-multiply upcast
    (weights whose largest byte is unknown). Weights with larger scale bytes
    take the two-multiply path and match the reference."""
    import dataclasses
    from jax_mxfp4_moe.layer.weights import from_mxfp4
    w = moe_cases.make_weights(shape, gate_up="interleaved", layout="sm90")
    assert w.scale_max is not None and w.scale_max <= cuda_config.FOLD_MAX_SCALE_BYTE
    x, tw, ids = moe_cases.make_tokens(shape, T)
    kw = dict(activation="swiglu_oai", quant="a16w4", deterministic=True)
    np.testing.assert_array_equal(run(x, w, tw, ids, **kw),
                                  run(x, dataclasses.replace(w, scale_max=None), tw, ids, **kw))
    c = w.canonical()
    big = from_mxfp4(c.w1, c.w1_scale + 4, c.w2, c.w2_scale + 6, c.b1, c.b2,
                     gate_up=c.gate_up)
    assert big.scale_max > cuda_config.FOLD_MAX_SCALE_BYTE
    ref = reference.moe(x, big, tw, ids, activation="swiglu_oai")
    for wl in (big, big.to_layout("sm90")):
        for deterministic in (False, True):
            y = run(x, wl, tw, ids, activation="swiglu_oai", quant="a16w4",
                    deterministic=deterministic)
            accuracy.assert_close(y, ref)


def test_deterministic_variant_is_bitwise_repeatable():
    shape = moe_cases.DEEPSEEK_LIKE
    w = moe_cases.make_weights(shape)
    x, tw, ids = moe_cases.make_tokens(shape, 200)
    f = jax.jit(lambda x, tw, ids: moe_cases.backend_moe(cuda, x, w, tw, ids, activation="silu", quant="a16w4",
                                            deterministic=True))
    a = np.asarray(f(x, tw, ids))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(x, tw, ids)), a)


@pytest.mark.parametrize("T", [7, 50])  # the kernels route from topk_ids (7 x 4) or the sort
def test_edge_routings_one_token_one_expert_out_of_range(T):
    shape = moe_cases.GPT_OSS_LIKE
    assert (T * shape.k <= cuda_config.DIRECT_MAX) == (T == 7)
    w = moe_cases.make_weights(shape)
    x, tw, ids = moe_cases.make_tokens(shape, T)
    cases = {
        "all to one expert": jnp.full(ids.shape, 5, jnp.int32),
        "out of range ids": ids.at[:, 1].set(-1).at[:, 2].set(shape.E + 7),
        "no valid id": jnp.full(ids.shape, shape.E, jnp.int32),
    }
    for name, i in cases.items():
        y = run(x, w, tw, i, activation="silu", quant="a16w4")
        ref = reference.moe(x, w, tw, i, activation="silu", quant="a16w4")
        if not np.any(ref):
            assert not np.any(y), name
        else:
            accuracy.assert_close(y, ref)
    y = run(x[:1], w, tw[:1], ids[:1], activation="silu", quant="a8w4")
    accuracy.assert_close(y, reference.moe(x[:1], w, tw[:1], ids[:1], activation="silu", quant="a8w4"))


def test_decode_short_last_k_slice_when_programs_outnumber_the_sms(monkeypatch):
    """moe_decode shortens gemm1's last K slice when its programs outnumber
    what the SMs hold (here: as if the GPU had one SM); same results."""
    import dataclasses
    shape = moe_cases.Shape("long-k", E=8, k=4, H=9 * 128, I=256)
    w = moe_cases.make_weights(shape, gate_up="interleaved", bias=True, layout="sm90")
    _, bm, g1, g2, warps, *_ = cuda_config._REGIMES[0]
    cfg = cuda_config.MoEConfig(bm, dataclasses.replace(g1, split_k=3),
                                 dataclasses.replace(g2, split_k=3), warps)
    monkeypatch.setattr(cuda, "choose_config", lambda *a, **k: cfg)
    monkeypatch.setattr(cuda_config, "NUM_SMS", 1)
    slots = cuda_config.programs_per_sm(cfg.decode_maxnreg, g1.num_warps)
    assert cuda_config.gemm1_slice_steps(9, 3, 8 * 3, slots) == 4  # slices of 4, 4, 1 steps
    for T in (1, 7):
        x, tw, ids = moe_cases.make_tokens(shape, T, seed=T)
        ref = reference.moe(x, w.canonical(), tw, ids, activation="swiglu_oai", quant="a16w4")
        accuracy.assert_close(run(x, w, tw, ids, activation="swiglu_oai", quant="a16w4"), ref)


def test_decode_workspace_is_reused_clean_across_routings():
    """moe_decode's scratch is a launcher workspace that each run must leave
    all zero: one jitted layer (one launch site, one workspace) called with
    routings that leave different counters and sums in use, each checked
    against the reference (a counter or sum left behind would shift the
    next call's roles or values)."""
    shape = moe_cases.GPT_OSS_LIKE
    w = moe_cases.make_weights(shape, gate_up="interleaved")
    T = 5
    assert T * shape.k <= cuda_config.DIRECT_MAX
    f = jax.jit(lambda x, tw, ids: moe_cases.backend_moe(cuda, x, w, tw, ids, activation="swiglu_oai",
                                            quant="a16w4"))
    x, tw, ids = moe_cases.make_tokens(shape, T, seed=1)
    routings = [ids, jnp.full(ids.shape, 3, jnp.int32), ids.at[:, 0].set(-1),
                jnp.full(ids.shape, shape.E, jnp.int32), ids.at[1:].set(ids[0]), ids]
    for r, i in enumerate(routings * 2):
        y = np.asarray(f(x, tw, i).astype(jnp.float32))
        ref = reference.moe(x, w, tw, i, activation="swiglu_oai", quant="a16w4")
        if not np.any(ref):
            assert not np.any(y), r
        else:
            accuracy.assert_close(y, ref)


def test_expert_mask_selects_local_experts():
    shape = moe_cases.GPT_OSS_LIKE
    full = moe_cases.make_weights(shape)
    mask = np.zeros(shape.E, bool)
    mask[[1, 4, 6]] = True
    local = MoEWeights(*(None if a is None else a[mask] for a in
                         (full.w1, full.w1_scale, full.w2, full.w2_scale, full.b1, full.b2)),
                       num_experts=3, hidden=full.hidden, intermediate=full.intermediate,
                       gate_up=full.gate_up)
    x, tw, ids = moe_cases.make_tokens(shape, 40)
    y = run(x, local, tw, ids, activation="silu", quant="a16w4", expert_mask=jnp.asarray(mask))
    ids_masked = jnp.where(jnp.asarray(mask)[ids], ids, -1)
    ref = reference.moe(x, full, tw, ids_masked, activation="silu", quant="a16w4")
    accuracy.assert_close(y, ref)


def test_nan_in_x_propagates_to_its_token_only():
    shape = moe_cases.GPT_OSS_LIKE
    w = moe_cases.make_weights(shape)
    x, tw, ids = moe_cases.make_tokens(shape, 9)
    x = x.at[4, 17].set(jnp.nan)
    for quant in QUANTS:
        y = run(x, w, tw, ids, activation="silu", quant=quant)
        assert np.isnan(y[4]).all(), quant
        rest = np.delete(np.arange(9), 4)
        assert np.isfinite(y[rest]).all(), quant
    # the wgmma kernels (300 tokens: 150 rows per expert), x gathered by the pre-pass
    x, tw, ids = moe_cases.make_tokens(shape, 300)
    x = x.at[4, 17].set(jnp.nan)
    for quant in QUANTS:
        y = run(x, w.to_layout("sm90"), tw, ids, activation="silu", quant=quant)
        assert np.isnan(y[4]).all(), quant
        assert np.isfinite(np.delete(y, 4, axis=0)).all(), quant


def test_repeated_calls_under_one_jit_and_export_round_trip():
    shape = moe_cases.GPT_OSS_LIKE
    w = moe_cases.make_weights(shape, gate_up="interleaved")
    f = jax.jit(lambda x, tw, ids: moe_cases.backend_moe(cuda, x, w, tw, ids, activation="swiglu_oai", quant="a16w4"))
    for seed, T in enumerate((33, 5, 33, 5)):  # new inputs each call: replays of a captured
        x, tw, ids = moe_cases.make_tokens(shape, T, seed=seed)  # graph must see them
        accuracy.assert_close(np.asarray(f(x, tw, ids).astype(jnp.float32)),
                              reference.moe(x, w, tw, ids, activation="swiglu_oai"))
    # The round trip is compared bitwise, so with the slot-ordered reduction
    # (atomics add in no fixed order).
    f = jax.jit(lambda x, tw, ids: moe_cases.backend_moe(cuda, x, w, tw, ids, activation="swiglu_oai", quant="a16w4",
                                            deterministic=True))
    from jax_mxfp4_moe.runtime import ffi
    exp = jax.export.export(f, platforms=["cuda"],
                            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(ffi.TARGET)])
    x, tw, ids = moe_cases.make_tokens(shape, 33, seed=9)
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, tw, ids)]
    exported = exp(*args)
    restored = jax.export.deserialize(exported.serialize())
    y = np.asarray(restored.call(x, tw, ids).astype(jnp.float32))
    np.testing.assert_array_equal(y, np.asarray(f(x, tw, ids).astype(jnp.float32)))


def test_multi_platform_export_runs_its_cuda_variant():
    """One artifact for cpu, cuda and rocm (rocm where FlyDSL is installed to
    compile its kernels): called here, it runs the CUDA kernels (the launch
    target is in its module) and matches the reference."""
    import functools
    import importlib.util

    import jax_mxfp4_moe as mm
    from jax_mxfp4_moe.runtime import ffi

    shape = moe_cases.GPT_OSS_LIKE
    w = moe_cases.make_weights(shape, gate_up="interleaved", layout="sm90")
    x, tw, ids = moe_cases.make_tokens(shape, 21, seed=4)
    f = jax.jit(functools.partial(mm.moe, activation="swiglu_oai", quant="a8w4", deterministic=True))
    platforms = ("cpu", "cuda") + (("rocm",) if importlib.util.find_spec("flydsl") else ())
    exp = jax.export.export(f, platforms=platforms,
                            disabled_checks=ffi.export_disabled_checks())(x, w, tw, ids)
    restored = jax.export.deserialize(exp.serialize())
    y = restored.call(x, w, tw, ids)
    assert ffi.TARGET in exp.mlir_module()
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)),
                                  np.asarray(f(x, w, tw, ids).astype(jnp.float32)))
    accuracy.assert_close(y, reference.moe(x, w.canonical(), tw, ids, activation="swiglu_oai",
                                           quant="a8w4"))


def test_placement_on_the_cpu_of_a_gpu_host_runs_jnp():
    """The backend follows where the computation is placed, not the default backend."""
    import jax_mxfp4_moe as mm
    from jax_mxfp4_moe.runtime import ffi

    shape = moe_cases.GPT_OSS_LIKE
    cpu = jax.devices("cpu")[0]
    w = moe_cases.make_weights(shape, gate_up="interleaved")
    x, tw, ids = moe_cases.make_tokens(shape, 9, seed=5)
    args = jax.device_put((x, w, tw, ids), cpu)
    f = jax.jit(lambda *a: mm.moe(*a, activation="swiglu_oai"))
    assert ffi.TARGET not in f.lower(*args).as_text()
    y = f(*args)
    assert y.devices() == {cpu}
    accuracy.assert_close(y, reference.moe(x, w, tw, ids, activation="swiglu_oai"))
    assert ffi.TARGET in f.lower(x, w, tw, ids).as_text()  # on the GPU: the kernels


def test_gradients_on_the_gpu_match_the_cpu_path():
    """jax.grad of moe in x, topk_weights, b1 and b2 on the GPU against the same
    gradients computed on the CPU (the jnp path), within the forward's bounds."""
    import dataclasses

    import jax_mxfp4_moe as mm

    shape = moe_cases.GPT_OSS_LIKE
    w = moe_cases.make_weights(shape, gate_up="interleaved", layout="sm90")
    x, tw, ids = moe_cases.make_tokens(shape, 37, seed=6, dtype=jnp.float32)
    ct = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), jnp.float32)
    for quant in QUANTS:
        def loss(x, tw, b1, b2, w, ids, ct, quant=quant):
            y = mm.moe(x, dataclasses.replace(w, b1=b1, b2=b2), tw, ids, activation="swiglu_oai",
                       quant=quant)
            return jnp.sum(y * ct)
        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        args = (x, tw, w.b1, w.b2, w, ids, ct)
        on_gpu = g(*args)
        on_cpu = g(*jax.device_put(args, jax.devices("cpu")[0]))
        for a, b in zip(on_gpu, on_cpu):
            accuracy.assert_close(np.asarray(a), np.asarray(b, np.float64))


# ---------------------------------------------------------------------------
# Real model shapes (random weights), checked on sampled tokens
# ---------------------------------------------------------------------------

_PRESET_WEIGHTS = {}


def _preset_weights(name):
    if name not in _PRESET_WEIGHTS:
        _PRESET_WEIGHTS.clear()  # one preset's weights on the GPU at a time
        # the layout the bench (and a user on Hopper) hands to the kernels
        _PRESET_WEIGHTS[name] = random_weights(PRESETS[name], jax.random.key(7)).to_layout("sm90")
    return _PRESET_WEIGHTS[name]


@pytest.mark.parametrize("T", [1, 7, 64, 1000, 4096])
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("preset", ["gpt-oss-120b", "gpt-oss-20b", "deepseek-v3", "qwen3-30b-a3b"])
def test_presets_match_reference_on_sampled_tokens(preset, quant, T):
    p = PRESETS[preset]
    w = _preset_weights(preset)
    rng = np.random.default_rng(T)
    x = jnp.asarray(rng.standard_normal((T, p.hidden)), jnp.bfloat16)
    logits = rng.standard_normal((T, p.num_experts))
    ids = jnp.asarray(np.argsort(-logits, -1)[:, :p.top_k].astype(np.int32))
    tw = jnp.asarray(rng.random((T, p.top_k)).astype(np.float32))
    y = run(x, w, tw, ids, activation=p.activation, quant=quant)
    assert np.isfinite(y).all()
    # The reference dequantises each touched expert in float64: check a few tokens.
    rows = rng.choice(T, size=min(T, 1 if p.hidden * p.intermediate > 1e7 else 2), replace=False)
    ref = reference.moe(np.asarray(x)[rows], w.canonical(), np.asarray(tw)[rows], np.asarray(ids)[rows],
                        activation=p.activation, quant=quant)
    accuracy.assert_close(y[rows], ref)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
@pytest.mark.parametrize("T", [7, 300])
def test_other_input_dtypes(dtype, T):
    """x in f16/f32: the kernels read it in its own dtype (MX modes quantise
    the f32 values, as the reference does)."""
    shape = moe_cases.GPT_OSS_LIKE
    w = moe_cases.make_weights(shape)
    x, tw, ids = moe_cases.make_tokens(shape, T, dtype=dtype)
    for quant in QUANTS:
        ref = reference.moe(x, w, tw, ids, activation="silu", quant=quant)
        for wl in (w, w.to_layout("sm90")):  # at T=300 sm90 weights take the wgmma kernels
            accuracy.assert_close(run(x, wl, tw, ids, activation="silu", quant=quant), ref)
    out = jax.jit(lambda x: moe_cases.backend_moe(cuda, x, w, tw, ids, activation="silu"))(x)
    assert out.dtype == dtype and out.shape == x.shape


def test_public_moe_dispatches_here_on_hopper():
    """backend="auto" placed on this GPU lowers to the CUDA kernels, as
    backend="cuda" does, and both match the reference."""
    from jax_mxfp4_moe.layer import api
    from jax_mxfp4_moe.runtime import ffi
    shape = moe_cases.GPT_OSS_LIKE
    w = moe_cases.make_weights(shape)
    x, tw, ids = moe_cases.make_tokens(shape, 5)
    for backend in ("auto", "cuda"):
        f = jax.jit(lambda w, x, tw, ids, b=backend: api.moe(x, w, tw, ids, backend=b))
        assert ffi.TARGET in f.lower(w, x, tw, ids).as_text(), backend
        y = np.asarray(f(w, x, tw, ids).astype(jnp.float32))
        accuracy.assert_close(y, reference.moe(x, w, tw, ids))


def test_jnp_quantize_dequantize_rounds_on_the_gpu():
    """The jnp activation rounding (the jnp path's, and the straight-through
    primal of the derivative) on the GPU is the reference's bit for bit:
    XLA:GPU's conversion simplifications must not skip the MXFP8 rounding."""
    from jax_mxfp4_moe import spec
    from jax_mxfp4_moe.numerics import jnp_layer
    v = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32) * 3.0
    for quant in ("a8w4", "a4w4"):
        got = jax.jit(lambda v, q=quant: jnp_layer.quantize_dequantize(v, spec.QUANT_MODES[q]))(
            jnp.asarray(v))
        assert list(got.devices())[0].platform == "gpu"
        want = np.stack([reference.quantize_dequantize(row, quant) for row in v])
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=quant)

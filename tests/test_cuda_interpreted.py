"""The CUDA backend end to end on CPU: backends/cuda.py's host code as
written, every kernel launch executed by triton's interpreter
(cuda_interpreted.py), against the NumPy reference. Covers the decode path
without a sort launch (routing, gemm1 zeroing gemm2's accumulator, gemm2's
counted cast), split-K counters, the sorted path, the deterministic variant,
MXFP4 activations and every config regime, on small shapes; and the sort
kernels and the decode gemms' own routing against moe_sort. The GPU tests run
the same on an H100 with the real upcast, and a8w4 too: the interpreter's
float8e4nv conversion does not round ties to even (1.5625 -> 1.625, where
the GPU and formats give 1.5), so MXFP8 is left to them."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("triton", reason="triton not installed")
pytest.importorskip("torch", reason="triton's interpreter runs on torch tensors")

from jax_mxfp4_moe.numerics import reference, sorting  # noqa: E402
from jax_mxfp4_moe.cuda import config as cuda_config  # noqa: E402

import accuracy  # noqa: E402
import moe_cases  # noqa: E402

_BASE = dict(kind="moe", shape="GPT_OSS_LIKE", gate_up="interleaved", bias=True, seed=3,
             dtype="bfloat16", activation="swiglu_oai", quant="a16w4", deterministic=False,
             ids=None, scale_max=None, layout="canonical")
CASES = {
    "decode T=1, split 2": dict(T=1, regime=0, split=2),
    "decode T=7 a4w4 silu separated, split 3": dict(T=7, regime=0, split=3, quant="a4w4",
                                                    activation="silu", gate_up="separated",
                                                    bias=False),
    "decode T=7 deterministic": dict(T=7, regime=0, split=1, deterministic=True),
    "decode T=3 BM 16, scale bytes unknown (2**126 not folded)": dict(
        T=3, regime=1, split=2, scale_max="unknown"),
    "decode K not a multiple of the K step, split 2, sm90 layout": dict(
        T=6, regime=0, split=2, shape="ODD_K", layout="sm90"),
    "decode ids out of range and repeated": dict(T=5, regime=0, split=2,
                                                 ids=[[1, 1, 9, -2], [3, 1, 3, 7], [0, 0, 0, 0],
                                                      [7, 6, 5, 4], [8, 8, 8, 8]]),
    "decode T=5, split 2: the workspace the case before last left": dict(T=5, regime=0,
                                                                          split=2),
    "decode no valid id": dict(T=3, regime=0, split=2, ids=[[8] * 4] * 3),
    "decode f16 in and out": dict(T=3, regime=0, split=1, dtype="float16", quant="a4w4"),
    "sorted T=20 BM 32, split 2, sm90 layout": dict(T=20, regime=2, split=2, quant="a4w4",
                                                    layout="sm90"),
    "sorted T=20 BM 64": dict(T=20, regime=3, split=1, activation="silu"),
    "sorted T=20, K not a multiple of the K step, scale bytes unknown": dict(
        T=20, regime=1, split=2, shape="ODD_K", scale_max="unknown"),
    "prefill tiles T=9, sm90 layout": dict(T=9, regime=len(cuda_config._REGIMES) - 1,
                                           split=1, quant="a4w4", layout="sm90", shape="ODD_K"),
}


# The grouped matmul of the derivative (moe_gmm, the Triton kernel): both
# orientations, both matrices and layouts, blocks of expert -1, odd K and N.
GMMS = {
    "w1 forward canonical BM 16": dict(which="w1", transpose=False, layout="canonical", BM=16,
                                       shape="GPT_OSS_LIKE", experts=[0, -1, 3, 7, 7]),
    "w1 transposed sm90 BM 32": dict(which="w1", transpose=True, layout="sm90", BM=32,
                                     shape="GPT_OSS_LIKE", experts=[5, 2, -1]),
    "w2 forward sm90 BM 64 odd K, scale bytes unknown": dict(
        which="w2", transpose=False, layout="sm90", BM=64, shape="ODD_K", experts=[3, -1, 0],
        scale_max="unknown"),
    "w2 transposed canonical BM 16 odd K": dict(which="w2", transpose=True, layout="canonical",
                                                BM=16, shape="ODD_K", experts=[-1, 2, 2, 1]),
    "w1 transposed canonical BM 128 odd K": dict(which="w1", transpose=True, layout="canonical",
                                                 BM=128, shape="ODD_K", experts=[3, -1]),
    "w2 transposed sm90 BM 16 odd K, scale bytes unknown": dict(
        which="w2", transpose=True, layout="sm90", BM=16, shape="ODD_K", experts=[1, 0, -1, 2],
        scale_max="unknown"),
}

# The sort kernels: one program (T*k <= SORT_ONESHOT_MAX_ENTRIES), and the chunked
# three-launch form past it; out-of-range ids, an expert mask.
SORTS = {
    "sort T=7 k=8 E=64 BM=16": dict(T=7, k=8, E=64, BM=16, mask=False),
    "sort T=300 k=4 E=32 BM=32, mask": dict(T=300, k=4, E=32, BM=32, mask=True),
    "sort chunked T=1100 k=4 E=16 BM=64": dict(T=1100, k=4, E=16, BM=64, mask=False),
}


def _routing_cases():
    rng = np.random.default_rng(0)
    cases = {
        "gpt-oss decode T=1": (rng.permutation(128)[None, :4], 128, 16),
        "deepseek T=4, k=8": (np.stack([rng.permutation(256)[:8] for _ in range(4)]), 256, 16),
        "out of range and masked-out ids": (rng.integers(-3, 11, (7, 4)), 8, 16),
        "all 32 entries to one expert": (np.full((8, 4), 3), 8, 16),
        "duplicates inside tokens": (rng.integers(0, 3, (5, 4)), 4, 16),
        "no valid id": (np.full((6, 4), 8), 8, 16),
        "one expert, BM 32": (np.zeros((8, 4)), 1, 32),
    }
    out = {}
    for name, (ids, E, BM) in cases.items():
        ids = np.asarray(ids, np.int32)
        assert ids.size <= cuda_config.DIRECT_MAX
        tw = rng.random(ids.shape).astype(np.float32)
        out[name] = dict(ids=ids.tolist(), tw=tw.tolist(), E=E, BM=BM,
                         programs=-(-ids.size // BM) + min(E, ids.size))
    return out


ROUTINGS = _routing_cases()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("interp") / "y.npz"
    assert 1100 * 4 > cuda_config.SORT_ONESHOT_MAX_ENTRIES
    cases = [dict(_BASE, **c) for c in CASES.values()] + [
        dict(kind="sort", seed=i, **c) for i, c in enumerate(SORTS.values())] + [
        dict(kind="rows", **c) for c in ROUTINGS.values()] + [
        dict(kind="gmm", seed=i, **c)
        for i, c in enumerate(GMMS.values())]
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__),
                                           os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__),
                                                       "cuda_interpreted.py"), str(path)],
                         input=json.dumps(cases), env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return np.load(path), cases


@pytest.mark.parametrize("i,name", list(enumerate(CASES)))
def test_interpreted_pipeline_matches_reference(outputs, i, name):
    ys, cases = outputs
    c = cases[i]
    shape = getattr(moe_cases, c["shape"])
    w = moe_cases.make_weights(shape, gate_up=c["gate_up"], bias=c["bias"])
    x, tw, ids = moe_cases.make_tokens(shape, c["T"], seed=c["seed"], dtype=getattr(jnp, c["dtype"]))
    if c["ids"] is not None:
        ids = jnp.asarray(c["ids"], jnp.int32)
    ref = reference.moe(x, w, tw, ids, activation=c["activation"], quant=c["quant"])
    y = ys[f"{i}/y"]
    assert str(ys[f"{i}/dtype"]) == c["dtype"], name
    if not np.any(ref):
        assert not np.any(y), name
    else:
        accuracy.assert_close(y, ref)


@pytest.mark.parametrize("j,name", list(enumerate(SORTS)))
def test_interpreted_sort_is_the_contract(outputs, j, name):
    ys, cases = outputs
    i, c = len(CASES) + j, SORTS[name]
    mask = ys[f"{i}/mask"] if c["mask"] else None
    want = sorting.moe_sort(jnp.asarray(ys[f"{i}/ids"]), jnp.asarray(ys[f"{i}/tw"]),
                            num_experts=c["E"], block_m=c["BM"], expert_mask=mask)
    for field, key, w in zip(sorting.SortResult._fields, ("sid", "sw", "sexp", "nv"), want):
        np.testing.assert_array_equal(ys[f"{i}/{key}"], np.asarray(w), err_msg=f"{name}: {field}")


def _contract_blocks(ids, tw, E, BM):
    """expert -> its blocks in order, each a list of (token, slot, weight)."""
    s = sorting.moe_sort(np.asarray(ids), np.asarray(tw), num_experts=E, block_m=BM)
    sid, sw, sexp, nv = (np.asarray(a) for a in s)
    T = len(ids)
    blocks = {}
    for b in range(int(nv[0]) // BM):
        entries = sid[b * BM:(b + 1) * BM]
        tok, slot = sorting.unpack_entry(entries)
        rows = [(int(t), int(k), float(w)) for t, k, w in zip(tok, slot, sw[b * BM:(b + 1) * BM])
                if t < T]
        blocks.setdefault(int(sexp[b]), []).append(rows)
    return blocks, int(nv[0]) // BM


@pytest.mark.parametrize("j,name", list(enumerate(ROUTINGS)))
def test_direct_rows_are_the_sort_contracts_blocks(outputs, j, name):
    """The decode gemms' own routing (moe_gemm.py _direct_rows, no sort
    launch): every program holds one block of the contract (same expert, same
    (token, slot, weight) rows in the same order), and the programs in use are
    exactly the contract's blocks, in some order of experts."""
    ys, _ = outputs
    i, case = len(CASES) + len(SORTS) + j, ROUTINGS[name]
    want, used = _contract_blocks(case["ids"], case["tw"], case["E"], case["BM"])
    T, BM = len(case["ids"]), case["BM"]
    got = {}
    for m, (o, wr) in enumerate(zip(ys[f"{i}/out"].tolist(), ys[f"{i}/w"].tolist())):
        p = dict(rows=o[:BM], tok=o[BM:2 * BM], slot=o[2 * BM:3 * BM], ok=o[3 * BM:4 * BM],
                 expert=o[4 * BM], live=o[4 * BM + 1], w=wr)
        assert p["live"] == used, name
        assert p["rows"] == [m * BM + r for r in range(BM)], name
        if m >= used:
            continue
        rows = []
        for r in range(BM):
            if p["ok"][r]:
                rows.append((p["tok"][r], p["slot"][r], p["w"][r]))
            else:
                assert p["tok"][r] == T, name  # padding rows point past the tokens
        assert rows == sorted(rows) and rows, name  # (token, slot) order, never empty
        got.setdefault(p["expert"], []).append(rows)
    assert got == want, name


@pytest.mark.parametrize("j,name", list(enumerate(GMMS)))
def test_interpreted_grouped_matmul_matches_float64(outputs, j, name):
    """Every output element written (results start as 0xAB bytes), blocks of
    expert -1 exactly 0, the rest the float64 product of the bf16 rows and
    the exact weights up to f32 summation."""
    ys, cases = outputs
    i = len(CASES) + len(SORTS) + len(ROUTINGS) + j
    c = cases[i]
    w, lhs, be = moe_cases.gmm_problem(
        getattr(moe_cases, c["shape"]), which=c["which"], transpose=c["transpose"],
        layout=c["layout"], block_m=c["BM"], experts=c["experts"], seed=c["seed"],
        scale_max=c.get("scale_max") != "unknown")
    want = moe_cases.gmm_oracle(w, c["which"], lhs, be, c["BM"], c["transpose"])
    got = ys[f"{i}/out"]
    assert got.shape == want.shape and got.dtype == np.float32, name
    dead = np.repeat(be < 0, c["BM"])
    assert np.all(got[dead] == 0), name
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 1e-5, (name, err)

"""The decode gemms' own routing (moe_gemm.py _direct_rows, no sort launch),
executed by triton's interpreter on CPU, against the sort contract computed
by sorting.moe_sort: every program must hold one block of the contract (same
expert, same (token, slot, weight) rows in the same order), and the programs
in use must be exactly the contract's blocks, in some order of experts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("triton", reason="triton not installed")
pytest.importorskip("torch", reason="triton's interpreter runs on torch tensors")

from jax_mxfp4_moe import sorting  # noqa: E402
from jax_mxfp4_moe.backends import cuda_kernels  # noqa: E402


def _cases():
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
        assert ids.size <= cuda_kernels.DIRECT_MAX
        tw = rng.random(ids.shape).astype(np.float32)
        out[name] = dict(ids=ids.tolist(), tw=tw.tolist(), E=E, BM=BM,
                         programs=-(-ids.size // BM) + min(E, ids.size))
    return out


def _contract_blocks(ids, tw, E, BM):
    """expert -> its blocks in order, each a list of (token, slot, weight)."""
    s = sorting.moe_sort(np.asarray(ids), np.asarray(tw), num_experts=E, block_m=BM)
    sid, sw, sexp, nv = (np.asarray(a) for a in s)
    T = len(ids)
    blocks = {}
    for b in range(int(nv[0]) // BM):
        entries = sid[b * BM:(b + 1) * BM]
        tok, slot = entries & sorting.TOKEN_MASK, entries >> sorting.TOKEN_BITS
        rows = [(int(t), int(k), float(w)) for t, k, w in zip(tok, slot, sw[b * BM:(b + 1) * BM])
                if t < T]
        blocks.setdefault(int(sexp[b]), []).append(rows)
    return blocks, int(nv[0]) // BM


def test_direct_rows_are_the_sort_contracts_blocks():
    cases = _cases()
    probe = os.path.join(os.path.dirname(__file__), "direct_rows_probe.py")
    run = subprocess.run([sys.executable, probe], input=json.dumps(list(cases.values())),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for (name, case), programs in zip(cases.items(), json.loads(run.stdout)):
        want, used = _contract_blocks(case["ids"], case["tw"], case["E"], case["BM"])
        T, BM = len(case["ids"]), case["BM"]
        got = {}
        for m, p in enumerate(programs):
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

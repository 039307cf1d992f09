"""jax_mxfp4_moe.layer.parallel: EP/TP results equal the single-device layer.

Multi-device cases run in one subprocess with 8 virtual CPU devices
(tests/parallel_checks.py); this file asserts on its records. Argument
checks and the communication arithmetic run in-process.
"""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jax_mxfp4_moe.layer import parallel
from parallel_checks import CASES, E, GPU_CASES, H

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Relative Frobenius error against the single-device layer on the same inputs.
# f32 activations: only the order of the partial sums differs (~1e-7 seen).
# a8w4/a4w4 quantise gemm1's output per 32-block of I; TP shards hold whole
# blocks, so the blocks and scales are the same, but a last-bit difference in
# a gemm1 sum can move an element across an fp4/fp8 rounding boundary.
# bf16: each device rounds its partial output to bf16 before the sum, up to
# k extra roundings of 2^-9 relative each.
BOUNDS = {("float32", "a16w4"): 1e-5, ("float32", "a8w4"): 1e-2,
          ("float32", "a4w4"): 2e-2, ("bfloat16", "a16w4"): 1e-2}


def _run_checks(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PARALLEL_CHECKS_PACKAGE=os.path.abspath(parallel.__file__))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "parallel_checks.py"),
                           *args], capture_output=True, text=True, env=env, timeout=1500)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PARALLEL_CHECKS_JSON ")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    return json.loads(line[-1].split(" ", 1)[1])


@pytest.fixture(scope="module")
def results():
    return _run_checks()


@pytest.fixture(scope="module")
def gpu_results():
    return _run_checks("--gpu")


def _record(results, name):
    r = results[name]
    assert "error" not in r, r["error"]
    return r


def _names(kind):
    return [c["name"] for c in CASES if c["kind"] == kind]


_BY_NAME = {c["name"]: c for c in CASES + GPU_CASES}


@pytest.mark.parametrize("name", _names("compare"))
def test_matches_single_device(results, name):
    _check_compare(_BY_NAME[name], _record(results, name))


@pytest.mark.gpu
@pytest.mark.parametrize("name", [c["name"] for c in GPU_CASES])
def test_gpu_ragged_and_kernels_match_single_device(gpu_results, name):
    if "skipped" in gpu_results[name]:
        pytest.skip(gpu_results[name]["skipped"])
    c, r = _BY_NAME[name], _record(gpu_results, name)
    if c["kind"] == "capacity":
        _check_capacity(c, r)
    else:
        _check_compare(c, r)


def _check_compare(c, r):
    assert r["shape"] == [c["T"], H] == r["ref_shape"]
    assert r["dtype"] == c["dtype"]
    assert r["finite"]
    if c["T"]:
        assert r["ref_norm"] > 1.0  # the oracle is not trivially zero
    assert r["rel"] <= BOUNDS[(c["dtype"], c["quant"])], r


@pytest.mark.parametrize("name", _names("capacity"))
def test_capacity_drops_are_counted_and_exact(results, name):
    _check_capacity(_BY_NAME[name], _record(results, name))


def _check_capacity(c, r):
    # the layer equals the single-device layer with exactly the pairs the
    # documented capacity rule drops removed, and reports how many
    assert r["dropped"] == r["expected_dropped"]
    assert r["rel"] <= BOUNDS[(c["dtype"], c["quant"])], r
    if "drops" in c["name"]:
        assert r["dropped"] > 0
    else:
        assert r["dropped"] == 0


@pytest.mark.parametrize("name", _names("shards"))
def test_each_device_holds_only_its_shard(results, name):
    c, r = _BY_NAME[name], _record(results, name)["shards"]
    es, ts = c["mesh"]
    assert r["gate_up"] == ("interleaved" if ts > 1 else c["gate_up"])
    for arr in ("w1", "w1_scale", "w2", "w2_scale", "b1", "b2"):
        a = r[arr]
        assert a["devices"] == 8
        assert a["shapes"] == [a["want"]], (arr, a)
        assert a["values_ok"], arr
        # b2 is not split over TP: one block per expert shard, held Dt times
        assert a["distinct_blocks"] == (es if arr == "b2" else es * ts), (arr, a)
    assert r["y_sharding_ok"]


@pytest.mark.parametrize("name", _names("hlo_bytes"))
def test_comm_bytes_match_compiled_collectives(results, name):
    r = _record(results, name)
    assert r["collectives"], "no collective found in the compiled module"
    # the capacity case also all-reduces the int32 drop count (<= 8 bytes)
    assert abs(r["hlo_sent"] - r["comm_bytes"]["sent"]) <= 8, r
    assert r["comm_bytes"]["sent"] == r["comm_bytes"]["received"]


def test_bad_sharding_errors_name_axis_and_sizes(results):
    m = _record(results, "errors-4x2")["messages"]
    assert "'tp'" in m["sharded_ep_called_ep_tp"] and "size 2" in m["sharded_ep_called_ep_tp"]
    assert "P('ep', None, None)" in m["sharded_ep_called_ep_tp"]
    assert "'ep'" in m["sharded_ep_called_tp_ep"] and "size 4" in m["sharded_ep_called_tp_ep"]
    assert "gate_up" in m["separated_called_tp"] and "size 2" in m["separated_called_tp"]
    assert "size 3" in m["ep3_divides_E"] and f"E={E}" in m["ep3_divides_E"]
    assert "'experts'" in m["unknown_axis"] and "('ep', 'tp')" in m["unknown_axis"]


# --------------------------------------------------------------------------
# in-process: validation and arithmetic (no multi-device backend needed)
# --------------------------------------------------------------------------

def _mesh1():
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("ep", "tp"))


def test_divisibility_errors_name_axis_and_sizes():
    with pytest.raises(ValueError, match=r"expert_axis 'ep' has size 3.*E=16"):
        parallel.check_divisible(16, 256, expert_axis="ep", expert_size=3,
                                 tensor_axis=None, tensor_size=1)
    with pytest.raises(ValueError, match=r"tensor_axis 'tp' has size 3.*I/32=8"):
        parallel.check_divisible(16, 256, expert_axis=None, expert_size=1,
                                 tensor_axis="tp", tensor_size=3)
    # 16 | 16 and 8 | 256/32: accepted
    parallel.check_divisible(16, 256, expert_axis="ep", expert_size=16,
                             tensor_axis="tp", tensor_size=8)


def test_axis_name_errors():
    mesh = _mesh1()
    with pytest.raises(ValueError, match=r"expert_axis='data' is not an axis"):
        parallel.mesh_sizes(mesh, "data", None)
    with pytest.raises(ValueError, match=r"tensor_axis='x' is not an axis"):
        parallel.mesh_sizes(mesh, None, "x")
    with pytest.raises(ValueError, match="must differ"):
        parallel.mesh_sizes(mesh, "ep", "ep")
    assert parallel.mesh_sizes(mesh, "ep", "tp") == (1, 1)


def test_weight_specs_split_i_on_the_right_dims():
    s = parallel.weight_specs("ep", "tp")
    # W1/b1: the 2I rows; W2 and its scales: the I columns; H never
    assert tuple(s["w1"]) == ("ep", "tp", None) and tuple(s["w1_scale"]) == ("ep", "tp", None)
    assert tuple(s["w2"]) == ("ep", None, "tp") and tuple(s["w2_scale"]) == ("ep", None, "tp")
    assert tuple(s["b1"]) == ("ep", "tp") and tuple(s["b2"]) == ("ep", None)


def test_capacity_rule():
    assert parallel.capacity(16, 4, 8, None) == 16          # worst case: all local tokens
    assert parallel.capacity(16, 2, 4, 1.0) == 8            # ceil(1.0 * 16 * 2 / 4)
    assert parallel.capacity(16, 2, 4, 1.25) == 10          # ceil(10.0)
    assert parallel.capacity(16, 8, 2, 2.0) == 16           # never above the worst case
    assert parallel.capacity(1, 1, 8, 0.01) == 1            # never below one row
    with pytest.raises(ValueError, match="capacity_factor"):
        parallel.capacity(16, 2, 4, 0.0)


def test_comm_bytes_arithmetic():
    # gpt-oss-120b-like decode on 8-way EP: H=2880 bf16, k=4, T=64
    gs = parallel.comm_bytes("gather_scatter", devices=8, tokens=64, top_k=4, hidden=2880,
                             dtype_bytes=2)
    # 7 peers x 8 tokens x (x row 5760 B + 4 slots x 8 B + output row 5760 B)
    assert gs == {"sent": 7 * 8 * (5760 + 32 + 5760), "received": 7 * 8 * (5760 + 32 + 5760)}
    # all_to_all at worst-case capacity moves exactly what gather_scatter does
    assert parallel.comm_bytes("all_to_all", devices=8, tokens=64, top_k=4, hidden=2880,
                               dtype_bytes=2) == gs
    # with capacity ceil(1.0 * 8 * 4 / 8) = 4 rows per peer: half
    a2a = parallel.comm_bytes("all_to_all", devices=8, tokens=64, top_k=4, hidden=2880,
                              dtype_bytes=2, capacity_factor=1.0)
    assert a2a["sent"] == 7 * 4 * (5760 + 32 + 5760)
    # TP only: ring all-reduce of [T, H], 2 (Dt-1)/Dt of it
    tp = parallel.comm_bytes("gather_scatter", devices=1, tensor_devices=8, tokens=64, top_k=4,
                             hidden=2880, dtype_bytes=2)
    assert tp["sent"] == 2 * 7 * 64 * 5760 // 8
    # one device: nothing moves
    assert parallel.comm_bytes("gather_scatter", devices=1, tokens=64, top_k=4, hidden=2880,
                               dtype_bytes=2) == {"sent": 0, "received": 0}
    with pytest.raises(ValueError, match="strategy"):
        parallel.comm_bytes("ring", devices=8, tokens=1, top_k=1, hidden=32, dtype_bytes=2)


def test_auto_rule():
    # decode size: gather_scatter whatever the capacity
    assert parallel.choose_strategy(8 * 63, devices=8, top_k=2, capacity_factor=1.0) == \
        "gather_scatter"
    # prefill size with a capacity below the worst case: all_to_all
    assert parallel.choose_strategy(8 * 64, devices=8, top_k=2, capacity_factor=1.0) == \
        "all_to_all"
    # without a capacity all_to_all sends as much as gather_scatter
    assert parallel.choose_strategy(8 * 4096, devices=8, top_k=2) == "gather_scatter"
    # capacity_factor * k >= devices: the capacity is the worst case anyway
    assert parallel.choose_strategy(4 * 4096, devices=4, top_k=4, capacity_factor=1.0) == \
        "gather_scatter"
    assert math.ceil(1.0 * 4096 * 4 / 4) >= 4096


def test_call_argument_errors():
    mesh = _mesh1()
    from jax_mxfp4_moe.layer.weights import prepare_weights
    rng = np.random.default_rng(0)
    W = prepare_weights(rng.normal(size=(2, 64, 32)).astype(np.float32),
                        rng.normal(size=(2, 32, 32)).astype(np.float32))
    x = np.zeros((4, 32), np.float32)
    ids = np.zeros((4, 2), np.int32)
    tw = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match="strategy"):
        parallel.moe(x, W, tw, ids, mesh=mesh, expert_axis="ep", strategy="ring")
    with pytest.raises(ValueError, match="expert_mask"):
        parallel.moe(x, W, tw, ids, mesh=mesh, expert_axis="ep", expert_mask=np.ones(2, bool))
    with pytest.raises(ValueError, match="capacity_factor"):
        parallel.moe(x, W, tw, ids, mesh=mesh, expert_axis="ep", strategy="gather_scatter",
                     capacity_factor=1.0)
    with pytest.raises(ValueError, match=r"x must have shape \[T, 32\]"):
        parallel.moe(x[:, :16], W, tw, ids, mesh=mesh, expert_axis="ep")
    with pytest.raises(ValueError, match="topk_weights"):
        parallel.moe(x, W, tw[:, :1], ids, mesh=mesh, expert_axis="ep")


def test_bench_mesh_reports_comm_bytes(tmp_path):
    # one CPU device: the 4x2 layer is not timed, its bytes are still reported
    from jax_mxfp4_moe.tools import bench
    out = tmp_path / "mesh.json"
    assert bench.main(["--preset", "tiny", "--tokens", "8,64", "--mesh", "4x2",
                       "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    p = bench.PRESETS["tiny"]
    for row in res[0]["rows"]:
        for strategy in parallel.STRATEGIES:
            r = row["results"][strategy]
            want = parallel.comm_bytes(strategy, devices=4, tensor_devices=2, tokens=row["T"],
                                       top_k=p.top_k, hidden=p.hidden, dtype_bytes=2,
                                       ragged=res[0]["header"]["ragged"], experts=p.num_experts)
            assert (r["sent_bytes"], r["received_bytes"]) == (want["sent"], want["received"])
            assert ("time_s" in r) == res[0]["header"]["timed"]
    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--mesh", "4by2"])

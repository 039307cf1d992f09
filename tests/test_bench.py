"""The bench CLI on CPU with the `tiny` preset (2 reps): runs end to end,
writes JSON whose numbers follow from the definitions."""

import json

import numpy as np

from jax_mxfp4_moe.tools import bench


def test_tiny_preset_runs_and_writes_json(tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["--preset", "tiny", "--tokens", "1,5", "--reps", "2", "--routings", "2",
                       "--warmup", "1", "--baselines", "bf16_ragged_dot,mxfp4_dequant_ragged_dot",
                       "--json", str(out)]) == 0
    (res,) = json.loads(out.read_text())
    h = res["header"]
    assert h["preset"] == "tiny" and h["quant"] == "a16w4" and h["device"]
    assert [r["T"] for r in res["rows"]] == [1, 5]
    p = bench.PRESETS["tiny"]
    for row in res["rows"]:
        assert row["flops"] == 2.0 * row["T"] * p.top_k * 3 * p.hidden * p.intermediate
        assert row["roofline_s"] == max(row["bytes"] / h["hbm_bytes_per_s"],
                                        row["flops"] / h["bf16_flops_per_s"])
        ours = row["results"]["ours"]
        assert ours["status"] == "ok" and ours["time_s"] > 0 and ours["sync_time_s"] > 0
        assert np.isclose(ours["pct_roofline"], 100 * row["roofline_s"] / ours["time_s"])
        for name in ("bf16_ragged_dot", "mxfp4_dequant_ragged_dot"):
            r = row["results"][name]
            assert r["status"] == "ok"
            assert np.isclose(r["ratio_to_ours"], r["time_s"] / ours["time_s"])


def test_pipelined_timing_batches_calls_and_waits_for_the_last(monkeypatch):
    """Each sample dispatches a batch of calls and blocks once, on the last."""
    calls, waited = [], []
    monkeypatch.setattr(bench.jax, "block_until_ready", lambda v: waited.append(v) or v)
    monkeypatch.setattr(bench, "PIPELINE_SAMPLE_S", 0.05)

    def fn(a):
        calls.append(a)
        bench.time.sleep(0.01)
        return len(calls)

    times = bench._time_pipelined(fn, 7, reps=3, warmup=2)
    assert len(times) == 3 and all(0.009 < t < 0.05 for t in times)
    batch = (len(calls) - 5) // 3  # 2 warm-up + 3 sizing calls, each waited for
    assert 2 <= batch <= 5 and len(calls) == 5 + 3 * batch
    # then one wait per sample: on the batch's last result
    assert waited[5:] == [5 + batch * (i + 1) for i in range(3)]


def test_touched_bytes_count_only_distinct_experts():
    p = bench.PRESETS["gpt-oss-120b"]
    ids = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    io = 2 * 2 * 2 * p.hidden
    assert bench.touched_bytes(p, ids, 2) == 4 * bench.expert_bytes(p) + io
    # gpt-oss-120b at T=1: docs/DESIGN.md §6's 19 us roofline at 2.8 TB/s
    t = bench.touched_bytes(p, ids[:1], 1) / 2.8e12
    assert 18e-6 < t < 20e-6


def test_baselines_agree_with_reference_on_cpu():
    """The baselines compute the same layer (so their times compare)."""
    import jax
    import jax.numpy as jnp
    from jax_mxfp4_moe.numerics import reference

    p = bench.PRESETS["tiny"]
    w = bench.random_weights(p, jax.random.key(0))
    ids, tw = bench.random_routings(p, 6, 1, seed=0)
    x = jax.random.normal(jax.random.key(1), (6, p.hidden), jnp.bfloat16)
    ref = reference.moe(x, w, tw[0], ids[0], activation=p.activation, quant="a16w4")
    layers = bench.make_layers(p, w, "a16w4", ("bf16_ragged_dot", "mxfp4_dequant_ragged_dot"), "jnp")
    for name, (fn, params) in layers.items():
        (y,) = fn(params, x, jnp.asarray(tw), jnp.asarray(ids))
        y = np.asarray(y.astype(jnp.float32))
        err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        assert err < 2e-2, (name, err)

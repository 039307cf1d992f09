"""The bench CLI on CPU with the `tiny` preset (2 reps): runs end to end,
writes JSON whose numbers follow from the definitions."""

import json

import numpy as np
import pytest

from jax_mxfp4_moe.tools import bench


def test_main_takes_the_platform_defaults(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "run", lambda *a, **kw: seen.append((a, kw)) or dict(
        header=dict(hbm_bytes_per_s=None, bf16_flops_per_s=None), rows=[]))
    assert bench.main(["--preset", "tiny"]) == 0
    (args, kw), = seen
    assert args == ("tiny", [1, 8, 64], "a16w4")
    assert (kw["reps"], kw["routings"], kw["warmup"], kw["baselines"]) == (5, 1, 1, None)


def test_tiny_preset_on_cpu_takes_the_cpu_defaults_and_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--preset", "tiny", "--tokens", "1,5", "--reps", "2", "--json", str(out)]) == 0
    (res,) = json.loads(out.read_text())
    h = res["header"]
    assert h["preset"] == "tiny" and h["quant"] == "a16w4" and h["device"] and h["platform"] == "cpu"
    # CPU defaults: a small T range, the dequantise-inside-jit baselines, no GPU ceilings
    assert [r["T"] for r in res["rows"]] == [1, 5]
    assert h["baselines"] == list(bench.DEFAULTS["cpu"]["baselines"])
    assert h["hbm_bytes_per_s"] is None and h["bf16_flops_per_s"] is None and h["routings"] == 1
    p = bench.PRESETS["tiny"]
    for row in res["rows"]:
        assert row["flops"] == 2.0 * row["T"] * p.top_k * 3 * p.hidden * p.intermediate
        assert row["roofline_s"] is None
        ours = row["results"]["ours"]
        assert ours["status"] == "ok" and ours["time_s"] > 0
        assert not {"tb_s", "tflop_s", "pct_roofline", "sync_time_s"} & set(ours)  # GPU-only columns
        for name in bench.DEFAULTS["cpu"]["baselines"]:
            r = row["results"][name]
            assert r["status"] == "ok" and not {"tb_s", "pct_roofline"} & set(r)
            assert np.isclose(r["ratio_to_ours"], r["time_s"] / ours["time_s"])
    printed = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 120 for line in printed), max(printed, key=len)
    table = [line for line in printed if not line.startswith("#")]
    assert "roofline" not in table[0] and "TB/s" not in table[0] and len(table) == 3
    assert not any(z in line for line in table for z in (" 0.00 ", "x0.0)", " 0 TF"))


def test_gpu_rows_fit_120_columns_with_every_gpu_baseline():
    base = bench.DEFAULTS["gpu"]["baselines"]
    row = dict(T=16384, roofline_s=5407e-6, results=dict(
        ours=dict(status="ok", time_s=11211e-6, pct_roofline=48.2, tb_s=0.52, tflop_s=291.1,
                  sync_time_s=11238e-6),
        bf16_ragged_dot=dict(status="OOM"),
        mxfp4_dequant_ragged_dot=dict(status="ok", time_s=0.181245, ratio_to_ours=16.17),
        mosaic_gpu_ragged_dot=dict(status="ok", time_s=21245e-6, ratio_to_ours=1.895)))
    header, line = bench.format_header(base, True), bench.format_row(row, base, True)
    assert len(header) <= 120 and len(line) <= 120
    assert "48.2%" in line and "181245 (x16.2)" in line and "OOM" in line


def test_help_shows_every_default_within_120_columns(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1,8,64,512,4096,16384 on a GPU, 1,8,64 on CPU)" in text
    assert "(default: gpt-oss-120b)" in text and "(default: a16w4)" in text
    assert "(default: 20 on a GPU, 5 on CPU)" in text and "(default: None)" not in text
    assert "small" in text


def test_cpu_timing_preset_is_the_issue_shape():
    p = bench.PRESETS["small"]
    assert (p.num_experts, p.top_k, p.hidden, p.intermediate) == (32, 4, 512, 512)


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
    layers = bench.make_layers(p, w, "a16w4", ("bf16_ragged_dot", "mxfp4_dequant_ragged_dot",
                                               "mxfp4_dequant_dense"), "jnp")
    assert len(layers) == 4
    for name, (fn, params) in layers.items():
        (y,) = fn(params, x, jnp.asarray(tw), jnp.asarray(ids))
        y = np.asarray(y.astype(jnp.float32))
        err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        assert err < 2e-2, (name, err)

"""The MI355X performance model (``rocm/perf_model.py``): its parts on known answers and
independent oracles, and its invariants over the shipped gfx950 kernels."""

import math
import os

import numpy as np
import pytest

from jax_mxfp4_moe.rocm import isa, perf_model as pm

MFMA_FP4 = "v_mfma_scale_f32_16x16x128_f8f6f4 v[0:3], v[4:7], v[8:11], v[0:3], v12, v13 cbsz:4 blgp:4"
MFMA_FP8 = "v_mfma_scale_f32_16x16x128_f8f6f4 v[0:3], v[4:11], v[12:15], v[0:3], v16, v17 cbsz:0 blgp:4"


def program(body: str) -> isa.Program:
    text = "\t.type\tk,@function\nk:\n"
    for ln in body.strip().splitlines():
        ln = ln.strip()
        text += (ln + "\n") if ln.endswith(":") else ("\t" + ln + "\n")
    return isa.parse(text + "\ts_endpgm\n.Lfunc_end0:\n")


# ---------------------------------------------------------------- occupancy
@pytest.mark.parametrize("vgpr, agpr, lds, waves", [
    (64, 0, 0, 8),  # the 8-wave limit
    (128, 0, 0, 4),
    (100, 0, 0, 4),  # 100 -> 104 in granules of 8: 512 // 104 = 4
    (130, 128, 0, 1),  # arch VGPRs rounded to 4 (132) + 128 AGPRs = 260 -> 264
    (64, 0, 32768, 5),  # 160 KiB / 32 KiB = 5 workgroups of 4 waves on 4 SIMDs
    (64, 0, 131072, 1),
])
def test_waves_per_simd(vgpr, agpr, lds, waves):
    assert pm.waves_per_simd(vgpr, agpr, lds, 256) == waves


def test_occupancy_takes_the_tighter_of_registers_and_lds():
    md = {".vgpr_count": 100, ".agpr_count": 0, ".group_segment_fixed_size": 32768}
    assert pm.occupancy(md, 256) == 4  # registers: 4 waves per SIMD = 4 workgroups of 4 waves
    md[".vgpr_count"] = 40
    assert pm.occupancy(md, 256) == 5  # LDS: 5 x 32 KiB


# ------------------------------------------------------------------ routing
def test_row_blocks_at_one_token_are_top_k():
    blocks, touched = pm.expected_row_blocks(1, pm.Routing.uniform(128, 4), 32)
    assert blocks == pytest.approx(4.0) and touched == pytest.approx(4.0)


@pytest.mark.parametrize("tokens, experts, top_k, bm", [(64, 128, 4, 32), (512, 256, 8, 32), (8, 128, 4, 16)])
def test_row_blocks_match_a_monte_carlo_of_top_k_routing(tokens, experts, top_k, bm):
    rng = np.random.default_rng(0)
    trials = 400
    blocks = np.empty(trials)
    touched = np.empty(trials)
    for t in range(trials):
        ids = np.argsort(rng.random((tokens, experts)), axis=1)[:, :top_k]  # k distinct experts per token
        counts = np.bincount(ids.ravel(), minlength=experts)
        blocks[t] = np.sum(-(-counts // bm))
        touched[t] = np.count_nonzero(counts)
    b, e = pm.expected_row_blocks(tokens, pm.Routing.uniform(experts, top_k), bm)
    assert abs(b - blocks.mean()) < 4 * blocks.std() / math.sqrt(trials) + 1e-3
    assert abs(e - touched.mean()) < 4 * touched.std() / math.sqrt(trials) + 1e-3


def test_bench_routing_has_a_shared_expert_and_top_k_picks():
    r = pm.bench_routing(385, 9, pm.bench_skew())
    assert r.probs[-1] == 1.0 and len(r.probs) == 385
    assert sum(r.probs) == pytest.approx(9.0)
    # the fitted skew reproduces the measured expert counts it was fitted to within 10%
    for m, active in pm.BENCH_ACTIVE_EXPERTS.items():
        assert sum(1 - (1 - p) ** m for p in r.probs) == pytest.approx(active, rel=0.1)


# ---------------------------------------------------------------- placement
def test_live_row_blocks_spread_over_the_xcds():
    # (n_tiles, row_blocks, k_splits) = (24, 128, 1), 23 real N tiles, with 4 live row blocks:
    # 92 live ids, round-robin over the 8 XCDs (row blocks on grid.x = 128 put them all on XCDs 0-3)
    ids = pm._live_3d(4, 23, (24, 128, 1))()
    assert sorted(ids) == sorted(x + 24 * y for y in range(4) for x in range(23))
    assert pm.live_per_xcd(ids) == (12, 12, 12, 12, 12, 12, 12, 8)
    # the K splits of a gemm2 double the live ids
    assert len(pm._live_3d(4, 23, (24, 128, 2))()) == 184
    assert pm.live_per_xcd([x * 128 + y for y in range(4) for x in range(23)]) == (23,) * 4 + (0,) * 4
    assert pm.live_per_xcd(range(16)) == (2,) * 8


# ---------------------------------------------------------------- the wave
def test_mfma_cycles_by_operand_format():
    p = program(f"{MFMA_FP4}\n{MFMA_FP8}")
    assert [pm.mfma_cycles(i) for i in p.instrs[:2]] == [16, 32]


def _loop(ahead: int) -> isa.Program:
    """A K loop of 4 x 1 KiB loads per wave and 2 MFMAs, its loads issued ``ahead`` steps before use."""
    loads = "\n".join(f"buffer_load_dwordx4 v[{20 + 4 * j}:{23 + 4 * j}], v1, s[4:7], 0 offen" for j in range(4))
    pro = "\n".join([loads] * ahead)
    return program(f"""
{pro}
.LBB0_1:
{loads}
s_waitcnt vmcnt({4 * ahead})
{MFMA_FP4}
{MFMA_FP4}
s_cbranch_scc1 .LBB0_1
""")


@pytest.mark.parametrize("ahead", [0, 1, 2, 3])
def test_littles_law_bounds_the_loop(ahead):
    prog = _loop(ahead)
    tm = pm.Timing(latency=2000.0)
    trips = 200
    st = pm.simulate(prog, tm, trips=lambda lp: trips)
    per_step = st.t / trips
    step_bytes = 4 * 1024
    # throughput can never pass the bytes a wave keeps in flight per latency
    in_flight = isa.loads_in_flight(prog)["max_bytes"] + step_bytes
    assert step_bytes / per_step <= in_flight / tm.latency * 1.0001
    # the wait in step i is for the loads issued at the end of step i - ahead - 1: one round trip
    # per ahead + 1 steps (Little's law with (ahead + 1) x 4 KiB in flight)
    assert per_step == pytest.approx(tm.latency / (ahead + 1), rel=0.1)
    # the extrapolated trips agree with simulating every iteration
    exact = pm.simulate(prog, tm, trips=lambda lp: trips, exact_iterations=trips).t
    assert st.t == pytest.approx(exact, rel=0.02)


def test_drain_every_step_costs_a_round_trip_per_step():
    drained = pm.simulate(_loop(0), pm.Timing(latency=1500.0), trips=lambda lp: 100).t
    deep = pm.simulate(_loop(3), pm.Timing(latency=1500.0), trips=lambda lp: 100).t
    assert drained > 100 * 1500 and deep < drained / 2.5


def test_co_resident_waves_share_the_load_path():
    alone = pm.simulate(_loop(2), pm.Timing(latency=1000.0, load_path_share=1), trips=lambda lp: 50).t
    shared = pm.simulate(_loop(2), pm.Timing(latency=1000.0, load_path_share=16), trips=lambda lp: 50).t
    # 16 waves x 4 KiB per step through 64 B/clk: at least 1024 cycles per step
    assert shared >= 50 * 16 * 4096 / pm.HW["load_path_bytes_per_clk"].value
    assert alone < shared


def test_fractional_and_zero_trips():
    prog = _loop(0)
    tm = pm.Timing(latency=1000.0)
    t1 = pm.simulate(prog, tm, trips=lambda lp: 1).t
    t2 = pm.simulate(prog, tm, trips=lambda lp: 2).t
    t15 = pm.simulate(prog, tm, trips=lambda lp: 1.5).t
    t0 = pm.simulate(prog, tm, trips=lambda lp: 0).t
    assert t0 < t1 < t15 < t2
    assert t15 == pytest.approx((t1 + t2) / 2, rel=0.05)


def test_roofline_is_the_larger_of_bytes_and_flops():
    r, hbm, mfma = pm.roofline_us("deepseek-v3", 4096, "a8w4")
    assert r == max(hbm, mfma) and mfma > 0
    # T=1: the k experts' weights at 8 TB/s
    _, hbm1, _ = pm.roofline_us("gpt-oss-120b", 1, "a4w4")
    assert hbm1 == pytest.approx(4 * 3 * 2880 * 2880 * 0.53125 / 8e12 * 1e6)


# ------------------------------------------------- the shipped kernels (CI)
def _needs_flydsl():
    pytest.importorskip("flydsl", reason="flydsl (the [rocm] extra) is not installed")


@pytest.fixture(scope="module")
def layers():
    _needs_flydsl()
    return pm.model_layers(("gpt-oss-120b", "deepseek-v3"), pm.TOKENS, ("a4w4",))


def test_model_over_the_shipped_kernels_is_sane(layers):
    assert len(layers) == 2 * len(pm.TOKENS)
    for row in layers:
        roof = row.roofline[0]
        assert row.ours_us >= roof > 0, (row.preset, row.tokens)
        for t in row.ours:
            assert t.us > 0 and t.bound in ("latency", "issue", "hbm", "cache", "atomics", "fixed")
            assert t.live_wgs <= t.wgs
            if t.stage in ("gemm1", "gemm2"):
                assert t.us >= pm.stage_roofline_us(t.stage, row.preset, row.tokens, row.quant)
                assert 0 < t.live_wgs and sum(t.xcd_live) == t.live_wgs


def test_gemm_times_grow_with_tokens(layers):
    for preset in ("gpt-oss-120b", "deepseek-v3"):
        rows = [r for r in layers if r.preset == preset]
        for stage in ("gemm1", "gemm2"):
            ts = [next(t.us for t in r.ours if t.stage == stage) for r in rows]
            assert all(b >= a * 0.999 for a, b in zip(ts, ts[1:])), (preset, stage, ts)
        assert [r.roofline[0] for r in rows] == sorted(r.roofline[0] for r in rows)


def test_isa_properties_of_the_shipped_gemms(layers):
    for t in layers[0].ours:
        if t.stage in ("gemm1", "gemm2"):
            launch = next(x for x in pm.ours_launches("gpt-oss-120b", 1, "a4w4") if x.stage == t.stage)
            d = pm.isa_properties(launch.kernel)
            assert d["scratch"] == 0 and 0 < d["mfma_share"] < 1 and d["waves_per_simd"] >= 1
            assert d["k_loop"] in ("loop", "unrolled")


def test_report_without_a_snapshot_says_so(monkeypatch, capsys):
    _needs_flydsl()
    from jax_mxfp4_moe.tools import report

    monkeypatch.delenv("JAX_MXFP4_MOE_FLYDSL_SNAPSHOT", raising=False)
    assert report.main(["--arch", "gfx950", "--model", "--presets", "gpt-oss-120b", "--tokens", "1,64",
                        "--quant", "a4w4"]) == 0
    out = capsys.readouterr().out
    assert "FlyDSL: not compared: no FlyDSL snapshot" in out
    assert "gpt-oss-120b a4w4 T=1:" in out and "gpt-oss-120b a4w4 T=64:" in out
    assert "latency_ns" in out and "hbm_tbps" in out


@pytest.mark.parametrize("argv, msg", [
    (["--tokens", "0"], "--tokens"), (["--quant", "a16w4"], "--quant"), (["--presets", "llama"], "--presets")])
def test_report_rejects_bad_arguments(argv, msg, capsys):
    from jax_mxfp4_moe.tools import report

    assert report.main(["--arch", "gfx950", "--model"] + argv) == 2
    assert msg in capsys.readouterr().err


# ----------------------------------------- FlyDSL upstream (needs a snapshot)
SNAPSHOT = os.environ.get("JAX_MXFP4_MOE_FLYDSL_SNAPSHOT")


@pytest.mark.skipif(not SNAPSHOT, reason="no FlyDSL snapshot ($JAX_MXFP4_MOE_FLYDSL_SNAPSHOT unset)")
def test_calibration_predicts_flydsl_within_30_percent():
    from jax_mxfp4_moe.rocm import flydsl_upstream

    codes = flydsl_upstream.compile_variants(pm.calibration_variants(), SNAPSHOT)
    for pt, t in pm.predict_calibration(codes):
        assert abs(t / pt.us - 1) <= 0.30, (pt, t)
        recorded = pm.CALIBRATION_RESIDUALS[f"{pt.model} M={pt.tokens}"]
        assert t / pt.us - 1 == pytest.approx(recorded, abs=0.02)
    for m, t in pm.predict_gemm1_check(codes).items():
        assert abs(t / pm.GEMM1_CHECK[m] - 1) <= 0.30, (m, t)


# ------------------------------------------------ FlyDSL upstream, no snapshot
def test_flydsl_snapshot_is_located_or_refused_clearly(monkeypatch, tmp_path):
    from jax_mxfp4_moe.rocm import flydsl_upstream as fu

    monkeypatch.delenv(fu.ENV_VAR, raising=False)
    with pytest.raises(fu.SnapshotUnavailable, match="no FlyDSL snapshot"):
        fu.locate(None)
    with pytest.raises(fu.SnapshotUnavailable, match="neither a FlyDSL checkout"):
        fu.locate(tmp_path)
    (tmp_path / "kernels/moe/mxfp_moe").mkdir(parents=True)
    (tmp_path / "kernels/moe/mxfp_moe/gemm1.py").write_text("# stand-in\n")
    monkeypatch.setenv(fu.ENV_VAR, str(tmp_path))
    assert fu.locate(None) == tmp_path


def test_flydsl_tiles_and_grids():
    from jax_mxfp4_moe.rocm import flydsl_upstream as fu

    assert fu.padded(2880) == 3072 and fu.padded(7168) == 7168
    bms = [fu.tile_policy(t)[0]["bm"] for t in pm.TOKENS]
    assert bms == sorted(bms) and fu.tile_policy(64)[0]["inline_quant"] and not fu.tile_policy(512)[0]["inline_quant"]
    # every row block a routing can fill fits the grid
    for t in pm.TOKENS:
        for bm in (16, 32, 128):
            worst = t * 4 + min(t * 4, 128) * (bm - 1)  # every entry's expert padded to BM
            assert fu.gemm1_grid(t, bm, 128, 4, 3072) >= -(-worst // bm) * (2 * 3072 // 256)


@pytest.mark.skipif(not SNAPSHOT, reason="no FlyDSL snapshot ($JAX_MXFP4_MOE_FLYDSL_SNAPSHOT unset)")
def test_flydsl_grid_matches_the_snapshots_host_code():
    import json
    import subprocess
    import sys

    from jax_mxfp4_moe.rocm import flydsl_upstream as fu

    root = fu.locate(SNAPSHOT)
    cases = [(t, bm) for t in (1, 8, 64, 512, 4096) for bm in (16, 32, 64, 128)]
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); "
            "from kernels.moe.mxfp_moe.gemm1 import gemm1_grid; "
            "print(json.dumps([gemm1_grid(t, bm, NE=128, TOPK=4, INTER=3072) for t, bm in json.loads(sys.argv[2])]))")
    out = subprocess.run([sys.executable, "-c", code, str(root), json.dumps(cases)], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == [fu.gemm1_grid(t, bm, 128, 4, 3072) for t, bm in cases]

"""python -m jax_mxfp4_moe.selfcheck: what it would run on each GPU, its exit
codes, its report (on CPU through the jnp path), and the run on a GPU
(``-m rocm`` / ``-m gpu``)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jax_mxfp4_moe import spec
from jax_mxfp4_moe import selfcheck


@pytest.mark.parametrize("backend", ["cuda", "rocm"])
def test_the_plan_covers_every_shipped_variant(backend):
    checks = selfcheck.plan(backend)
    names = [c.name for c in checks]
    assert len(names) == len(set(names))
    kinds = {c.kind for c in checks}
    assert {"sort", "quant", "layer", "preset"} <= kinds
    layout = selfcheck.backend_layout(backend)
    quants = selfcheck.backend_quants(backend)
    assert quants == (("a4w4", "a8w4") if backend == "rocm" else tuple(spec.QUANT_MODES))
    for q in quants:
        for act in spec.ACTIVATION_KINDS:
            for gate_up in spec.GATE_UP:
                for bias in (False, True):
                    for lay in ("canonical", layout):
                        assert f"layer {q} {act} {gate_up} bias={bias} {lay} T=23" in names
    for det in ("atomic", "deterministic"):
        assert sum(n.endswith(f"{det} {layout}") for n in names) == 4  # T = 1, 7, 64, 300
    for edge in ("nowhere", "mask", "empty"):
        assert f"edge routing: {edge}" in names
    for preset in spec.PRESETS:
        assert any(n.startswith(f"preset {preset} ") for n in names), preset
    # the sort at one-launch and chunked sizes of both backends, masked or not
    from jax_mxfp4_moe.cuda import config as cuda_config
    from jax_mxfp4_moe.rocm import geometry
    sorts = [n for n in names if n.startswith("sort")]
    assert len(sorts) == 4 and sum("masked" in n for n in sorts) == 2
    E, k = selfcheck.SMALL_DS["E"], selfcheck.SMALL_DS["k"]
    for limit in (cuda_config.SORT_ONESHOT_MAX_ENTRIES, geometry.SORT_ONESHOT_MAX_ENTRIES):
        assert 7 * k <= limit < 1000 * k
    assert f"sort T=7 E={E} k={k}" in names
    quant = [n for n in names if n.startswith("quant")]
    assert {n.split()[1] for n in quant} == {"mxfp4", "mxfp8"} and len(quant) == 8
    gemms = [n for n in names if n.startswith("gemm1+gemm2")]
    if backend == "rocm":  # each stage against the functional model, every mode, nt on and off
        assert {n.split()[1] for n in gemms} == set(quants) and sum("nt=True" in n for n in gemms) == 4
    else:  # CUDA's gemms run inside the layer, in each regime
        assert not gemms


def test_without_a_gpu_it_says_so_and_exits_with_its_own_code():
    lines = []
    assert selfcheck.main([], log=lines.append) == selfcheck.NO_GPU_EXIT == 3
    assert selfcheck.NO_GPU_EXIT not in (0, selfcheck.FAIL_EXIT, 2)  # 2: argparse's usage errors
    (line,) = lines
    assert "no GPU" in line and "jax[cuda13]" in line and "jax[rocm7-local]" in line


def test_runs_and_reports_through_the_jnp_path(tmp_path):
    path = tmp_path / "report.json"
    lines = []
    rc = selfcheck.main(["--backend", "jnp", "--no-presets", "-k", "sort T=7", "--json", str(path)],
                        log=lines.append)
    assert rc == 0, lines
    rep = json.loads(path.read_text())
    assert rep["passed"] == 2 and rep["failed"] == 0 and rep["failures"] == []
    env = rep["environment"]
    assert env["backend"] == "jnp" and env["platform"] == "cpu" and env["jax"]
    assert {"device", "jaxlib", "triton", "flydsl", "python", "jax_mxfp4_moe"} <= set(env)
    for c in rep["checks"]:
        assert set(c) >= {"name", "kind", "status", "error", "tolerance", "seconds", "detail"}
        assert c["status"] == "PASS" and c["error"] <= c["tolerance"] and c["seconds"] > 0
    assert len([ln for ln in lines if ln.startswith("PASS")]) == 2
    assert lines[-1].startswith("selfcheck: 2 passed, 0 failed")


def test_a_wrong_or_raising_kernel_fails_the_run(tmp_path, monkeypatch):
    import jax.numpy as jnp

    from jax_mxfp4_moe.layer import api
    monkeypatch.setattr(api, "moe", lambda x, *a, **kw: jnp.zeros_like(x))  # a layer that is wrong

    def broken(x, fmt):
        raise RuntimeError("launch failed")
    monkeypatch.setattr(selfcheck._JnpBackend, "quantize", staticmethod(broken))
    path = tmp_path / "r.json"
    lines = []
    rc = selfcheck.main(["--backend", "jnp", "--no-presets", "-k", "a16w4 silu separated bias=True canonical",
                         "--json", str(path)], log=lines.append)
    assert rc == selfcheck.FAIL_EXIT
    rc = selfcheck.main(["--backend", "jnp", "--no-presets", "-k", "quant mxfp4 float32 [1, 256]",
                         "--json", str(path)], log=lines.append)
    assert rc == selfcheck.FAIL_EXIT
    rep = json.loads(path.read_text())
    (c,) = rep["checks"]
    assert c["status"] == "FAIL" and c["error"] is None and "launch failed" in c["detail"]
    assert "RuntimeError" in c["traceback"]
    fails = [ln for ln in lines if ln.startswith("FAIL")]
    assert len(fails) == 2 and "rel Frobenius 1.00e+00" in fails[0]


def test_ships_as_a_module_without_pytest():
    code = ("import sys, runpy; sys.argv = ['selfcheck', '--list', '--backend', 'rocm'];\n"
            "try:\n    runpy.run_module('jax_mxfp4_moe.selfcheck', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'pytest' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    listed = out.stdout.splitlines()
    assert len(listed) == len(selfcheck.plan("rocm")) and any("gemm1+gemm2 a4w4" in ln for ln in listed)


@pytest.mark.rocm
def test_selfcheck_passes_on_the_rocm_gpu(tmp_path):
    assert selfcheck.main(["--backend", "rocm", "--json", str(tmp_path / "rocm.json")]) == 0


@pytest.mark.gpu
def test_selfcheck_passes_on_the_cuda_gpu(tmp_path):
    assert selfcheck.main(["--backend", "cuda", "--json", str(tmp_path / "cuda.json")]) == 0


def test_preset_and_edge_checks_run_through_the_jnp_path(tmp_path):
    """The preset check (reference on the experts the rows touch) and an edge
    routing (an expert mask over 2E global experts) pass where the layer is right."""
    lines = []
    for k in ("preset tiny", "edge routing: mask"):
        rc = selfcheck.main(["--backend", "jnp", "-k", k, "--json", str(tmp_path / "p.json")],
                            log=lines.append)
        assert rc == 0, lines
    assert lines[0].startswith("PASS  preset tiny a8w4 T=64") and lines[2].startswith("PASS  edge routing: mask")

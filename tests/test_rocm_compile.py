"""Every shipped gfx950 kernel variant, compiled on this (GPU-less) machine by
FlyDSL, checked statically: the code object, its kernarg metadata against the
launcher's packing, the instructions the design needs in its ISA, no scratch,
resource budgets; and the whole pipeline lowered for the ROCm platform."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flydsl", reason="flydsl (the [rocm] extra) is not installed")

import moe_cases  # noqa: E402
from jax_mxfp4_moe.runtime import ffi  # noqa: E402
from jax_mxfp4_moe.tools import report as rocm_inspect
from jax_mxfp4_moe.numerics import sorting
from jax_mxfp4_moe.rocm import backend as rocm, compile as rocm_compile, config as rocm_config  # noqa: E402
from jax_mxfp4_moe.rocm import elf as rocm_elf, geometry as ix  # noqa: E402

EM_AMDGPU = 224
VARIANTS = rocm_config.shipped_variants()


def _id(v):
    module, cfg = v
    return module + "-" + "-".join(f"{k}={cfg[k]}" for k in sorted(cfg) if k in (
        "num_experts", "stage", "cols", "fmt", "in_dtype", "quant", "activation", "gate_up", "hidden", "nt",
        "top_k"))


@pytest.fixture(scope="module", params=VARIANTS, ids=[_id(v) for v in VARIANTS])
def compiled(request):
    module, cfg = request.param
    return module, cfg, rocm_compile.compile_kernel(module, arch="gfx950", **cfg)


def test_shipped_variants_cover_both_presets_modes_and_load_policies():
    names = {m: [c for mm, c in VARIANTS if mm == m] for m in ("sort", "quant", "gemm1", "gemm2")}
    assert {(c["num_experts"], c["stage"]) for c in names["sort"]} == {
        (e, st) for e in (128, 256) for st in sorting.SORT_STAGES}
    assert {(c["cols"], c["fmt"], c["in_dtype"]) for c in names["quant"]} == {
        (h, f, d) for h in (2944, 7168) for f in ("mxfp4", "mxfp8") for d in ("bf16", "f32")}
    assert {(c["hidden"], c["quant"], c["nt"]) for c in names["gemm1"]} == {
        (h, q, nt) for h in (2880, 7168) for q in ("a4w4", "a8w4") for nt in (False, True)}
    assert {(c["hidden"], c["quant"], c["nt"], c.get("top_k")) for c in names["gemm2"]} == {
        (h, q, nt, det) for h, k in ((2880, 4), (7168, 8)) for q in ("a4w4", "a8w4") for nt in (False, True)
        for det in (None, k)}


def test_code_object_is_a_gfx950_hsaco_with_the_named_kernel(compiled):
    module, cfg, co = compiled
    data = co.data()
    assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == EM_AMDGPU
    md = rocm_elf.code_object_metadata(data)
    assert md["amdhsa.target"].endswith("gfx950")
    kernels = {k[".name"]: k for k in md["amdhsa.kernels"]}
    assert list(kernels) == [co.name]
    assert co.name == rocm_compile.kernel_module(module).kernel_name(**cfg)
    k = kernels[co.name]
    assert k[".wavefront_size"] == 64
    assert tuple(k[".reqd_workgroup_size"]) == co.block  # the launcher's block = the kernel's


def test_kernarg_packing_matches_the_code_objects_metadata(compiled):
    _, _, co = compiled
    md = rocm_elf.kernel_metadata(co.data())[co.name]
    offsets, sizes, total = rocm_elf.kernarg_offsets(md)  # also: no hidden arguments
    ffi_offsets, ffi_size = ffi.kernarg_layout(co.params)
    assert list(ffi_offsets) == offsets and ffi_size == total
    assert sizes == [8 if p == "ptr" else 4 for p in co.params]


def test_no_scratch_and_within_budgets(compiled):
    _, _, co = compiled
    res = rocm_inspect.resources(co, "gfx950")
    assert res["scratch"] == 0 and co.metadata[".vgpr_spill_count"] == 0 and co.metadata[".sgpr_spill_count"] == 0
    assert rocm_inspect.budget_violations(res) == []


def _mnemonics(isa):
    return re.findall(r"^\s+([a-z_0-9]+)(?:\s|$)", isa, re.M)


def test_isa_has_the_instructions_the_design_needs(compiled):
    module, cfg, co = compiled
    isa = co.isa
    mfma = re.findall(r"v_mfma_scale_f32_16x16x128_f8f6f4[^\n]*", isa)
    atomics = re.findall(r"global_atomic_pk_add_bf16", isa)
    b_loads = re.findall(r"buffer_load_dwordx4[^\n]*", isa)
    if module in ("gemm1", "gemm2"):
        assert mfma, "no scaled MFMA"
        # cbsz = A format (4 = fp4, absent = 0 = fp8 e4m3), blgp = B format (fp4)
        want_cbsz = "cbsz:4" if cfg["quant"] == "a4w4" else None
        for line in mfma:
            assert "blgp:4" in line
            assert (want_cbsz in line) if want_cbsz else ("cbsz" not in line)
        nt = [ln for ln in b_loads if re.search(r"\bnt\b", ln)]
        if cfg["nt"]:
            assert nt, "nt variant without non-temporal loads"
        else:
            assert not re.search(r"buffer_load\w*[^\n]*\bnt\b", isa)
    else:
        assert not mfma
    if module == "gemm2" and not cfg.get("top_k"):
        assert atomics
        assert "flat_atomic" not in isa and "_cmpswap" not in isa  # no CAS loops
    else:  # the deterministic gemm2 stores plain f32 rows
        assert not atomics
    if module == "gemm2" and cfg.get("top_k"):
        assert "global_store_dwordx2" in isa
    assert "scratch_" not in isa and "buffer_store_dword off" not in isa
    assert "s_endpgm" in _mnemonics(isa)


def test_inspect_cli_reports_every_kernel(capsys):
    assert rocm_inspect.main(["--arch", "gfx950"]) == 0
    out = capsys.readouterr().out
    for module, cfg in VARIANTS:
        co = rocm_compile.compile_kernel(module, arch="gfx950", **cfg)
        assert co.name in out
    assert "0 over budget" in out


@pytest.mark.parametrize("quant,activation,gate_up,bias,mask,det", [
    ("a4w4", "swiglu_oai", "interleaved", True, False, False),
    ("a8w4", "silu", "separated", False, True, True),
])
def test_pipeline_lowers_for_rocm_with_the_right_launches(quant, activation, gate_up, bias, mask, det):
    shape = moe_cases.Shape("s", E=4, k=2, H=160, I=96)
    w = moe_cases.make_weights(shape, gate_up=gate_up, bias=bias).to_layout("gfx950")
    T = 5
    x, tw, ti = moe_cases.make_tokens(shape, T)
    em = jnp.asarray([1, 0, 1, 1], jnp.int32) if mask else None

    def f(x, w, tw, ti):
        return moe_cases.backend_moe(rocm, x, w, tw, ti, activation=activation, quant=quant, expert_mask=em, deterministic=det,
                        arch="gfx950")

    text = jax.jit(f).trace(x, w, tw, ti).lower(lowering_platforms=("rocm",)).as_text()
    calls = re.findall(r"stablehlo.custom_call @jax_mxfp4_moe_launch[^\n]*", text)
    assert len(calls) == 4
    order = [re.search(r"moe_(sort|quant|gemm1|gemm2)_", c).group(1) for c in calls]
    assert order == ["sort", "quant", "gemm1", "gemm2"]
    nblocks = sorting.num_blocks(T, shape.k, shape.E, ix.BM)
    Hp, Ip = ix.padded_dims(shape.H, shape.I)
    # result shapes of the launches: sort outputs, quantised x, sorted intermediate, y [T, Hp]
    P = sorting.sorted_size(T, shape.k, shape.E, ix.BM)
    assert f"tensor<{P}xi32>" in calls[0] and f"tensor<{nblocks}xi32>" in calls[0]
    assert f"tensor<{T}x{Hp // 32}xui8>" in calls[1]
    assert f"tensor<{P}x{Ip // 32}xui8>" in calls[2]
    assert (f"tensor<{T * shape.k}x{Hp}xf32>" if det else f"tensor<{T}x{Hp}xbf16>") in calls[3]
    assert ("_det_k" in calls[3]) == det


def test_dry_run_packs_scalars_where_the_code_object_expects_them():
    """The launcher's packer (CPU dry-run target) against the kernel's metadata."""
    if not ffi.available():
        pytest.fail("the FFI launcher extension is not built")
    co = rocm_compile.compile_kernel("quant", arch="gfx950", cols=256, fmt="mxfp4", in_dtype="bf16")
    kernel = ffi.Kernel(co.code_hash, co.name, block=co.block, params=co.params)
    x = jnp.zeros((3, 256), jnp.bfloat16)
    outs = [jax.ShapeDtypeStruct((3, 128), jnp.uint8), jax.ShapeDtypeStruct((3, 8), jnp.uint8)]
    with jax.default_device(jax.devices("cpu")[0]):
        _, kernarg = ffi.dry_run(kernel, ix.quant_grid(3, 256), [x, ffi.Out(0), ffi.Out(1), 12345], outs)
    offsets, sizes, total = rocm_elf.kernarg_offsets(rocm_elf.kernel_metadata(co.data())[co.name])
    kernarg = np.asarray(kernarg)
    assert kernarg.size == total
    assert int.from_bytes(kernarg[offsets[3]:offsets[3] + 4].tobytes(), "little") == 12345
    ptrs = [int.from_bytes(kernarg[o:o + 8].tobytes(), "little") for o in offsets[:3]]
    assert all(p != 0 for p in ptrs) and len(set(ptrs)) == 3


@pytest.mark.parametrize("masked", [False, True])
def test_large_t_sort_lowers_to_three_launches(masked):
    T, k, E = 2000, 4, 16
    assert T * k > ix.SORT_ONESHOT_MAX_ENTRIES
    ids = jnp.zeros((T, k), jnp.int32)
    tw = jnp.zeros((T, k), jnp.float32)
    mask = jnp.ones((E,), jnp.int32) if masked else None
    f = jax.jit(lambda i, w: rocm.sort(i, w, num_experts=E, expert_mask=mask, arch="gfx950"))
    text = f.trace(ids, tw).lower(lowering_platforms=("rocm",)).as_text()
    calls = re.findall(r"stablehlo.custom_call @jax_mxfp4_moe_launch[^\n]*", text)
    assert [re.search(r"moe_sort_(count|offsets|scatter)_", c).group(1) for c in calls] == [
        "count", "offsets", "scatter"]
    assert "output_operand_aliases" in calls[2]  # the scatter fills the offsets launch's outputs in place
    nch = ix.sort_chunks(T, k)
    assert f"tensor<{nch * E}xi32>" in calls[0]


def test_warm_cache_needs_neither_flydsl_nor_torch(tmp_path):
    """After a compile, a fresh process lowers the pipeline with flydsl and torch unimportable."""
    import os
    import subprocess
    import sys
    import textwrap

    shape = dict(E=4, k=2, H=160, I=96)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["flydsl"] = None  # any import of flydsl (or torch through it) fails
        sys.modules["torch"] = None
        import jax, jax.numpy as jnp, numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import moe_cases
        from jax_mxfp4_moe.rocm import backend as rocm
        shape = moe_cases.Shape("s", **{shape!r})
        w = moe_cases.make_weights(shape, gate_up="interleaved").to_layout("gfx950")
        x, tw, ti = moe_cases.make_tokens(shape, 5)
        f = jax.jit(lambda *a: moe_cases.backend_moe(rocm, *a, activation="swiglu_oai", quant="a4w4", arch="gfx950"))
        text = f.trace(x, w, tw, ti).lower(lowering_platforms=("rocm",)).as_text()
        assert text.count("jax_mxfp4_moe_launch") >= 4
        print("ok")
    """)
    # warm the cache in this process (same cache dir as the child's)
    shp = moe_cases.Shape("s", **shape)
    w = moe_cases.make_weights(shp, gate_up="interleaved").to_layout("gfx950")
    x, tw, ti = moe_cases.make_tokens(shp, 5)
    jax.jit(lambda *a: moe_cases.backend_moe(rocm, *a, activation="swiglu_oai", quant="a4w4", arch="gfx950")).trace(
        x, w, tw, ti).lower(lowering_platforms=("rocm",))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ),
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]

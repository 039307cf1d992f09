"""Resource report of the ROCm code objects: ``python -m jax_mxfp4_moe.tools.report --arch gfx950``.

Compiles (or takes from the cache) every shipped FlyDSL kernel variant for
the presets' shapes and prints, per kernel, the registers, LDS and scratch
its code object declares, the resulting waves per SIMD, and the counts of the
instructions the design relies on (scaled MFMA, bf16 atomics, non-temporal
loads).  Exit status 1 when a kernel exceeds the budgets below.

``--model`` prints instead the performance model's estimate of every
launch and of the layer on an MI355X (``rocm/perf_model.py``), for both
presets at each token count, side by side with FlyDSL upstream's own
``kernels/moe/mxfp_moe`` GEMMs when a snapshot of ROCm/FlyDSL is named
(``--flydsl PATH`` or ``$JAX_MXFP4_MOE_FLYDSL_SNAPSHOT``), with the GEMMs'
static ISA properties and the model's calibration.
"""

from __future__ import annotations

import argparse
import re
import sys

from jax_mxfp4_moe.rocm import config as rocm_config
from jax_mxfp4_moe.rocm.perf_model import HW, waves_per_simd

# Per-CU / per-SIMD limits of CDNA3/CDNA4 (gfx942/gfx950): 512 VGPRs per lane
# per SIMD shared by arch VGPRs and AGPRs (granule 8), at most 8 waves per
# SIMD, 4 SIMDs per CU; LDS per CU 160 KiB on gfx950 (64 KiB on gfx942).
# gfx950's come from the performance model's table of MI355X facts.
ARCH_LIMITS = {
    "gfx950": dict(vgprs=int(HW["vgprs"].value), granule=8, max_waves=int(HW["max_waves"].value),
                   simds=int(HW["simds"].value), lds=int(HW["lds"].value), wave=int(HW["wave"].value)),
    "gfx942": dict(vgprs=512, granule=8, max_waves=8, simds=4, lds=64 * 1024, wave=64),
}

# Budgets every shipped kernel must meet: no scratch (no spills), LDS within
# half of gfx950's 160 KiB per CU (80 KiB) so that two GEMM blocks share a
# CU, SGPRs within what a gfx9 wave addresses (102, + VCC, FLAT_SCRATCH and
# XNACK_MASK in the metadata's count: 108), and registers leaving at least 2
# waves per SIMD (128 VGPRs + AGPRs outside the GEMMs).  A GEMM's waves per
# SIMD come from its tile (``rocm.config.min_waves_per_simd``: decode tiles
# hide latency with waves, prefill tiles trade them for reuse).
BUDGETS = dict(scratch=0, vgpr_agpr=128, sgpr=108, lds=ARCH_LIMITS["gfx950"]["lds"] // 2, min_waves=2)
_BM = re.compile(r"_bm(\d+)_")

_COUNTED = {
    "mfma_scale": r"v_mfma_scale_f32_(16x16x128|32x32x64)_f8f6f4",
    "atomic_pk_add_bf16": r"global_atomic_pk_add_bf16",
    "nt_loads": r"buffer_load_\w+[^\n]*\bnt\b",
    "loads": r"buffer_load_\w+",
}


def instruction_counts(isa: str) -> dict:
    return {k: len(re.findall(p, isa)) for k, p in _COUNTED.items()}


def resources(co, arch: str = "gfx950") -> dict:
    """Register / LDS / scratch use of a compiled kernel and its occupancy."""
    md = co.metadata
    vgpr, agpr = int(md[".vgpr_count"]), int(md.get(".agpr_count", 0))
    lds = int(md[".group_segment_fixed_size"])
    waves = waves_per_simd(vgpr, agpr, lds, co.block[0] * co.block[1] * co.block[2], limits=ARCH_LIMITS[arch])
    return {
        "name": co.name,
        "vgpr": vgpr,
        "agpr": agpr,
        "sgpr": int(md[".sgpr_count"]),
        "lds": lds,
        "scratch": int(md[".private_segment_fixed_size"]),
        "waves_per_simd": waves,
        "block": co.block[0] * co.block[1] * co.block[2],
        **instruction_counts(co.isa),
    }


def budget_violations(res: dict) -> list[str]:
    from jax_mxfp4_moe.rocm import config as rocm_config

    out = []
    gemm = "_gemm" in res["name"]
    if res["scratch"] != BUDGETS["scratch"]:
        out.append(f"scratch {res['scratch']} B")
    if not gemm and res["vgpr"] + res["agpr"] > BUDGETS["vgpr_agpr"]:
        out.append(f"VGPR+AGPR {res['vgpr'] + res['agpr']} > {BUDGETS['vgpr_agpr']}")
    if res["sgpr"] > BUDGETS["sgpr"]:
        out.append(f"SGPR {res['sgpr']} > {BUDGETS['sgpr']}")
    if res["lds"] > BUDGETS["lds"]:
        out.append(f"LDS {res['lds']} > {BUDGETS['lds']}")
    need = rocm_config.min_waves_per_simd(int(_BM.search(res["name"]).group(1))) if gemm else BUDGETS["min_waves"]
    if res["waves_per_simd"] < need:
        out.append(f"{res['waves_per_simd']} waves/SIMD < {need}")
    return out


def report(arch: str = "gfx950") -> list[dict]:
    from jax_mxfp4_moe.rocm import compile as rocm_compile, config as rocm_config

    return [resources(rocm_compile.compile_kernel(m, arch=arch, **cfg), arch)
            for m, cfg in rocm_config.shipped_variants()]


def model_report(args) -> int:
    """``--model``: the performance model's report (see ``rocm/perf_model.py``)."""
    from jax_mxfp4_moe.rocm import config as rocm_config, flydsl_upstream, perf_model

    presets = args.presets.split(",") if args.presets else list(rocm_config.PRESETS)
    for name in presets:
        if name not in rocm_config.PRESETS:
            print(f"--presets: unknown preset {name!r}; known: {sorted(rocm_config.PRESETS)}",
                  file=sys.stderr)
            return 2
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        print(f"--tokens: expected comma-separated integers, got {args.tokens!r}", file=sys.stderr)
        return 2
    if any(t <= 0 for t in tokens):
        print(f"--tokens: expected positive token counts, got {args.tokens!r}", file=sys.stderr)
        return 2
    quants = args.quant.split(",")
    for q in quants:
        if q not in perf_model.QUANTS:
            print(f"--quant: expected a subset of {perf_model.QUANTS}, got {q!r}", file=sys.stderr)
            return 2
    codes = None
    calib_rows = None
    try:
        root = flydsl_upstream.locate(args.flydsl)
        variants = perf_model.flydsl_variants_for(presets, tokens, quants) + perf_model.calibration_variants()
        codes = flydsl_upstream.compile_variants(variants, root)
        note = (f"upstream kernels/moe/mxfp_moe from {root} (sources {flydsl_upstream.sources_hash(root)[:12]}), "
                "H and I padded to multiples of 256 (gpt-oss-120b at 3072); same sort/quant/glue as ours, "
                "tiles as aiter's tuned table picks them")
        if args.calibrate:
            cal, res, g1 = perf_model.calibrate(codes)
            print(f"fitted constants: {cal}")
            perf_model.CALIBRATION.update(cal)
        res = perf_model.predict_calibration(codes)
        g1 = perf_model.predict_gemm1_check(codes)
        calib_rows = ([(f"{pt.model} {pt.experts}/{pt.hidden}/{pt.inter}/{pt.top_k} M={pt.tokens}", pt.us, t)
                       for pt, t in res]
                      + [(f"(check) kimi_k2.5 gemm1 alone M={m}", perf_model.GEMM1_CHECK[m], t)
                         for m, t in g1.items()])
    except flydsl_upstream.SnapshotUnavailable as e:
        note = f"not compared: {e}"
        if args.calibrate:
            print(f"--calibrate needs a FlyDSL snapshot: {e}", file=sys.stderr)
            return 2
    rows = perf_model.model_layers(presets, tokens, quants, flydsl_codes=codes)
    kernels = []
    for preset in presets:
        for q in quants:
            for T in sorted({min(tokens), max(tokens)}):
                for launch in perf_model.ours_launches(preset, T, q):
                    if launch.stage in ("gemm1", "gemm2"):
                        kernels.append(launch.kernel)
                if codes is not None:
                    kernels += [codes[v] for v in perf_model.flydsl_gemm_variants(preset, T, q)]
    kernels = list({k.name: k for k in kernels}.values())
    perf_model.print_report(rows, flydsl_note=note, isa_kernels=kernels, calibration_rows=calib_rows)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jax_mxfp4_moe.tools.report", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=rocm_config.ARCHS[0], choices=rocm_config.ARCHS,
                   help="the architectures kernels are shipped for (default: %(default)s)")
    p.add_argument("--model", action="store_true", help="print the MI355X performance model's report")
    p.add_argument("--flydsl", default=None, help="ROCm/FlyDSL snapshot (checkout or bare git repository) to "
                   "compare against; default $JAX_MXFP4_MOE_FLYDSL_SNAPSHOT")
    p.add_argument("--presets", default="", help="comma-separated presets (default: all)")
    p.add_argument("--tokens", default=",".join(str(t) for t in (1, 8, 64, 512, 4096)))
    p.add_argument("--quant", default="a4w4,a8w4")
    p.add_argument("--calibrate", action="store_true", help="refit the model's constants first (needs --flydsl)")
    args = p.parse_args(argv)
    if args.model:
        return model_report(args)
    rows = report(args.arch)
    cols = ("vgpr", "agpr", "sgpr", "lds", "scratch", "waves_per_simd", "mfma_scale", "atomic_pk_add_bf16", "nt_loads")
    heads = ("VGPR", "AGPR", "SGPR", "LDS B", "scratch", "waves/SIMD", "scaled MFMA", "pk_add_bf16", "nt loads")
    width = max(len(r["name"]) for r in rows)
    print(f"{'kernel':<{width}}  " + "  ".join(f"{h:>11}" for h in heads) + "  budget")
    bad = 0
    for r in rows:
        v = budget_violations(r)
        bad += bool(v)
        print(f"{r['name']:<{width}}  " + "  ".join(f"{r[c]:>11}" for c in cols) + "  " + ("; ".join(v) or "ok"))
    print(f"\nbudgets: {BUDGETS}; {len(rows)} kernels, {bad} over budget")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Resource report of the ROCm code objects: ``python -m jax_mxfp4_moe.tools.report --arch gfx950``.

Compiles (or takes from the cache) every shipped FlyDSL kernel variant for
the presets' shapes and prints, per kernel, the registers, LDS and scratch
its code object declares, the resulting waves per SIMD, and the counts of the
instructions the design relies on (scaled MFMA, bf16 atomics, non-temporal
loads).  Exit status 1 when a kernel exceeds the budgets below.
"""

from __future__ import annotations

import argparse
import re
import sys

# Per-CU / per-SIMD limits of CDNA3/CDNA4 (gfx942/gfx950): 512 VGPRs per lane
# per SIMD shared by arch VGPRs and AGPRs (granule 8), at most 8 waves per
# SIMD, 4 SIMDs per CU; LDS per CU 160 KiB on gfx950 (64 KiB on gfx942).
ARCH_LIMITS = {
    "gfx950": dict(vgprs=512, granule=8, max_waves=8, simds=4, lds=160 * 1024, wave=64),
    "gfx942": dict(vgprs=512, granule=8, max_waves=8, simds=4, lds=64 * 1024, wave=64),
}

# Budgets every shipped kernel must meet: no scratch (no spills), registers
# leaving at least 4 waves per SIMD for the GEMMs (2 elsewhere), LDS within
# 64 KiB so that two GEMM blocks share a CU.
BUDGETS = dict(scratch=0, vgpr_agpr=128, sgpr=102, lds=64 * 1024, min_waves=2, gemm_min_waves=4)

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
    lim = ARCH_LIMITS[arch]
    md = co.metadata
    vgpr, agpr = int(md[".vgpr_count"]), int(md.get(".agpr_count", 0))
    # AGPRs start at the first multiple of 4 after the arch VGPRs.
    regs = (-(-vgpr // 4) * 4 + agpr) if agpr else vgpr
    alloc = max(lim["granule"], -(-regs // lim["granule"]) * lim["granule"])
    waves = min(lim["max_waves"], lim["vgprs"] // alloc)
    lds = int(md[".group_segment_fixed_size"])
    block_waves = -(-(co.block[0] * co.block[1] * co.block[2]) // lim["wave"])
    if lds:
        blocks_per_cu = lim["lds"] // lds
        waves = min(waves, blocks_per_cu * block_waves // lim["simds"])
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
    out = []
    gemm = "_gemm" in res["name"]
    if res["scratch"] != BUDGETS["scratch"]:
        out.append(f"scratch {res['scratch']} B")
    if res["vgpr"] + res["agpr"] > BUDGETS["vgpr_agpr"]:
        out.append(f"VGPR+AGPR {res['vgpr'] + res['agpr']} > {BUDGETS['vgpr_agpr']}")
    if res["sgpr"] > BUDGETS["sgpr"]:
        out.append(f"SGPR {res['sgpr']} > {BUDGETS['sgpr']}")
    if res["lds"] > BUDGETS["lds"]:
        out.append(f"LDS {res['lds']} > {BUDGETS['lds']}")
    need = BUDGETS["gemm_min_waves"] if gemm else BUDGETS["min_waves"]
    if res["waves_per_simd"] < need:
        out.append(f"{res['waves_per_simd']} waves/SIMD < {need}")
    return out


def report(arch: str = "gfx950") -> list[dict]:
    from jax_mxfp4_moe.rocm import compile as rocm_compile, config as rocm_config

    return [resources(rocm_compile.compile_kernel(m, arch=arch, **cfg), arch)
            for m, cfg in rocm_config.shipped_variants()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jax_mxfp4_moe.tools.report", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="gfx950", choices=sorted(ARCH_LIMITS))
    args = p.parse_args(argv)
    if args.arch != "gfx950":
        print(f"no kernels are shipped for {args.arch}", file=sys.stderr)
        return 2
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

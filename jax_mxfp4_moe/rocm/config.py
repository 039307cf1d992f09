"""The ROCm backend's configuration: which kernels exist, their builder
configs per pipeline stage, and the variants compiled for the presets."""

from __future__ import annotations

from jax_mxfp4_moe import spec
from jax_mxfp4_moe.numerics import sorting
from jax_mxfp4_moe.rocm import geometry as ix

ARCHS = ("gfx950",)
# Quant modes with gfx950 kernels: the scaled MFMA takes fp4 / fp8 operands
# (a16w4 would need a bf16 x fp4 MFMA, which gfx950 lacks).
QUANTS = ("a4w4", "a8w4")
SORT_BLOCK_M = ix.BM
# Non-temporal weight loads when the weights are streamed once per call:
# with few tokens each expert has about one row block, so W tiles are not
# re-read.  A rule of thumb, not a measurement (no MI355X was available).
NT_MAX_TOKENS = 64
# Presets whose kernels are compiled and checked in CI (spec.PRESETS).
PRESETS = ("gpt-oss-120b", "deepseek-v3")


def sort_config(*, num_experts, top_k, has_mask, stage="oneshot"):
    if stage not in sorting.SORT_STAGES:
        raise ValueError(f"stage: expected one of {sorting.SORT_STAGES}, got {stage!r}")
    return dict(num_experts=int(num_experts), top_k=int(top_k), block_m=SORT_BLOCK_M,
                has_mask=bool(has_mask), stage=stage)


def quant_config(*, cols, fmt, in_dtype):
    return dict(cols=int(cols), fmt=fmt, in_dtype=in_dtype)


def gemm1_config(layer: spec.LayerSpec, *, nt):
    return dict(hidden=layer.hidden, intermediate=layer.intermediate,
                num_experts=layer.num_experts, quant=layer.quant, activation=layer.activation,
                gate_up=layer.gate_up, has_bias=layer.has_b1, nt=bool(nt))


def gemm2_config(layer: spec.LayerSpec, *, nt, deterministic=False):
    cfg = dict(hidden=layer.hidden, intermediate=layer.intermediate,
               num_experts=layer.num_experts, quant=layer.quant, has_bias=layer.has_b2, nt=bool(nt))
    if deterministic:
        cfg["top_k"] = layer.top_k
    return cfg


def variants(layer: spec.LayerSpec, *, nt, in_dtype="bf16", has_mask=False):
    """{stage: (kernel module, builder config)} of one pipeline configuration."""
    Hp, _ = ix.padded_dims(layer.hidden, layer.intermediate)
    return {
        **{f"sort_{st}": ("sort", sort_config(num_experts=layer.num_experts, top_k=layer.top_k,
                                              has_mask=has_mask, stage=st))
           for st in sorting.SORT_STAGES},
        "quant": ("quant", quant_config(cols=Hp, fmt=layer.mode.act_format, in_dtype=in_dtype)),
        "gemm1": ("gemm1", gemm1_config(layer, nt=nt)),
        "gemm2": ("gemm2", gemm2_config(layer, nt=nt)),
        "gemm2_det": ("gemm2", gemm2_config(layer, nt=nt, deterministic=True)),
    }


def shipped_variants():
    """Every (module, config) compiled for the presets: both quants, cached and nt
    loads, bf16 and f32 activations, atomic and deterministic gemm2."""
    out = {}
    for name in PRESETS:
        for quant in QUANTS:
            layer = spec.PRESETS[name].replace(quant=quant)
            for nt in (False, True):
                for in_dtype in ("bf16", "f32"):
                    for mod, cfg in variants(layer, nt=nt, in_dtype=in_dtype).values():
                        out[(mod, tuple(sorted(cfg.items(), key=lambda kv: kv[0])))] = (mod, cfg)
    return list(out.values())

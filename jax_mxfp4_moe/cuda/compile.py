"""Ahead-of-time compilation of a Triton or Gluon kernel to a cubin for ffi.launch.

Works without a GPU (Triton's own ptxas) and with the Triton API common to
3.6 and 3.9: ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", arch, 32), options=...)`` (``GluonASTSource`` for a
``@gluon.jit`` kernel).

The kernels' signatures, their variants' compilation (cached on disk by
``runtime.codecache``; a process without triton runs from a ready cache) and
the launch glue live here too.

The parameter list handed to ``ffi.Kernel`` is derived from the signature
(constexprs dropped) and checked against the compiled PTX entry, whose extra
trailing u64 parameters are Triton's hidden scratch pointers (global scratch,
then profile scratch in current releases): they are passed as NULL, which is
what Triton's own launcher does when their sizes are 0. Only Gluon kernels may
need global scratch (the TMA descriptors they create on the device: 128 bytes
each per program); ``launch`` then passes a launcher workspace of that size
per program of the grid.
"""

from __future__ import annotations

import functools
import importlib
import pathlib
import re
from typing import Any, Sequence

from jax_mxfp4_moe.runtime import codecache, ffi, versions

# Triton scalar / pointer types -> ffi parameter kinds.
_SCALAR_KINDS = {"i32": "i32", "u32": "u32", "i64": "i64", "u64": "i64", "fp32": "f32"}
_KIND_BYTES = {"ptr": 8, "ptr16": 8, "null": 8, "i32": 4, "u32": 4, "i64": 8, "f32": 4}
_PTX_BYTES = {"u64": 8, "s64": 8, "b64": 8, "f64": 8, "u32": 4, "s32": 4, "b32": 4, "f32": 4,
              "u16": 2, "s16": 2, "b16": 2, "u8": 1, "s8": 1, "b8": 1}


def param_kinds(arg_names: Sequence[str], signature: dict, constexprs: dict,
                aligned: Sequence[str] = ()) -> list[str]:
    """ffi kinds of the kernel's runtime parameters, in argument order; the
    pointers named in ``aligned`` are "ptr16" (the launch checks them)."""
    kinds = []
    for name in arg_names:
        if name in constexprs:
            continue
        ty = signature.get(name)
        if ty is None:
            raise ValueError(f"signature: no type for argument {name!r} (and it is no constexpr)")
        if ty == "constexpr":
            raise ValueError(f"constexprs: argument {name!r} is constexpr but has no value")
        if ty.startswith("*"):
            kinds.append("ptr16" if name in aligned else "ptr")
        elif ty in _SCALAR_KINDS:
            kinds.append(_SCALAR_KINDS[ty])
        else:
            raise ValueError(
                f"signature[{name!r}]: type {ty!r} is not supported by the launcher; "
                f"use a pointer or one of {sorted(_SCALAR_KINDS)}")
    return kinds


def ptx_param_bytes(ptx: str, name: str) -> list[int]:
    """Byte size of each parameter of entry ``name`` in ``ptx``."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if m is None:
        raise RuntimeError(f"the PTX has no entry {name!r}")
    sizes = []
    for ty in re.findall(r"\.param\s+\.(\w+)", m.group(1)):
        if ty not in _PTX_BYTES:
            raise RuntimeError(f"entry {name!r}: unexpected PTX parameter type .{ty}")
        sizes.append(_PTX_BYTES[ty])
    return sizes


def compile_triton(fn, signature: dict, constexprs: dict, *, arch: int = 90,
                   num_warps: int = 4, num_stages: int = 3,
                   divisible_by_16: Sequence[str] = (),
                   options: dict | None = None) -> tuple[bytes, dict[str, Any]]:
    """Compiles ``fn`` (a ``@triton.jit`` function) for ``sm_{arch}`` (90 gives sm_90a).

    ``signature`` maps argument names to Triton types ("*fp32", "i32", "fp32",
    ...); ``constexprs`` maps names to compile-time values (they need no
    signature entry). ``divisible_by_16`` names pointer/int arguments the
    caller guarantees to be multiples of 16 (lets Triton vectorise).
    ``options`` go to Triton's backend (e.g. ``{"maxnreg": 128}``).
    Returns ``(cubin, meta)``; meta holds ``name``, ``num_warps``, ``shared``
    (dynamic shared memory bytes), ``block`` and ``params`` (for ffi.Kernel,
    hidden trailing NULL pointers included) and ``triton_version``.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arg_names = list(getattr(fn, "arg_names", None) or [])
    if not arg_names:
        raise TypeError(f"fn: expected a @triton.jit function, got {fn!r}")
    gluon = bool(getattr(fn, "is_gluon", lambda: False)())
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource  # noqa: F811
        if "num_warps" in arg_names:  # Gluon kernels read their warp count as a constexpr
            constexprs = {**constexprs, "num_warps": num_warps}
    if not isinstance(signature, dict) or not isinstance(constexprs, dict):
        raise TypeError("signature and constexprs: expected dicts keyed by argument name")
    for what, names in (("signature", signature), ("constexprs", constexprs),
                        ("divisible_by_16", divisible_by_16)):
        unknown = [n for n in names if n not in arg_names]
        if unknown:
            raise ValueError(f"{what}: {unknown} are not arguments of {fn.__name__} {arg_names}")
    if not isinstance(num_warps, int) or num_warps < 1 or num_warps & (num_warps - 1):
        raise ValueError(f"num_warps: expected a power of two, got {num_warps!r}")

    params = param_kinds(arg_names, signature, constexprs, aligned=divisible_by_16)
    full_signature = {n: ("constexpr" if n in constexprs else signature[n]) for n in arg_names}
    attrs = {(arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible_by_16}
    src = ASTSource(fn, full_signature, constexprs=dict(constexprs), attrs=attrs)
    # FMA contraction on, as every Triton up to 3.9 does by default (3.10
    # changes the default): one behaviour whichever version compiles.
    opts = {"enable_fp_fusion": True, **(options or {}), "num_warps": num_warps,
            "num_stages": num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)

    md = compiled.metadata
    name = md.name
    scratch = int(getattr(md, "global_scratch_size", 0) or 0)
    if getattr(md, "profile_scratch_size", 0) or (scratch and not gluon):
        raise ValueError(
            f"fn: {name} needs global scratch {scratch} / profile scratch "
            f"{getattr(md, 'profile_scratch_size', 0)}; the launcher passes NULL scratch "
            "pointers (a workspace for a Gluon kernel's global scratch)")
    if scratch and int(getattr(md, "global_scratch_align", 1)) > WORKSPACE_ALIGN:
        raise ValueError(f"fn: {name}'s global scratch needs alignment {md.global_scratch_align}")
    if getattr(md, "num_ctas", 1) != 1:
        raise ValueError(f"fn: {name} uses num_ctas={md.num_ctas}; clusters are not supported")

    sizes = ptx_param_bytes(compiled.asm["ptx"], name)
    hidden = len(sizes) - len(params)
    if hidden < 0 or [_KIND_BYTES[k] for k in params] != sizes[:len(params)] \
            or any(s != 8 for s in sizes[len(params):]):
        raise RuntimeError(
            f"{name}: PTX parameter sizes {sizes} do not match the signature's {params} "
            "followed by 8-byte hidden pointers")
    params = params + ["null"] * hidden
    if scratch:
        params[len(params) - hidden] = "ptr"  # the global scratch: a launcher workspace

    meta = {
        "name": name,
        "num_warps": int(md.num_warps),
        "shared": int(md.shared),
        "block": [32 * int(md.num_warps), 1, 1],
        "params": params,
        "arch": arch,
        "triton_version": triton.__version__,
        "global_scratch": scratch,  # bytes per program
    }
    return bytes(compiled.asm["cubin"]), meta


# ---------------------------------------------------------------------------
# Kernel variants: signatures, compilation (cached), launch
# ---------------------------------------------------------------------------

ARCH = 90  # sm_90a (Hopper: H100, H200)
# Launcher workspaces are device allocations (cuMemAlloc: 256-byte aligned).
WORKSPACE_ALIGN = 256


KERNEL_PACKAGE = "jax_mxfp4_moe.cuda.kernels"
_HERE = pathlib.Path(__file__).resolve().parent
# Every source a compiled kernel depends on (a change anywhere recompiles).
_SOURCES = (_HERE / "kernels", _HERE.parent / "spec.py")


def kernel_module(name: str):
    """The Triton kernel module ``jax_mxfp4_moe.cuda.kernels.<name>``."""
    return importlib.import_module(f"{KERNEL_PACKAGE}.{name}")


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    return codecache.sources_digest(_SOURCES)


# ---------------------------------------------------------------------------
# Kernel signatures (pointer element types are filled in per call where they vary)
# ---------------------------------------------------------------------------

_SIGNATURES = {
    ("moe_sort", "moe_sort_oneshot"): dict(
        ids_ptr="*i32", w_ptr="*fp32", mask_ptr="*i32", sid_ptr="*i32", sw_ptr="*fp32",
        sexp_ptr="*i32", nv_ptr="*i32", run_ptr="*i32", T="i32", K="i32", E="i32", P="i32",
        NB="i32"),
    ("moe_sort", "moe_sort_count"): dict(
        ids_ptr="*i32", mask_ptr="*i32", sid_ptr="*i32", sw_ptr="*fp32", counts_ptr="*i32",
        T="i32", K="i32", E="i32", P="i32", CHUNK="i32"),
    ("moe_sort", "moe_sort_offsets"): dict(
        counts_ptr="*i32", mask_ptr="*i32", sexp_ptr="*i32", nv_ptr="*i32", run_ptr="*i32",
        T="i32", E="i32", NB="i32", NCHUNK="i32"),
    ("moe_sort", "moe_sort_scatter"): dict(
        ids_ptr="*i32", w_ptr="*fp32", mask_ptr="*i32", sid_ptr="*i32", sw_ptr="*fp32",
        run_ptr="*i32", T="i32", K="i32", E="i32", CHUNK="i32"),
    ("quant", "moe_quant"): dict(
        x_ptr="*{x}", q_ptr="*u8", s_ptr="*u8", n_rows="i32", K="i32"),
    ("quant", "moe_quant_dequant"): dict(
        x_ptr="*{x}", y_ptr="*bf16", n_rows="i32", K="i32"),
    ("moe_gemm", "moe_gemm1"): dict(
        x_ptr="*{x}", w_ptr="*u8", ws_ptr="*u8", b_ptr="*fp32", sid_ptr="*i32", sexp_ptr="*i32",
        nv_ptr="*i32", out_ptr="*bf16", part_ptr="*fp32", T="i32", H="i32", I="i32", E="i32",
        TOPK="i32", swiglu_alpha="fp32", swiglu_limit="fp32"),
    ("moe_gemm", "moe_gemm2"): dict(
        inter_ptr="*bf16", w_ptr="*u8", ws_ptr="*u8", b_ptr="*fp32", sid_ptr="*i32",
        sw_ptr="*fp32", sexp_ptr="*i32", nv_ptr="*i32", y_ptr="*fp32",
        T="i32", H="i32", I="i32", E="i32", TOPK="i32"),
    ("moe_decode", "moe_decode"): dict(
        x_ptr="*{x}", w1_ptr="*u8", w1s_ptr="*u8", b1_ptr="*fp32", w2_ptr="*u8", w2s_ptr="*u8",
        b2_ptr="*fp32", ids_ptr="*i32", tw_ptr="*fp32", inter_ptr="*bf16", scratch_ptr="*fp32",
        out_ptr="*{out}", T="i32", H="i32", I="i32", E="i32", TOPK="i32", grid_m="i32",
        cnt1_off="i32", y_off="i32", cnt2_off="i32", sync_off="i32", swiglu_alpha="fp32",
        swiglu_limit="fp32"),
    ("probes", "stream_read"): dict(x_ptr="*fp32", out_ptr="*fp32", n="i32"),
    ("probes", "matmul_bf16"): dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*bf16", M="i32", N="i32",
                                    K="i32"),
    ("moe_gather", "moe_gather"): dict(
        x_ptr="*{x}", sid_ptr="*i32", nv_ptr="*i32", out_ptr="*bf16", T="i32", H="i32", P="i32"),
    ("moe_wgmma", "moe_wgmma_gemm1"): dict(
        x_ptr="*bf16", w_ptr="*u8", ws_ptr="*u8", b_ptr="*fp32", sid_ptr="*i32", sexp_ptr="*i32",
        nv_ptr="*i32", out_ptr="*bf16", P="i32", H="i32", I="i32", E="i32", swiglu_alpha="fp32",
        swiglu_limit="fp32"),
    ("moe_wgmma", "moe_wgmma_gemm2"): dict(
        inter_ptr="*bf16", w_ptr="*u8", ws_ptr="*u8", b_ptr="*fp32", sid_ptr="*i32",
        sw_ptr="*fp32", sexp_ptr="*i32", nv_ptr="*i32", y_ptr="*fp32", P="i32", T="i32", H="i32",
        I="i32", E="i32", TOPK="i32"),
    ("moe_gmm", "moe_gmm"): dict(
        a_ptr="*bf16", be_ptr="*i32", w_ptr="*u8", ws_ptr="*u8", out_ptr="*fp32", N_W="i32",
        K_W="i32"),
    ("moe_gmm_wgmma", "moe_gmm_wgmma"): dict(
        a_ptr="*bf16", be_ptr="*i32", order_ptr="*i32", nlive_ptr="*i32", w_ptr="*u8",
        ws_ptr="*u8", out_ptr="*fp32", P="i32", NB="i32", N_W="i32", K_W="i32", E="i32"),
}

# Integer arguments that are multiples of 16 by the input contract (H and I
# are multiples of the MX block, 32): with every pointer (XLA buffers are
# 16-byte aligned; the launcher checks), they are compiled as divisible by 16.
_MULTIPLES_OF_16 = {
    ("quant", "moe_quant"): ("K",),
    ("quant", "moe_quant_dequant"): ("K",),
    ("moe_gemm", "moe_gemm1"): ("H", "I"),
    ("moe_gemm", "moe_gemm2"): ("H", "I"),
    ("moe_decode", "moe_decode"): ("H", "I", "cnt1_off", "y_off", "cnt2_off", "sync_off"),
    ("moe_gather", "moe_gather"): ("H",),
    ("probes", "stream_read"): ("n",),
    ("probes", "matmul_bf16"): ("M", "N", "K"),
    ("moe_wgmma", "moe_wgmma_gemm1"): ("H", "I"),
    ("moe_wgmma", "moe_wgmma_gemm2"): ("H", "I"),
    ("moe_gmm", "moe_gmm"): ("N_W", "K_W"),
    ("moe_gmm_wgmma", "moe_gmm_wgmma"): ("P", "N_W", "K_W"),
}

TRITON_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _triton_version() -> str | None:
    try:
        from importlib.metadata import version
        found = version("triton")
    except Exception:  # not installed: only a ready cache can serve
        return None
    versions.check("triton", found, backend="cuda")  # once per process: untested versions
    versions.check_jax(backend="cuda")
    return found


@functools.lru_cache(maxsize=None)
def get_kernel(module: str, name: str, constexprs: tuple, num_warps: int, num_stages: int,
               x_dtype: str = "bf16", out_dtype: str = "bf16", maxnreg: int | None = None):
    """ffi.Kernel for one compiled variant; constexprs as sorted (name, value) pairs;
    maxnreg caps the registers per thread (ptxas)."""
    signature = {k: v.format(x=x_dtype, out=out_dtype)
                 for k, v in _SIGNATURES[(module, name)].items()}
    consts = dict(constexprs)
    aligned = tuple(n for n, ty in signature.items() if ty.startswith("*")) \
        + _MULTIPLES_OF_16.get((module, name), ())
    key = dict(kernel=f"{module}.{name}", source=source_hash(), signature=signature,
               constexprs=consts, arch=ARCH, num_warps=num_warps, num_stages=num_stages,
               divisible_by_16=aligned)
    options = None if maxnreg is None else {"maxnreg": maxnreg}
    if options:
        key["options"] = options

    def build():
        fn = getattr(kernel_module(module), name)
        # codecache logs the compile time of each variant at INFO.
        return compile_triton(fn, signature, consts, arch=ARCH, num_warps=num_warps,
                              num_stages=num_stages, divisible_by_16=aligned, options=options)

    code_hash, meta = _cached(key, build)
    _GLOBAL_SCRATCH[code_hash] = int(meta.get("global_scratch", 0))
    return ffi.Kernel(code_hash, meta["name"], block=(32 * meta["num_warps"], 1, 1),
                      shared_mem=meta["shared"], params=tuple(meta["params"]))


# Global scratch bytes per program of each compiled kernel (by code hash).
_GLOBAL_SCRATCH: dict[str, int] = {}


def _cached(key: dict, build):
    """ffi.cached_compile keyed on the triton version that compiles; the
    result is also filed under a version-free key, which is what a process
    without triton finds (a ready cache then runs with no compiler)."""
    any_version = dict(key, compiler="triton (any version)")
    version = _triton_version()
    if version is None:
        def no_compiler():
            raise RuntimeError(
                f"{key['kernel']} {key['constexprs']}: not in the code cache "
                f"({codecache.cache_dir()}) and triton is not installed to compile it")
        return ffi.cached_compile(any_version, no_compiler)
    code_hash, meta = ffi.cached_compile(dict(key, compiler=f"triton {version}"), build)
    codecache.cached_compile(any_version, lambda: (codecache.load_code_object(code_hash), meta))
    return code_hash, meta


def launch(kern, grid, args, out_types, **kwargs):
    """ffi.launch with Triton's hidden trailing scratch pointers passed as NULL,
    but for a kernel that needs global scratch (a Gluon kernel's TMA
    descriptors): a launcher workspace of that many bytes per program. Such a
    kernel writes its descriptors before it reads them, so it needs the
    memory's contents neither zero nor kept: the workspace only spares an
    allocation per launch (and is the launch site's alone)."""
    hidden = [None] * (len(kern.params) - len(args))
    per_program = _GLOBAL_SCRATCH.get(kern.code_hash, 0)
    if per_program:
        programs = 1
        for g in grid:
            programs *= g
        hidden[0] = ffi.Workspace(per_program * programs)
    return ffi.launch(kern, grid, list(args) + hidden, out_types, **kwargs)


def kernel(module: str, name: str, *, num_warps: int, num_stages: int = 1, x_dtype="bf16",
           out_dtype="bf16", maxnreg=None, **constexprs):
    return get_kernel(module, name, tuple(sorted(constexprs.items())), num_warps, num_stages,
                      x_dtype, out_dtype, maxnreg)



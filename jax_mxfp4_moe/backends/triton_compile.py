"""Ahead-of-time compilation of a Triton kernel to a cubin for ffi.launch.

Works without a GPU (Triton's own ptxas) and with the Triton API common to
3.6 and 3.9: ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", arch, 32), options=...)``.

The parameter list handed to ``ffi.Kernel`` is derived from the signature
(constexprs dropped) and checked against the compiled PTX entry, whose extra
trailing u64 parameters are Triton's hidden scratch pointers (global scratch,
then profile scratch in current releases): they are passed as NULL, which is
what Triton's own launcher does when their sizes are 0.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

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
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(md, field, 0):
            raise ValueError(
                f"fn: {name} needs {field}={getattr(md, field)}; the launcher passes NULL "
                "scratch pointers only")
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

    meta = {
        "name": name,
        "num_warps": int(md.num_warps),
        "shared": int(md.shared),
        "block": [32 * int(md.num_warps), 1, 1],
        "params": params,
        "arch": arch,
        "triton_version": triton.__version__,
    }
    return bytes(compiled.asm["cubin"]), meta

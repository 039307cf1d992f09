"""Runs the CUDA backend's host code (backends/cuda.py: configs, launch
arguments, scratch, aliasing) with every kernel launch executed by triton's
interpreter on CPU, for the tests in test_cuda_interpreted.py.

Import this module only in a process that set TRITON_INTERPRET=1 before
triton was imported: triton decides at a kernel's definition whether it is
interpreted. `install()` swaps cuda.kernel / cuda.launch for interpreted
ones. Inline PTX cannot be interpreted: the decode upcast's function
(mx_dot_even_odd) is replaced by plain Triton arithmetic with the same
results (the PTX text itself is checked by test_triton_asm.py), and the
poll loop (wait_at_least) by volatile loads and an acquiring atomic;
everything else runs as written.

Launch results that the launch does not zero start as 0xAB bytes, so a
kernel that leaves part of a result unwritten shows up. A workspace
(ffi.Workspace) persists across launches of the same kernel, as the real
launcher's does, and must be all zero again after every launch (checked).
"""

import importlib
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
import triton
import triton.language as tl

# triton's interpreter runs loop indices as Python ints, and its tl.constexpr
# has no __rmod__, so int % constexpr (addressing.step_offset's K steps past
# a tile) fails there while the compiler folds it: give it one.
if not hasattr(tl.constexpr, "__rmod__"):
    tl.constexpr.__rmod__ = lambda self, other: tl.constexpr(other % self.value)

from jax_mxfp4_moe.runtime import ffi
from jax_mxfp4_moe.cuda import backend as cuda, compile as cuda_compile, config as cuda_config

_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.int32): torch.int32,
          np.dtype(np.uint8): torch.uint8, np.dtype(np.float16): torch.float16}


def _to_torch(a):
    a = np.asarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _to_jax(t, dtype):
    if t.dtype == torch.bfloat16:
        return jnp.asarray(t.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
    return jnp.asarray(t.numpy().astype(dtype))


def _empty(sds, zero):
    dtype = np.dtype(sds.dtype)
    n = int(np.prod(sds.shape)) * dtype.itemsize
    raw = torch.zeros(n, dtype=torch.uint8) if zero else torch.full((n,), 0xAB, dtype=torch.uint8)
    if dtype == ml_dtypes.bfloat16:
        return raw.view(torch.bfloat16).reshape(sds.shape)
    return raw.view(_TORCH[dtype]).reshape(sds.shape)


class _Kernel:
    def __init__(self, module, name, num_warps, constexprs):
        self.fn = getattr(importlib.import_module(
            f"{cuda_compile.KERNEL_PACKAGE}.{module}"), name)
        self.num_warps, self.constexprs = num_warps, constexprs


def _kernel(module, name, *, num_warps, num_stages=1, x_dtype="bf16", out_dtype="bf16",
            **constexprs):
    return _Kernel(module, name, num_warps, constexprs)


# Workspaces by (kernel, bytes): zeroed once, kept across launches.
_WORKSPACES = {}


class DirtyWorkspace(AssertionError):
    pass


def _launch(kern, grid, args, out_types, *, zero_outputs=(), input_output_aliases=None,
            name=None):
    aliases = input_output_aliases or {}
    outs = [_empty(o, i in zero_outputs) for i, o in enumerate(out_types)]
    operands = [a for a in args
                if not isinstance(a, (ffi.Out, ffi.Workspace, int, float, type(None)))]
    workspaces = [_WORKSPACES.setdefault((kern.fn.__name__, a.nbytes),
                                         torch.zeros(a.nbytes // 4, dtype=torch.float32))
                  for a in args if isinstance(a, ffi.Workspace)]
    for o, r in aliases.items():  # in place: the result starts as the operand
        outs[r] = _to_torch(operands[o])
    call, k = [], 0
    for a in args:
        if isinstance(a, ffi.Out):
            call.append(outs[a.index])
        elif isinstance(a, ffi.Workspace):
            call.append(workspaces[0])
        elif a is None:  # a NULL pointer the kernel never dereferences (it may offset it)
            call.append(torch.empty(0, dtype=torch.float32))
        elif isinstance(a, (int, float)):
            call.append(a)
        else:
            aliased = [r for o, r in aliases.items() if o == k]
            call.append(outs[aliased[0]] if aliased else _to_torch(a))
            k += 1
    kern.fn[tuple(grid)](*call, **kern.constexprs, num_warps=kern.num_warps)
    for ws in workspaces:
        if torch.count_nonzero(ws.view(torch.int32)):
            raise DirtyWorkspace(f"{kern.fn.__name__} left "
                                 f"{int(torch.count_nonzero(ws.view(torch.int32)))} "
                                 "workspace words nonzero")
    return [_to_jax(t, o.dtype) for t, o in zip(outs, out_types)]


def _kernels(module):
    return importlib.import_module(f"{cuda_compile.KERNEL_PACKAGE}.{module}")


@triton.jit
def _e2m1_value(code):
    mag = code & 7
    e = mag >> 1
    m = (mag & 1).to(tl.float32)
    v = tl.where(e == 0, m * 0.5, tl.exp2((e - 1).to(tl.float32)) * (1.0 + m * 0.5))
    return tl.where((code & 8) != 0, -v, v)


@triton.jit
def _mx_dot_even_odd(acc, xe, xo, w, ws, FOLD: tl.constexpr):
    """gemm_loop.mx_dot_even_odd with its inline PTX (fp4 pair upcast, E8M0
    scale, its documented edges without FOLD: byte 0 -> 0, 255 -> inf; with
    FOLD every byte is <= 128 and exact) as plain Triton, and
    the multiplies and dots in f32: triton 3.9's interpreter gets bf16
    products wrong (tl.dot of two bf16 tiles too). The operands are exact in
    either type and the MMA accumulates in f32, so the results agree up to
    the order of the sum."""
    R: tl.constexpr = w.shape[0]
    C: tl.constexpr = w.shape[1]
    c = w.to(tl.int32)
    b = ws.to(tl.int32)
    s = tl.exp2((b - 127).to(tl.float32))
    if not FOLD:
        s = tl.where(b == 0, 0.0, tl.where(b == 255, float("inf"), s))
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (R, C // 16, 16)), (R, C))
    acc = tl.dot(_e2m1_value(c & 15) * s, tl.trans(xe).to(tl.float32), acc)
    acc = tl.dot(_e2m1_value(c >> 4) * s, tl.trans(xo).to(tl.float32), acc)
    return acc


@triton.jit
def _mx_dot_columns(acc_even, acc_odd, a, w, ws, FOLD: tl.constexpr):
    """moe_gmm.mx_dot_columns with its inline PTX as plain Triton and the
    dots in f32 (as _mx_dot_even_odd, and for the same reasons)."""
    R: tl.constexpr = w.shape[0]
    C: tl.constexpr = w.shape[1]
    c = w.to(tl.int32)
    b = ws.to(tl.int32)
    s = tl.exp2((b - 127).to(tl.float32))
    if not FOLD:
        s = tl.where(b == 0, 0.0, tl.where(b == 255, float("inf"), s))
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (R, C // 16, 16)), (R, C))
    acc_even = tl.dot(a.to(tl.float32), _e2m1_value(c & 15) * s, acc_even)
    acc_odd = tl.dot(a.to(tl.float32), _e2m1_value(c >> 4) * s, acc_odd)
    return acc_even, acc_odd


@triton.jit
def _wait_at_least(ptr, target):
    """moe_decode.wait_at_least without its PTX: poll, then acquire."""
    c = tl.load(ptr, volatile=True)
    while c < target:
        c = tl.load(ptr, volatile=True)
    return tl.atomic_add(ptr, 0, sem="acquire")


def install():
    """Route cuda.moe's launches through triton's interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("set TRITON_INTERPRET=1 before importing triton")
    cuda.kernel = _kernel
    cuda.launch = _launch
    _kernels("gemm_loop").mx_dot_even_odd = _mx_dot_even_odd
    _kernels("moe_decode").wait_at_least = _wait_at_least
    _kernels("moe_gmm").mx_dot_columns = _mx_dot_columns
    cuda_config.GMM_WGMMA_KERNELS = False  # Gluon kernels do not run in the interpreter


def _weights(c):
    """moe_cases' weights; "scale_max": "unknown" drops the recorded largest
    scale byte (the kernels then keep the 2**126 factor out of the scales)."""
    import dataclasses

    import moe_cases

    w = moe_cases.make_weights(getattr(moe_cases, c["shape"]), gate_up=c["gate_up"],
                               bias=c["bias"], layout=c.get("layout", "canonical"))
    return dataclasses.replace(w, scale_max=None) if c.get("scale_max") == "unknown" else w


def _run_moe(c):
    import dataclasses

    import moe_cases

    shape = getattr(moe_cases, c["shape"])
    w = _weights(c)
    x, tw, ids = moe_cases.make_tokens(shape, c["T"], seed=c["seed"],
                                       dtype=getattr(jnp, c["dtype"]))
    if c.get("ids") is not None:
        ids = jnp.asarray(c["ids"], jnp.int32)
    _, bm, g1, g2, warps, *_ = cuda_config._REGIMES[c["regime"]]
    cfg = cuda_config.MoEConfig(bm, dataclasses.replace(g1, split_k=c["split"]),
                                 dataclasses.replace(g2, split_k=c["split"]), warps)
    cuda.choose_config = lambda *a, cfg=cfg, **k: cfg
    y = moe_cases.backend_moe(cuda, x, w, tw, ids, activation=c["activation"], quant=c["quant"],
                 deterministic=c["deterministic"])
    return dict(y=np.asarray(y.astype(jnp.float32)), dtype=np.asarray(str(y.dtype)))


def _run_gmm(c):
    import moe_cases

    w, lhs, be = moe_cases.gmm_problem(
        getattr(moe_cases, c["shape"]), which=c["which"], transpose=c["transpose"],
        layout=c["layout"], block_m=c["BM"], experts=c["experts"], seed=c["seed"],
        scale_max=c.get("scale_max") != "unknown")
    out = cuda.gmm(jnp.asarray(lhs), jnp.asarray(be), getattr(w, c["which"]),
                   getattr(w, c["which"] + "_scale"),
                   **moe_cases.gmm_params(w, which=c["which"], transpose=c["transpose"],
                                          block_m=c["BM"]))
    return dict(out=np.asarray(out))


def _run_sort(c):
    rng = np.random.default_rng(c["seed"])
    ids = rng.integers(-2, c["E"] + 2, (c["T"], c["k"])).astype(np.int32)
    tw = rng.random((c["T"], c["k"])).astype(np.float32)
    mask = None if not c["mask"] else jnp.asarray(rng.random(c["E"]) < 0.5)
    res = cuda.sort(jnp.asarray(ids), jnp.asarray(tw), num_experts=c["E"], block_m=c["BM"],
                    expert_mask=mask)
    out = {name: np.asarray(a) for name, a in zip(("sid", "sw", "sexp", "nv"), res)}
    out.update(ids=ids, tw=tw)
    if mask is not None:
        out["mask"] = np.asarray(mask)
    return out


@triton.jit
def _rows_probe(ids_ptr, tw_ptr, out_ptr, w_ptr, T, K, E, BM: tl.constexpr, NMAX: tl.constexpr):
    """Stores what routing.direct_rows gives program (0, m): rows, tok,
    slot, row_ok (BM each), expert, blocks in use; and the row weights."""
    rows, tok, slot, row_ok, expert, wgt, live = _kernels("routing").direct_rows(
        ids_ptr, tw_ptr, T, K, E, tl.program_id(1), BM, NMAX)
    r = tl.arange(0, BM)
    base = out_ptr + tl.program_id(1) * (4 * BM + 2)
    tl.store(base + r, rows)
    tl.store(base + BM + r, tok)
    tl.store(base + 2 * BM + r, slot)
    tl.store(base + 3 * BM + r, row_ok.to(tl.int32))
    tl.store(base + 4 * BM, expert)
    tl.store(base + 4 * BM + 1, live)
    tl.store(w_ptr + tl.program_id(1) * BM + r, wgt)


def _run_rows(c):
    ids, tw = np.asarray(c["ids"], np.int32), np.asarray(c["tw"], np.float32)
    T, K = ids.shape
    BM, programs = c["BM"], c["programs"]
    out = torch.zeros(programs * (4 * BM + 2), dtype=torch.int32)
    w = torch.zeros(programs * BM, dtype=torch.float32)
    _rows_probe[(1, programs, 1)](torch.from_numpy(ids), torch.from_numpy(tw), out, w, T, K,
                                  c["E"], BM=BM, NMAX=cuda.direct_entries(T * K))
    return dict(out=out.reshape(programs, 4 * BM + 2).numpy(), w=w.reshape(programs, BM).numpy())


_RUNS = {"moe": _run_moe, "sort": _run_sort, "rows": _run_rows, "gmm": _run_gmm}


def main(cases_json: str, out_path: str):
    """Runs each case ("moe": cuda.moe on moe_cases shapes with a config
    regime and split-K forced; "sort": cuda.sort on random ids; "rows": the
    decode gemms' own routing, _direct_rows, for given ids) and saves its
    arrays as "<case index>/<name>"."""
    import json

    install()
    results = {}
    for i, c in enumerate(json.loads(cases_json)):
        for name, a in _RUNS[c["kind"]](c).items():
            results[f"{i}/{name}"] = a
    np.savez(out_path, **results)


if __name__ == "__main__":
    import sys
    main(sys.stdin.read(), sys.argv[1])

"""The Triton kernels of the CUDA backend: signatures, compilation to cubin
(cached on disk), and the block-configuration table.

Compilation needs triton (imported lazily); a populated code cache does not.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import math
import pathlib

ARCH = 90  # sm_90a (Hopper: H100, H200)


def kernel_modules():
    """The kernel source package: installed as jax_mxfp4_moe.kernels.triton,
    or the repository's top-level kernels/triton when running from a checkout."""
    try:
        return importlib.import_module("jax_mxfp4_moe.kernels.triton")
    except ImportError:
        return importlib.import_module("kernels.triton")


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """sha256 over every kernel source file (a change anywhere recompiles)."""
    folder = pathlib.Path(kernel_modules().__file__).parent
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Kernel signatures (pointer element types are filled in per call where they vary)
# ---------------------------------------------------------------------------

_SIGNATURES = {
    ("moe_sort", "moe_sort_one"): dict(
        ids_ptr="*i32", w_ptr="*fp32", mask_ptr="*i32", sid_ptr="*i32", sw_ptr="*fp32",
        sexp_ptr="*i32", nv_ptr="*i32", run_ptr="*i32", T="i32", K="i32", E="i32", P="i32",
        NB="i32"),
    ("moe_sort", "moe_sort_count"): dict(
        ids_ptr="*i32", mask_ptr="*i32", sid_ptr="*i32", sw_ptr="*fp32", counts_ptr="*i32",
        T="i32", K="i32", E="i32", P="i32", CHUNK="i32"),
    ("moe_sort", "moe_sort_layout"): dict(
        counts_ptr="*i32", mask_ptr="*i32", sexp_ptr="*i32", nv_ptr="*i32", run_ptr="*i32",
        T="i32", E="i32", NB="i32", NCHUNK="i32"),
    ("moe_sort", "moe_sort_scatter"): dict(
        ids_ptr="*i32", w_ptr="*fp32", mask_ptr="*i32", sid_ptr="*i32", sw_ptr="*fp32",
        run_ptr="*i32", T="i32", K="i32", E="i32", CHUNK="i32"),
    ("mx_quant", "mx_quant"): dict(
        x_ptr="*{x}", q_ptr="*u8", s_ptr="*u8", n_rows="i32", K="i32"),
    ("mx_quant", "mx_quant_dequant"): dict(
        x_ptr="*{x}", y_ptr="*bf16", n_rows="i32", K="i32"),
    ("moe_gemm", "moe_gemm1"): dict(
        x_ptr="*{x}", w_ptr="*u8", ws_ptr="*u8", b_ptr="*fp32", sid_ptr="*i32", sexp_ptr="*i32",
        nv_ptr="*i32", out_ptr="*bf16", part_ptr="*fp32", T="i32", H="i32", I="i32", E="i32",
        TOPK="i32", swiglu_alpha="fp32", swiglu_limit="fp32"),
    ("moe_gemm", "moe_gemm2"): dict(
        inter_ptr="*bf16", w_ptr="*u8", ws_ptr="*u8", b_ptr="*fp32", sid_ptr="*i32",
        sw_ptr="*fp32", sexp_ptr="*i32", nv_ptr="*i32", y_ptr="*fp32",
        T="i32", H="i32", I="i32", E="i32", TOPK="i32"),
    ("moe_gemm", "moe_decode"): dict(
        x_ptr="*{x}", w1_ptr="*u8", w1s_ptr="*u8", b1_ptr="*fp32", w2_ptr="*u8", w2s_ptr="*u8",
        b2_ptr="*fp32", ids_ptr="*i32", tw_ptr="*fp32", inter_ptr="*bf16", scratch_ptr="*fp32",
        out_ptr="*{out}", T="i32", H="i32", I="i32", E="i32", TOPK="i32", grid_m="i32",
        cnt1_off="i32", y_off="i32", cnt2_off="i32", sync_off="i32", swiglu_alpha="fp32",
        swiglu_limit="fp32"),
}

# Integer arguments that are multiples of 16 by the input contract (H and I
# are multiples of the MX block, 32): with every pointer (XLA buffers are
# 16-byte aligned; the launcher checks), they are compiled as divisible by 16.
_MULTIPLES_OF_16 = {
    ("mx_quant", "mx_quant"): ("K",),
    ("mx_quant", "mx_quant_dequant"): ("K",),
    ("moe_gemm", "moe_gemm1"): ("H", "I"),
    ("moe_gemm", "moe_gemm2"): ("H", "I"),
    ("moe_gemm", "moe_decode"): ("H", "I", "cnt1_off", "y_off", "cnt2_off", "sync_off"),
}

TRITON_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _triton_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("triton")
    except Exception:  # not installed: only a ready cache can serve
        return None


@functools.lru_cache(maxsize=None)
def get_kernel(module: str, name: str, constexprs: tuple, num_warps: int, num_stages: int,
               x_dtype: str = "bf16", out_dtype: str = "bf16", maxnreg: int | None = None):
    """ffi.Kernel for one compiled variant; constexprs as sorted (name, value) pairs;
    maxnreg caps the registers per thread (ptxas)."""
    from .. import ffi

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
        from .triton_compile import compile_triton
        fn = getattr(importlib.import_module(f"{kernel_modules().__name__}.{module}"), name)
        # codecache logs the compile time of each variant at INFO.
        return compile_triton(fn, signature, consts, arch=ARCH, num_warps=num_warps,
                              num_stages=num_stages, divisible_by_16=aligned, options=options)

    code_hash, meta = _cached(key, build)
    return ffi.Kernel(code_hash, meta["name"], block=(32 * meta["num_warps"], 1, 1),
                      shared_mem=meta["shared"], params=tuple(meta["params"]))


def _cached(key: dict, build):
    """codecache.cached_compile keyed on the triton version that compiles; the
    result is also filed under a version-free key, which is what a process
    without triton finds (a ready cache then runs with no compiler)."""
    from .. import codecache

    any_version = dict(key, compiler="triton (any version)")
    version = _triton_version()
    if version is None:
        def no_compiler():
            raise RuntimeError(
                f"{key['kernel']} {key['constexprs']}: not in the code cache "
                f"({codecache.cache_dir()}) and triton is not installed to compile it")
        return codecache.cached_compile(any_version, no_compiler)
    code_hash, meta = codecache.cached_compile(dict(key, compiler=f"triton {version}"), build)
    codecache.cached_compile(any_version, lambda: (codecache.load_code_object(code_hash), meta))
    return code_hash, meta


def launch(kern, grid, args, out_types, **kwargs):
    """ffi.launch with Triton's hidden trailing scratch pointers passed as NULL."""
    from .. import ffi

    args = list(args) + [None] * (len(kern.params) - len(args))
    return ffi.launch(kern, grid, args, out_types, **kwargs)


def kernel(module: str, name: str, *, num_warps: int, num_stages: int = 1, x_dtype="bf16",
           out_dtype="bf16", maxnreg=None, **constexprs):
    return get_kernel(module, name, tuple(sorted(constexprs.items())), num_warps, num_stages,
                      x_dtype, out_dtype, maxnreg)


# ---------------------------------------------------------------------------
# Block configurations: the one heuristic table
# ---------------------------------------------------------------------------

NUM_SMS = 132  # H100 SXM / H200; used only to size split-K

# Sort: one program up to this many (token, slot) entries, else chunked
# (sort_chunk). A program places its entries 128 at a time, one batch after
# another (~5 us each on an H100: moe_sort_one took 90 us at 2048 entries).
SORT_ONE_MAX = 512
SORT_LAYOUT_GROUP = 8  # chunk histograms per load in moe_sort_layout


def sort_chunk(n: int) -> int:
    """Entries per program of the chunked sort of n entries: a power of two
    from 256 up, so that ~32 programs share the work."""
    return max(256, 1 << (-(-n // 32) - 1).bit_length())


# Decode: up to this many (token, slot) entries (and no expert mask), the gemm
# kernels derive their blocks from topk_ids themselves (DIRECT: no sort
# launch), gemm1 zeroes gemm2's accumulator (no memset) and gemm2's last
# program per column tile writes the output dtype (no cast launch). Every
# program recomputes the routing with O((T*k)^2) compares: at 64 entries that
# was ~2,800 SASS instructions per program, a fair share of a decode loop.
DIRECT_MAX = 32

# moe_gemm's FOLD (the 2**126 of the raw E2M1 bits carried by the scale,
# 2**(byte - 1) as a bf16) needs every scale byte <= this.
FOLD_MAX_SCALE_BYTE = 128


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_n: int      # gemm1: intermediate columns (2x W1 rows); gemm2: H columns
    block_k: int
    swap: int         # operand order / upcast, kernels/triton/moe_gemm.py SWAP:
                      # 0 tokens on the MMA's M side; 1, 2 weight rows on it (small BM)
    num_warps: int
    num_stages: int   # triton's software pipeline depth (cp.async copies in flight)
    split_k: int = 1  # set by choose_config
    fuse_x_quant: bool = True  # gemm1 only: MX-quantise A as it loads (else a pre-pass)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    block_m: int
    gemm1: GemmConfig
    gemm2: GemmConfig
    # Warps per SM the decode regimes aim for: split-K sizes the grid to it,
    # and moe_decode (both gemms in one kernel) is capped at the registers
    # that let that many warps fit (decode_maxnreg).
    warps_per_sm: int = 12

    @property
    def decode_maxnreg(self) -> int:
        return decode_maxnreg(self.warps_per_sm)


def decode_maxnreg(warps_per_sm: int) -> int:
    """Registers per thread at which warps_per_sm warps fit an SM's 64K in
    total (its sub-partitions may hold fewer: programs_per_sm)."""
    return 65536 // (warps_per_sm * 32) // 8 * 8


def programs_per_sm(maxnreg: int, num_warps: int) -> int:
    """CTAs of num_warps warps at maxnreg registers per thread that one
    Hopper SM holds by registers: each of its 4 sub-partitions has 16K,
    handed out 256 per warp at a time (112 registers: 4 warps each, so 8
    2-warp CTAs, as Nsight Compute reports)."""
    per_warp = -(-maxnreg * 32 // 256) * 256
    return 4 * (16384 // per_warp) // num_warps


def gemm1_slice_steps(steps: int, split: int, programs: int, slots: int) -> int:
    """K steps per gemm1 slice in moe_decode (0: equal slices). When the
    programs outnumber the slots the last ones start only as the first end:
    the last slice (theirs, in ticket order) then takes about 0.6 of a
    slice, so that they end with the others (gpt-oss-120b T=1: 9, 9, 4.5
    steps instead of 8, 8, 6.5)."""
    if split < 2 or programs <= slots:
        return 0
    s = -(-5 * steps // (5 * split - 2))
    return s if (split - 1) * s < steps else 0


# Regimes by rows per expert r = T*k/E (routing is unknown at trace time; this
# is the balanced expectation), from sweeps on an H100 (bench/sweep.py,
# bench/NOTES.md). Small r streams weights (memory bound): weight rows on the
# MMA's M side (SWAP=2: the cheap elementwise fp4 upcast), token blocks of
# 8-64 rows (8 is one mma.sync n8 tile: at r <= 2 a block rarely holds more,
# and the smaller x operand takes a tenth of the decode loop's instructions
# and ~40 registers off), 2-warp mma.sync tiles (a 4-warp wgmma tile waits on
# shared memory: ~2x slower at T=8) and split-K sized so that every SM holds
# about warps_per_sm warps of weight streams (a program's K step is bound by
# its own instruction latency, so more programs per SM stream more; too many
# K slices cost partial sums, too few leave SMs with fewer programs). Large r
# is compute bound: 128 token rows x 128 W rows per 4-warp CTA, triton's
# dot_scaled upcast. In the MX modes x is quantised once by a pre-pass rather
# than once per N tile in gemm1's loop (which costs as much as the weight
# upcast at BM=16, and spills with split-K). Every loop is software-pipelined
# 3 deep (cp.async). The 8-row regime aims for 18 warps per SM: moe_decode
# capped at 112 registers (no spills in its K loops), of which an H100 runs
# 8 programs per SM (bench/trace_decode.py), with split-K sized for 9; that
# sizing measured best (gpt-oss-120b and deepseek-v3 at T=1, bench/NOTES.md).
_REGIMES = (
    # (max rows per expert, BM, gemm1, gemm2, warps per SM)
    (2, 8, GemmConfig(32, 128, 2, 2, 3, fuse_x_quant=False), GemmConfig(64, 128, 2, 2, 3), 18),
    (16, 16, GemmConfig(32, 128, 2, 2, 3, fuse_x_quant=False), GemmConfig(64, 128, 2, 2, 3),
     12),
    (32, 32, GemmConfig(32, 128, 2, 2, 3, fuse_x_quant=False), GemmConfig(64, 128, 2, 2, 3),
     12),
    (64, 64, GemmConfig(32, 128, 2, 4, 3, fuse_x_quant=False), GemmConfig(64, 128, 2, 4, 3),
     12),
    (math.inf, 128, GemmConfig(64, 64, 0, 4, 3, fuse_x_quant=False),
     GemmConfig(128, 64, 0, 4, 3), 12),
)


def _split_k(ctas: int, cfg: GemmConfig, K: int, warps_per_sm: int) -> int:
    """K slices per tile so that about warps_per_sm warps per SM run, each
    slice keeping >= 4 K steps; 1 when the grid is already big enough."""
    target = NUM_SMS * warps_per_sm // cfg.num_warps
    return max(1, min(8, target // max(ctas, 1), K // cfg.block_k // 4))


def choose_config(T: int, k: int, E: int, H: int, I: int, *, deterministic: bool,
                  direct: bool = False) -> MoEConfig:
    """The block configuration for a layer call; direct: the kernels route
    from topk_ids themselves (no sort), which 8-row blocks need (the sort
    contract's blocks are sorting.BLOCK_SIZES rows)."""
    from .. import sorting

    rows_per_expert = T * k / max(E, 1)
    for max_rows, bm, g1, g2, warps in _REGIMES:
        if rows_per_expert <= max_rows and (direct or bm in sorting.BLOCK_SIZES):
            break
    # Split-K adds partial sums atomically (in no fixed order): not when the
    # caller asks for a deterministic result.
    if not deterministic:
        blocks = min(E, T * k) + T * k // bm  # expected active row blocks
        g1 = dataclasses.replace(
            g1, split_k=_split_k(blocks * -(-I // g1.block_n), g1, H, warps))
        g2 = dataclasses.replace(
            g2, split_k=_split_k(blocks * -(-H // g2.block_n), g2, I, warps))
    return MoEConfig(bm, g1, g2, warps)

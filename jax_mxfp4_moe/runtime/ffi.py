"""Python side of the FFI code-object launcher (C++ in ``ffi/``).

One XLA FFI target, ``jax_mxfp4_moe_launch``, registered for the CUDA and
ROCM platforms, launches any GPU kernel of a code object (cubin or hsaco) on
XLA's stream. A launch is described by a :class:`Kernel` (which code object,
which symbol, block size, dynamic shared memory, parameter kinds) and emitted
under ``jax.jit`` with :func:`launch`. The code object travels as its SHA-256
only: the launcher finds the bytes in the in-process store
(:func:`store_code_object`) or as ``<dir>/<sha256>.bin`` along its search path
(the package's shipped ``objects/`` folder, then the user cache), so the HLO
stays small and exported / persistently cached executables still run in a
fresh process whose cache holds the object.

Importing this module works without the compiled extension (``launch`` then
raises a RuntimeError saying why).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import numbers
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from jax_mxfp4_moe.runtime import codecache

try:
    from jax_mxfp4_moe import _launcher
except ImportError as e:  # not built: CPU paths keep working
    _launcher = None
    _IMPORT_ERROR: Exception | None = e
else:
    _IMPORT_ERROR = None

TARGET = "jax_mxfp4_moe_launch"
# CPU target that validates and packs a launch like the GPU handlers and
# returns the kernarg bytes instead of launching (see dry_run).
DRY_RUN_TARGET = "jax_mxfp4_moe_launch_dry_run"
PLATFORMS = ("CUDA", "ROCM")

# Code objects shipped inside the package (searched before the user cache).
OBJECTS_DIR = Path(__file__).resolve().parent / "objects"

# Parameter kinds: (code shared with ffi/kernargs.h, size = alignment in bytes).
_KINDS = {
    "ptr": (0, 8),
    "i32": (1, 4),
    "u32": (2, 4),
    "i64": (3, 8),
    "f32": (4, 4),
    "null": (5, 8),
    "ptr16": (6, 8),  # a buffer the kernel assumes 16-byte aligned (checked at launch)
}
# The kind code a pointer parameter takes when its argument is a Workspace.
_WORKSPACE_CODE = 7
_MAX_WORKSPACE_BYTES = 1 << 30
# Keys of traced launch sites that have a workspace: a counter, so that a
# process that traces the same program gets the same HLO (persistent
# compilation caches keep working). Launches from other executables (a
# cache, an export) may reuse a key; they run in stream order with this
# process's, so sharing a workspace that every run leaves zeroed is safe.
_WORKSPACE_IDS = itertools.count(1)
_POINTER_KINDS = ("ptr", "ptr16")
_INT_RANGES = {
    "i32": (-(2**31), 2**31 - 1),
    "u32": (0, 2**32 - 1),
    "i64": (-(2**63), 2**63 - 1),
}
MAX_KERNARG_SIZE = 4096  # ffi/kernargs.h kMaxKernargSize
_MAX_GRID = 2**31 - 1
_MAX_BLOCK_THREADS = 1024


def available() -> bool:
    """True if the compiled launcher extension imported."""
    return _launcher is not None


def _require_launcher():
    if _launcher is None:
        raise RuntimeError(
            "jax_mxfp4_moe._launcher (the compiled FFI launcher) is not available: "
            f"{_IMPORT_ERROR}. Install the package with "
            "`pip install --no-build-isolation -e .` (see install.sh).")
    return _launcher


# --------------------------------------------------------------------------
# Code objects
# --------------------------------------------------------------------------

def store_code_object(data: bytes) -> str:
    """Puts ``data`` in the launcher's in-process store and the on-disk cache.

    Returns its SHA-256 (lower-case hex), the name a :class:`Kernel` uses.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ValueError("data: a code object cannot be empty")
    code_hash = hashlib.sha256(data).hexdigest()
    codecache.write_code_object(code_hash, data)
    register_code_object(code_hash, data)
    return code_hash


def register_code_object(code_hash: str, data: bytes) -> None:
    """Adds ``data`` to the in-process store only (checked against its hash)."""
    if _launcher is not None:
        _launcher.store_code_object(code_hash, bytes(data))
    _sync_search_paths()


def cached_compile(key_parts: dict, build) -> tuple[str, dict]:
    """``codecache.cached_compile`` whose code object is also put in the
    launcher's in-process store, so a launch finds it: (hash, metadata)."""
    code_hash, meta = codecache.cached_compile(key_parts, build)
    register_code_object(code_hash, codecache.load_code_object(code_hash))
    return code_hash, meta


def search_paths() -> list[str]:
    """Directories the launcher searches for ``<sha256>.bin``, in order."""
    return [str(OBJECTS_DIR), str(codecache.cache_dir())]


_synced_paths: list[str] | None = None


def _sync_search_paths() -> None:
    """Hands the current search path to the launcher if it changed (the
    cache folder follows $JAX_MXFP4_MOE_CACHE_DIR)."""
    global _synced_paths
    if _launcher is None:
        return
    paths = search_paths()
    if paths != _synced_paths:
        _launcher.set_search_paths(paths)
        _synced_paths = paths


# --------------------------------------------------------------------------
# Kernel description
# --------------------------------------------------------------------------

def kernarg_layout(params: Sequence[str]) -> tuple[tuple[int, ...], int]:
    """Byte offsets of each parameter and the kernarg size, naturally aligned.

    The size ends at the last parameter's last byte (no tail padding), which
    is what both drivers expect for a C struct of these fields.
    """
    offsets = []
    end = 0
    for i, kind in enumerate(params):
        if kind not in _KINDS:
            raise ValueError(
                f"params[{i}]: unknown kind {kind!r}; expected one of {sorted(_KINDS)}")
        size = _KINDS[kind][1]
        offset = -(-end // size) * size
        offsets.append(offset)
        end = offset + size
    if end > MAX_KERNARG_SIZE:
        raise ValueError(f"params: kernarg size {end} exceeds {MAX_KERNARG_SIZE} bytes")
    return tuple(offsets), end


def _as_dims(value, what: str, upper: int) -> tuple[int, int, int]:
    if isinstance(value, numbers.Integral):
        value = (value,)
    try:
        dims = tuple(value)
    except TypeError:
        raise TypeError(f"{what}: expected an int or up to 3 ints, got {value!r}") from None
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"{what}: expected 1 to 3 entries, got {dims!r}")
    for d in dims:
        if not isinstance(d, numbers.Integral) or isinstance(d, bool):
            raise TypeError(f"{what}: entries must be ints, got {dims!r}")
        if not 1 <= int(d) <= upper:
            raise ValueError(f"{what}: entries must be in [1, {upper}], got {dims!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel of a code object and how to call it.

    ``code_hash`` is the SHA-256 of the code object (from
    :func:`store_code_object` or :func:`cached_compile`), ``name`` its
    symbol, ``block`` the threads per block, ``shared_mem`` the dynamic shared
    memory in bytes, ``params`` one kind per kernel parameter: "ptr", "ptr16"
    (a buffer the kernel assumes 16-byte aligned; the launch checks it),
    "i32", "u32", "i64", "f32" or "null" (a NULL pointer, e.g. Triton's
    trailing scratch pointers).
    """

    code_hash: str
    name: str
    block: tuple[int, int, int] = (1, 1, 1)
    shared_mem: int = 0
    params: tuple[str, ...] = ()

    def __post_init__(self):
        h = self.code_hash
        if (not isinstance(h, str) or len(h) != 64
                or any(c not in "0123456789abcdef" for c in h)):
            raise ValueError(f"code_hash: expected a lower-case SHA-256 hex digest, got {h!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty kernel symbol, got {self.name!r}")
        block = _as_dims(self.block, "block", _MAX_BLOCK_THREADS)
        if block[0] * block[1] * block[2] > _MAX_BLOCK_THREADS:
            raise ValueError(f"block: at most {_MAX_BLOCK_THREADS} threads, got {block}")
        object.__setattr__(self, "block", block)
        if (not isinstance(self.shared_mem, numbers.Integral) or isinstance(self.shared_mem, bool)
                or self.shared_mem < 0):
            raise ValueError(f"shared_mem: expected an int >= 0, got {self.shared_mem!r}")
        object.__setattr__(self, "shared_mem", int(self.shared_mem))
        if isinstance(self.params, str):
            raise TypeError("params: expected a sequence of kinds, got a string")
        params = tuple(self.params)
        kernarg_layout(params)  # validates the kinds and the size
        object.__setattr__(self, "params", params)

    @property
    def layout(self) -> tuple[tuple[int, ...], int]:
        """(offsets, kernarg size) of :attr:`params`."""
        return kernarg_layout(self.params)


@dataclasses.dataclass(frozen=True)
class Out:
    """A "ptr" argument that is result ``index`` of the launch."""

    index: int

    def __post_init__(self):
        if not isinstance(self.index, numbers.Integral) or isinstance(self.index, bool) \
                or self.index < 0:
            raise ValueError(f"index: expected an int >= 0, got {self.index!r}")


@dataclasses.dataclass(frozen=True)
class Workspace:
    """A "ptr" argument that is the launch's workspace: ``nbytes`` of device
    memory (256-byte aligned) that the launcher allocates and zeroes once per
    (device, launch site) and keeps. A launch finds it as the previous launch
    at the same site left it (all zero the first time), so a kernel that
    needs zeros leaves it all zero when it completes: it then stands in for a
    result zeroed before every launch (``zero_outputs``) without the memset
    on the stream (moe_decode's counters). A kernel that writes every byte
    before it reads it may leave anything (a Gluon kernel's TMA descriptors
    in its global scratch). Each traced launch gets its own workspace per
    device (ffi/launcher.h); at most one per launch."""

    nbytes: int

    def __post_init__(self):
        if not isinstance(self.nbytes, numbers.Integral) or isinstance(self.nbytes, bool) \
                or not 1 <= self.nbytes <= _MAX_WORKSPACE_BYTES:
            raise ValueError(f"nbytes: expected an int in [1, 2**30], got {self.nbytes!r}")


# --------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------

def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and not np.isscalar(x))


def _encode_args(kernel: Kernel, args: Sequence[Any], num_results: int):
    """Operands and the (kinds, values) attribute arrays for ``args``."""
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise TypeError(f"args: expected a sequence, got {type(args).__name__}")
    if len(args) != len(kernel.params):
        raise ValueError(
            f"args: kernel {kernel.name!r} takes {len(kernel.params)} arguments "
            f"({', '.join(kernel.params)}), got {len(args)}")
    operands = []
    kinds = []
    values = []  # an int, or Out for a result (its buffer index follows the operands)
    for i, (kind, arg) in enumerate(zip(kernel.params, args)):
        where = f"args[{i}] ({kind})"
        kinds.append(_KINDS[kind][0])
        if kind in _POINTER_KINDS:
            if arg is None:  # an absent buffer: a NULL pointer the kernel never reads
                kinds[-1] = _KINDS["null"][0]
                values.append(0)
            elif isinstance(arg, Workspace):
                if _WORKSPACE_CODE in kinds[:-1]:
                    raise ValueError(f"{where}: a launch has at most one Workspace")
                kinds[-1] = _WORKSPACE_CODE
                values.append(int(arg.nbytes))
            elif isinstance(arg, Out):
                if arg.index >= num_results:
                    raise ValueError(
                        f"{where}: Out({arg.index}) but the launch has {num_results} results")
                values.append(arg)
            elif _is_array(arg):
                values.append(len(operands))
                operands.append(arg)
            else:
                raise TypeError(f"{where}: expected an array, Out(i), Workspace(n) or None, "
                                f"got {type(arg).__name__}")
        elif kind == "null":
            if arg is not None:
                raise TypeError(f"{where}: expected None, got {type(arg).__name__}")
            values.append(0)
        elif kind == "f32":
            if not isinstance(arg, numbers.Real) or _is_array(arg):
                raise TypeError(f"{where}: expected a Python float, got {type(arg).__name__}")
            values.append(int(np.array(arg, dtype=np.float32).view(np.uint32)))
        else:
            if not isinstance(arg, numbers.Integral) or _is_array(arg):
                raise TypeError(
                    f"{where}: expected a Python int (scalars are static; pass traced "
                    f"values as buffers), got {type(arg).__name__}")
            lo, hi = _INT_RANGES[kind]
            if not lo <= int(arg) <= hi:
                raise ValueError(f"{where}: {int(arg)} does not fit {kind} [{lo}, {hi}]")
            values.append(int(arg))
    values = [len(operands) + v.index if isinstance(v, Out) else v for v in values]
    return operands, kinds, values


def _attributes(kernel: Kernel, grid, kinds, values, zero_outputs) -> dict:
    offsets, size = kernel.layout
    i64 = lambda xs: np.asarray(list(xs), dtype=np.int64)  # noqa: E731
    return dict(
        code_hash=kernel.code_hash,
        kernel=kernel.name,
        grid=i64(grid),
        block=i64(kernel.block),
        shared_mem=np.int64(kernel.shared_mem),
        arg_kinds=i64(kinds),
        arg_values=i64(values),
        arg_offsets=i64(offsets),
        kernarg_size=np.int64(size),
        zero_outputs=i64(zero_outputs),
        # A key per traced launch site names its workspace (ffi/launcher.h).
        workspace_id=np.int64(next(_WORKSPACE_IDS) if _WORKSPACE_CODE in kinds else 0),
    )


def _check_out_types(out_types):
    if isinstance(out_types, jax.ShapeDtypeStruct) or not isinstance(out_types, Sequence):
        raise TypeError("out_types: expected a list of jax.ShapeDtypeStruct")
    for i, t in enumerate(out_types):
        if not (hasattr(t, "shape") and hasattr(t, "dtype")):
            raise TypeError(f"out_types[{i}]: expected a jax.ShapeDtypeStruct, got {t!r}")
    return list(out_types)


def _check_zero_outputs(zero_outputs, num_results):
    zs = tuple(zero_outputs)
    for z in zs:
        if not isinstance(z, numbers.Integral) or not 0 <= z < num_results:
            raise ValueError(f"zero_outputs: {z!r} is not a result index in [0, {num_results})")
    return tuple(int(z) for z in zs)


def _check_aliases(aliases, num_operands, out_types, operands):
    if aliases is None:
        return None
    if not isinstance(aliases, dict):
        raise TypeError("input_output_aliases: expected a dict {operand index: result index}")
    for o, r in aliases.items():
        if not isinstance(o, numbers.Integral) or not 0 <= o < num_operands:
            raise ValueError(
                f"input_output_aliases: operand {o!r} is not in [0, {num_operands}) "
                "(operands are the array arguments, in order)")
        if not isinstance(r, numbers.Integral) or not 0 <= r < len(out_types):
            raise ValueError(f"input_output_aliases: result {r!r} is not in [0, {len(out_types)})")
        a, t = operands[o], out_types[r]
        if tuple(a.shape) != tuple(t.shape) or np.dtype(a.dtype) != np.dtype(t.dtype):
            raise ValueError(
                f"input_output_aliases: operand {o} {a.dtype}{list(a.shape)} cannot alias "
                f"result {r} {t.dtype}{list(t.shape)}")
    return {int(o): int(r) for o, r in aliases.items()}


def _describe(kernel: Kernel, grid, args, out_types, zero_outputs):
    """Checks a launch and encodes it: (out_types, operands, FFI attributes),
    the same for the GPU handlers and the CPU dry run."""
    if not isinstance(kernel, Kernel):
        raise TypeError(f"kernel: expected ffi.Kernel, got {type(kernel).__name__}")
    grid = _as_dims(grid, "grid", _MAX_GRID)
    out_types = _check_out_types(out_types)
    zero_outputs = _check_zero_outputs(zero_outputs, len(out_types))
    operands, kinds, values = _encode_args(kernel, args, len(out_types))
    _require_launcher()
    return out_types, operands, _attributes(kernel, grid, kinds, values, zero_outputs)


def launch(kernel: Kernel, grid, args: Sequence[Any], out_types, *,
           zero_outputs: Sequence[int] = (), input_output_aliases: dict | None = None,
           name: str | None = None, vmap_method: str = "sequential") -> list[jax.Array]:
    """Launches ``kernel`` on ``grid`` (1 to 3 block counts) under jit.

    ``args`` holds one entry per kernel parameter: a jax array (an operand),
    :class:`Out` (a result), :class:`Workspace` or None (an absent buffer,
    passed as a NULL pointer: the one convention of both backends) for "ptr", a Python int for
    "i32"/"u32"/"i64", a Python float for "f32", None for "null". ``out_types`` lists the
    results (``jax.ShapeDtypeStruct``); results in ``zero_outputs`` are
    zero-filled on the stream before the launch. ``input_output_aliases``
    maps an operand index (position among the array arguments) to the result
    that reuses its buffer. ``name`` labels the call in profiles (default: the
    kernel symbol). Returns the results as a list.
    """
    out_types, operands, attrs = _describe(kernel, grid, args, out_types, zero_outputs)
    aliases = _check_aliases(input_output_aliases, len(operands), out_types, operands)
    _sync_search_paths()
    call = jax.ffi.ffi_call(TARGET, out_types, input_output_aliases=aliases,
                            vmap_method=vmap_method)
    with jax.named_scope(name or kernel.name):
        results = call(*operands, **attrs)
    return list(results)


def dry_run(kernel: Kernel, grid, args: Sequence[Any], out_types, *,
            zero_outputs: Sequence[int] = ()) -> tuple[list[jax.Array], jax.Array]:
    """Runs a launch description through the CPU dry-run target.

    Validates and packs exactly as the GPU handlers do (same attribute
    decoding, same C++ packer) but launches nothing: returns the results
    (those in ``zero_outputs`` zero-filled, the others unspecified) and the
    packed kernarg bytes (uint8[kernarg size]). Must run on the CPU backend.
    """
    out_types, operands, attrs = _describe(kernel, grid, args, out_types, zero_outputs)
    kernarg_type = jax.ShapeDtypeStruct((kernel.layout[1],), np.uint8)
    results = jax.ffi.ffi_call(DRY_RUN_TARGET, out_types + [kernarg_type],
                               vmap_method="sequential")(*operands, **attrs)
    return list(results[:-1]), results[-1]


def export_disabled_checks() -> list:
    """The ``disabled_checks`` ``jax.export.export`` needs for functions that
    launch through this target (it is not on jax's list of stable custom
    calls; the call's ABI is this package's, versioned with it)."""
    return [jax.export.DisabledSafetyCheck.custom_call(TARGET)]


def _register() -> None:
    if _launcher is None:
        return
    for platform, stages in _launcher.registrations().items():
        jax.ffi.register_ffi_target(TARGET, stages, platform=platform)
    jax.ffi.register_ffi_target(DRY_RUN_TARGET, _launcher.dry_run_handler(), platform="cpu")
    _sync_search_paths()


_register()

"""Compile FlyDSL kernels for an AMD arch on any machine, into code objects.

FlyDSL compiles ahead of time without a GPU (``COMPILE_ONLY=1``, ``ARCH``);
the code object (hsaco) is the ``gpu.binary`` op of the final module.  Its
kernel argument layout and resource usage come from the object's own
metadata note (``rocm_elf``); its ISA from FlyDSL's assembly dump.  Results
are cached on disk by ``ffi.cached_compile`` keyed on the kernel
sources' hash, the builder's parameters, the arch and the flydsl version, so
a process with a warm cache never imports flydsl (nor torch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import io
import os
import tempfile
from pathlib import Path

from jax_mxfp4_moe.runtime import codecache, ffi, versions

from jax_mxfp4_moe.rocm import elf as rocm_elf

KERNEL_PACKAGE = "jax_mxfp4_moe.rocm.kernels"
_HERE = Path(__file__).resolve().parent
# Every source a compiled kernel depends on: the kernels, the index math they
# share with the functional model, the MX format constants and the layer spec.
_SOURCES = (_HERE / "kernels", _HERE / "geometry.py", _HERE.parent / "numerics" / "formats.py",
            _HERE.parent / "spec.py")


@dataclasses.dataclass(frozen=True)
class CodeObject:
    """One compiled kernel: its code object's hash and what a launcher needs."""

    name: str
    code_hash: str
    block: tuple
    params: tuple
    metadata: dict  # the kernel's AMDGPU metadata map (from the ELF note)
    isa: str

    def data(self) -> bytes:
        """The code object bytes (from the on-disk cache)."""
        return codecache.load_code_object(self.code_hash)

    @property
    def kernarg(self):
        return rocm_elf.kernarg_offsets(self.metadata)

    @property
    def lds_bytes(self) -> int:
        return int(self.metadata[".group_segment_fixed_size"])


def kernel_module(name: str):
    """The FlyDSL kernel module ``jax_mxfp4_moe.rocm.kernels.<name>``."""
    return importlib.import_module(f"{KERNEL_PACKAGE}.{name}")


@functools.lru_cache(maxsize=None)
def sources_hash() -> str:
    return codecache.sources_digest(_SOURCES)


@contextlib.contextmanager
def _flydsl_env(arch: str, dump_dir: str):
    env = {
        "ARCH": arch,
        "FLYDSL_GPU_ARCH": arch,
        "COMPILE_ONLY": "1",
        "FLYDSL_DEBUG_DUMP_ASM": "1",
        "FLYDSL_DUMP_DIR": dump_dir,
    }
    if not os.environ.get("ROCM_PATH"):
        from jax_mxfp4_moe.runtime import toolchain

        rocm_path = toolchain.rocm_path()
        if rocm_path is None:
            raise RuntimeError("compiling gfx950 code objects needs ld.lld as $ROCM_PATH/llvm/bin/ld.lld "
                               "(install.sh sets up .rocm/ with lld-19); none was found")
        env["ROCM_PATH"] = rocm_path
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _binary_from_module_text(text: str):
    """(code object bytes, kernel names) of the final module's gpu.binary."""
    from flydsl._mlir import ir
    from flydsl._mlir.dialects import gpu
    from flydsl.compiler.jit_function import _create_mlir_context

    with _create_mlir_context():
        module = ir.Module.parse(text)
        for op in module.body.operations:
            if op.operation.name == "gpu.binary":
                objects = op.attributes["objects"]
                if len(objects) != 1:
                    raise RuntimeError(f"expected one gpu.object, got {len(objects)}")
                obj = gpu.ObjectAttr(objects[0])
                return bytes(obj.object), str(obj.kernels)
    raise RuntimeError("compiled module has no gpu.binary op")


# The flydsl release the shipped kernels are written for (pyproject's [rocm]
# extra); a process without flydsl looks its kernels up under this version.
FLYDSL_VERSION = "0.5.0"


def _flydsl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("flydsl")
    except PackageNotFoundError:
        return FLYDSL_VERSION
    versions.check("flydsl", found, backend="rocm")  # once per process: untested versions
    versions.check_jax(backend="rocm")
    return found


def _placeholder(kind: str):
    import flydsl.expr as fx

    return {"ptr": fx.Int64(0), "i64": fx.Int64(0), "i32": fx.Int32(0)}[kind]


def _build(module_name: str, arch: str, config: dict):
    """Compile in this process: (code object bytes, JSON metadata)."""
    try:
        import flydsl.compiler as flyc
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"compiling the gfx950 kernel {module_name} (the rocm lowering, also of an export "
            f"for platforms that include 'rocm') needs FlyDSL: pip install "
            f"'jax_mxfp4_moe[rocm]' ({e})") from e

    kb = kernel_module(module_name).build(**config)
    with tempfile.TemporaryDirectory() as dump, _flydsl_env(arch, dump), \
            contextlib.redirect_stdout(io.StringIO()):  # FlyDSL prints each dump's path
        flyc.compile(kb.launcher, *[_placeholder(k) for k in kb.params])
        _, artifact = kb.launcher._last_compiled
        isa = "\n".join(f.read_text() for f in sorted(Path(dump).rglob("*.s")))
    data, _ = _binary_from_module_text(artifact._ir_text)
    kernels = rocm_elf.kernel_metadata(data)
    if kb.name not in kernels:
        raise RuntimeError(f"code object lacks kernel {kb.name!r}; has {sorted(kernels)}")
    meta = {"name": kb.name, "block": list(kb.block), "params": list(kb.params),
            "elf": kernels[kb.name], "isa": isa, "arch": arch}
    return data, meta


@functools.lru_cache(maxsize=None)
def _compile_cached(module_name: str, arch: str, config_items: tuple) -> CodeObject:
    config = dict(config_items)
    key = {
        "backend": "flydsl",
        "kernel": module_name,
        "config": repr(config_items),
        "arch": arch,
        "sources": sources_hash(),
        "flydsl": _flydsl_version(),
    }
    code_hash, meta = ffi.cached_compile(key, lambda: _build(module_name, arch, config))
    return CodeObject(meta["name"], code_hash, tuple(meta["block"]), tuple(meta["params"]),
                      meta["elf"], meta["isa"])


def compile_kernel(module_name: str, *, arch: str = "gfx950", **config) -> CodeObject:
    """Compile (or fetch from the cache) kernel ``module_name`` built with ``config``."""
    return _compile_cached(module_name, arch, tuple(sorted(config.items())))



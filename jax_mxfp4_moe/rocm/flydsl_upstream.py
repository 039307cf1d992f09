"""FlyDSL upstream's own MoE GEMMs (``kernels/moe/mxfp_moe``), compiled for gfx950 to compare against.

Nothing of FlyDSL's repository ships with this package.  The caller names a
snapshot of ``ROCm/FlyDSL``, as a checkout (a folder holding
``kernels/moe/mxfp_moe/gemm1.py``) or a bare git repository, by argument or
by ``$JAX_MXFP4_MOE_FLYDSL_SNAPSHOT``; ``locate`` says clearly when there is
none.  The snapshot's ``kernels/`` tree is put first on ``sys.path`` of a
child process that compiles with the installed flydsl (``COMPILE_ONLY=1``,
``ARCH=gfx950``) and returns each kernel's ISA and AMDGPU metadata.  Results
are cached (``codecache``) by the hash of the snapshot's kernel sources, the
variant and the flydsl version.

Variants (``Gemm1`` / ``Gemm2``) are the arguments of FlyDSL's
``compile_gemm1_a4w4_port`` / ``compile_gemm2_a4w4_port``; ``tile_policy``
picks them per token count as aiter's tuned table for these kernels does.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ENV_VAR = "JAX_MXFP4_MOE_FLYDSL_SNAPSHOT"
_KERNEL_REL = Path("kernels/moe/mxfp_moe")
BLOCK_THREADS = 256  # both kernels: known_block_size=[256, 1, 1]
BK = 256  # K per tile of both kernels (BN = BK = 256 is all they support)
BN = 256


class SnapshotUnavailable(RuntimeError):
    """No FlyDSL snapshot to compare against."""


@dataclasses.dataclass(frozen=True)
class Gemm1:
    bm: int
    use_nt: bool
    inline_quant: bool
    hidden: int
    inter: int
    experts: int
    top_k: int
    interleave: bool
    a_dtype: str  # "fp4" (a4w4) or "fp8" (a8w4)


@dataclasses.dataclass(frozen=True)
class Gemm2:
    bm: int
    use_nt: bool
    epilog: str  # "atomic", "nonatomic", ...
    hidden: int  # N_OUT
    inter: int  # K
    experts: int


def tile_policy(tokens: int) -> tuple[dict, dict]:
    """(gemm1 knobs, gemm2 knobs) FlyDSL's kernels run with at ``tokens``.

    From aiter's tuned table for these kernels (Kimi-K2.5, as ROCm/FlyDSL PR
    #667 lists it for gemm1: BM16 inline-quant non-temporal up to 128 tokens,
    BM32 non-temporal to 512, BM32 cached to 2048, BM128 above; gemm2: BM16
    atomic non-temporal up to 128, BM32 atomic to 2048 (the nearest published
    row), BM128 non-atomic (flat bf16 rows + a top-k reduce) from 4096)."""
    if tokens <= 128:
        g1 = dict(bm=16, use_nt=True, inline_quant=True)
        g2 = dict(bm=16, use_nt=True, epilog="atomic")
    elif tokens <= 512:
        g1 = dict(bm=32, use_nt=True, inline_quant=False)
        g2 = dict(bm=32, use_nt=False, epilog="atomic")
    elif tokens <= 2048:
        g1 = dict(bm=32, use_nt=False, inline_quant=False)
        g2 = dict(bm=32, use_nt=False, epilog="atomic")
    else:
        g1 = dict(bm=128, use_nt=False, inline_quant=False)
        g2 = dict(bm=128, use_nt=False, epilog="nonatomic")
    return g1, g2


def padded(n: int) -> int:
    """FlyDSL's kernels need H and I multiples of 256."""
    return -(-n // BK) * BK


def gemm1_grid(tokens: int, bm: int, experts: int, top_k: int, inter: int) -> int:
    """Workgroups FlyDSL's host launches for gemm1 (its ``gemm1_grid``)."""
    nnb = 2 * inter // BN
    if bm == 128:
        m_blocks = (tokens * top_k + experts * (bm - 1) + bm - 1) // bm
    else:
        active = min(tokens * top_k, experts)
        m_blocks = (tokens * top_k + active * (bm - 1) + bm - 1) // bm
    return m_blocks * nnb


def gemm2_grid(tokens: int, bm: int, experts: int, top_k: int, hidden: int) -> int:
    """Workgroups of gemm2 (the host passes max_m_blocks of the same sorted buffer)."""
    active = min(tokens * top_k, experts)
    max_sorted = tokens * top_k + active * (bm - 1)
    return -(-max_sorted // bm) * (hidden // BN)


# ------------------------------------------------------------------ snapshot
def locate(path: str | os.PathLike | None = None) -> Path:
    """The folder holding FlyDSL's ``kernels/`` (extracting it from a bare git repository).

    Raises ``SnapshotUnavailable`` naming what was looked for."""
    src = path or os.environ.get(ENV_VAR)
    if not src:
        raise SnapshotUnavailable(
            f"no FlyDSL snapshot: pass --flydsl PATH or set ${ENV_VAR} to a ROCm/FlyDSL checkout "
            "(or its bare git repository)")
    p = Path(src).expanduser()
    if (p / _KERNEL_REL / "gemm1.py").is_file():
        return p
    if (p / "HEAD").is_file() and (p / "objects").is_dir():
        return _extract_bare(p)
    raise SnapshotUnavailable(f"{p}: neither a FlyDSL checkout ({_KERNEL_REL}/gemm1.py) nor a bare git repository")


def _extract_bare(git_dir: Path) -> Path:
    head = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    from ..runtime.codecache import cache_dir

    out = cache_dir() / "flydsl-snapshots" / head
    if (out / _KERNEL_REL / "gemm1.py").is_file():
        return out
    tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None))
    try:
        archive = subprocess.run(["git", "--git-dir", str(git_dir), "archive", head, "kernels"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except (subprocess.CalledProcessError, OSError) as e:
        raise SnapshotUnavailable(f"{git_dir}: could not extract kernels/ at {head[:12]}: {e}") from None
    return out


def sources_hash(root: Path) -> str:
    h = hashlib.sha256()
    for sub in (_KERNEL_REL, Path("kernels/common")):
        for f in sorted((root / sub).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------ compile
def _key(root_hash: str, variant) -> dict:
    from . import compile as rocm_compile

    return {"backend": "flydsl-upstream", "sources": root_hash, "variant": repr(variant),
            "flydsl": rocm_compile._flydsl_version(), "arch": "gfx950"}


class _Miss(Exception):
    pass


def _miss():
    raise _Miss


def compile_variants(variants, snapshot: str | os.PathLike | None = None, *, timeout: float = 1800.0):
    """{variant: perf_model.KernelCode} of FlyDSL's kernels (compiling only what the cache lacks)."""
    from ..runtime import codecache
    from .perf_model import KernelCode

    root = locate(snapshot)
    rh = sources_hash(root)
    out, todo = {}, []
    for v in variants:
        try:
            _, meta = codecache.cached_compile(_key(rh, v), _miss)
        except _Miss:
            todo.append(v)
            continue
        out[v] = KernelCode(meta["name"], meta["isa"], meta["elf"], BLOCK_THREADS)
    if todo:
        with tempfile.TemporaryDirectory() as d:
            spec = Path(d) / "variants.json"
            spec.write_text(json.dumps([[type(v).__name__, dataclasses.asdict(v)] for v in todo]))
            res = Path(d) / "out.json"
            env = dict(os.environ)
            if not env.get("ROCM_PATH"):
                env["ROCM_PATH"] = _rocm_path()
            proc = subprocess.run([sys.executable, "-m", __name__, str(root), str(spec), str(res)],
                                  capture_output=True, text=True, timeout=timeout, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling FlyDSL's kernels from {root} failed:\n{proc.stderr[-4000:]}")
            results = json.loads(res.read_text())
        for v, r in zip(todo, results):
            data = base64.b64decode(r["code"])
            meta = {"name": r["name"], "isa": r["isa"], "elf": r["elf"]}
            codecache.cached_compile(_key(rh, v), lambda data=data, meta=meta: (data, meta))
            out[v] = KernelCode(r["name"], r["isa"], r["elf"], BLOCK_THREADS)
    return out


def _rocm_path() -> str:
    from ..runtime import toolchain

    path = toolchain.rocm_path()
    if path is None:
        raise RuntimeError("compiling gfx950 code objects needs ld.lld as $ROCM_PATH/llvm/bin/ld.lld "
                           "(install.sh sets up .rocm/ with lld-19); none was found")
    return path


def _child(root: str, spec: str, res: str) -> None:
    """In the child process: compile each variant, write [{name, isa, elf, code}]."""
    import contextlib
    import io

    sys.path.insert(0, root)
    os.environ.update(ARCH="gfx950", FLYDSL_GPU_ARCH="gfx950", COMPILE_ONLY="1")
    import flydsl.compiler as flyc
    import flydsl.expr as fx
    from kernels.moe.mxfp_moe.gemm1 import compile_gemm1_a4w4_port
    from kernels.moe.mxfp_moe.gemm2 import compile_gemm2_a4w4_port

    from . import elf as rocm_elf
    from .compile import _binary_from_module_text

    out = []
    for kind, a in json.loads(Path(spec).read_text()):
        if kind == "Gemm1":
            launcher = compile_gemm1_a4w4_port(
                a["bm"], a["use_nt"], a["inline_quant"], D_HIDDEN=a["hidden"], D_INTER=a["inter"],
                NE=a["experts"], TOPK=a["top_k"], interleave=a["interleave"], a_dtype=a["a_dtype"])
            kinds = "ppppppp" + "ii" + "ppp"
        else:
            launcher = compile_gemm2_a4w4_port(
                BM=a["bm"], use_nt=a["use_nt"], NE=a["experts"], N_OUT=a["hidden"], epilog=a["epilog"],
                D_INTER=a["inter"])
            kinds = "pppppppp" + "ii" + "pp"
        args = [fx.Int64(0) if c == "p" else fx.Int32(0) for c in kinds] + [fx.Stream(None)]
        with tempfile.TemporaryDirectory() as dump:
            os.environ["FLYDSL_DEBUG_DUMP_ASM"] = "1"
            os.environ["FLYDSL_DUMP_DIR"] = dump
            with contextlib.redirect_stdout(io.StringIO()):
                flyc.compile(launcher, *args)
            isa = "\n".join(f.read_text() for f in sorted(Path(dump).rglob("*.s")))
        _, artifact = launcher._last_compiled
        data, _ = _binary_from_module_text(artifact._ir_text)
        kernels = rocm_elf.kernel_metadata(data)
        (name, md), = kernels.items()
        out.append({"name": name, "isa": isa, "elf": md, "code": base64.b64encode(data).decode()})
    Path(res).write_text(json.dumps(out, default=lambda o: o.hex() if isinstance(o, bytes) else str(o)))


if __name__ == "__main__":
    _child(*sys.argv[1:4])

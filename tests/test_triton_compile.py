"""compile_triton on CPU: a cubin for sm_90a, metadata and parameter list
consistent with the compiled code, and errors for unsupported signatures."""

import shutil
import subprocess
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton not installed")
import triton.language as tl  # noqa: E402

from jax_mxfp4_moe.runtime import ffi  # noqa: E402
from jax_mxfp4_moe.cuda.compile import compile_triton, param_kinds  # noqa: E402


@triton.jit
def axpy_kernel(x_ptr, y_ptr, n, a, b, BLOCK: tl.constexpr):
    """y[i] = x[i] * a + b for i < n."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, x * a + b, mask=mask)


AXPY_SIGNATURE = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "a": "fp32", "b": "fp32"}

EM_CUDA = 190


def cuobjdump():
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else shutil.which("cuobjdump")


@pytest.fixture(scope="module")
def axpy():
    return compile_triton(axpy_kernel, AXPY_SIGNATURE, {"BLOCK": 256}, arch=90, num_warps=4)


def test_axpy_compiles_to_a_cuda_elf(axpy):
    cubin, meta = axpy
    assert cubin[:4] == b"\x7fELF"
    assert int.from_bytes(cubin[18:20], "little") == EM_CUDA  # e_machine
    assert meta["name"] == "axpy_kernel"
    assert meta["name"].encode() in cubin
    assert meta["num_warps"] == 4 and meta["block"] == [128, 1, 1]
    assert meta["shared"] >= 0
    assert meta["triton_version"] == triton.__version__


def test_params_are_the_signature_then_hidden_null_pointers(axpy):
    _, meta = axpy
    params = meta["params"]
    assert params[:5] == ["ptr", "ptr", "i32", "f32", "f32"]
    assert len(params) >= 5 and set(params[5:]) <= {"null"}
    # Triton 3.x appends the global- and profile-scratch pointers.
    assert len(params) - 5 == 2
    kernel = ffi.Kernel("0" * 64, meta["name"], block=meta["block"], shared_mem=meta["shared"],
                        params=meta["params"])
    assert kernel.layout == ((0, 8, 16, 20, 24, 32, 40), 48)


def test_cubin_targets_sm_90a(axpy, tmp_path):
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not available")
    cubin, _ = axpy
    f = tmp_path / "axpy.cubin"
    f.write_bytes(cubin)
    out = subprocess.run([tool, "-elf", str(f)], capture_output=True, text=True, check=True).stdout
    assert "sm_90a" in out


def test_divisibility_hint_vectorises_loads(tmp_path):
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not available")

    def sass(**kw):
        cubin, _ = compile_triton(axpy_kernel, AXPY_SIGNATURE, {"BLOCK": 1024}, num_warps=4, **kw)
        f = tmp_path / "k.cubin"
        f.write_bytes(cubin)
        return subprocess.run([tool, "-sass", str(f)], capture_output=True, text=True,
                              check=True).stdout

    assert "LDG.E.128" in sass(divisible_by_16=("x_ptr", "y_ptr", "n"))
    assert "LDG.E.128" not in sass()


def test_param_kinds_mapping():
    names = ["p", "i", "u", "l", "f", "C"]
    sig = {"p": "*bf16", "i": "i32", "u": "u32", "l": "i64", "f": "fp32"}
    assert param_kinds(names, sig, {"C": 3}) == ["ptr", "i32", "u32", "i64", "f32"]
    # a pointer compiled as 16-byte aligned is launched as "ptr16" (checked)
    assert param_kinds(names, sig, {"C": 3}, aligned=("p", "i")) == [
        "ptr16", "i32", "u32", "i64", "f32"]


@pytest.mark.parametrize("signature, constexprs, match", [
    ({**AXPY_SIGNATURE, "a": "fp16"}, {"BLOCK": 256}, r"signature\['a'\]"),
    ({k: v for k, v in AXPY_SIGNATURE.items() if k != "n"}, {"BLOCK": 256}, "'n'"),
    ({**AXPY_SIGNATURE, "zz": "i32"}, {"BLOCK": 256}, "signature"),
    (AXPY_SIGNATURE, {"BLOCK": 256, "nope": 1}, "constexprs"),
    ({**AXPY_SIGNATURE, "BLOCK": "constexpr"}, {}, "constexprs"),
])
def test_unsupported_signatures_raise(signature, constexprs, match):
    with pytest.raises(ValueError, match=match):
        compile_triton(axpy_kernel, signature, constexprs)


def test_bad_num_warps_and_fn():
    with pytest.raises(ValueError, match="num_warps"):
        compile_triton(axpy_kernel, AXPY_SIGNATURE, {"BLOCK": 256}, num_warps=3)
    with pytest.raises(TypeError, match="fn"):
        compile_triton(lambda x: x, {}, {})

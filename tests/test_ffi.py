"""The FFI code-object launcher on CPU: extension, registration, kernarg
layout and packing (Python layout vs C++ packer vs a struct-module oracle),
lowering for cuda/rocm, argument validation, the code-object store."""

import hashlib
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jax_mxfp4_moe.runtime import ffi

L = pytest.importorskip("jax_mxfp4_moe._launcher", reason="launcher extension not built")

KINDS = ("ptr", "ptr16", "i32", "u32", "i64", "f32", "null")
# struct format, size per kind (little endian): the oracle of the packing.
STRUCT = {"ptr": "<Q", "ptr16": "<Q", "i32": "<i", "u32": "<I", "i64": "<q", "f32": "<f", "null": "<Q"}
HASH = hashlib.sha256(b"not a real code object").hexdigest()


def f32_bits(v):
    return struct.unpack("<I", struct.pack("<f", v))[0]


# --------------------------------------------------------------------------
# Extension and registration
# --------------------------------------------------------------------------

def test_extension_imports_and_exposes_both_platforms():
    assert ffi.available()
    assert L.TARGET_NAME == ffi.TARGET
    regs = L.registrations()
    assert set(regs) == {"CUDA", "ROCM"}
    for stages in regs.values():
        assert set(stages) == {"initialize", "execute"}
    # Four distinct handler functions (one per platform and stage).
    names = {repr(c) for s in regs.values() for c in s.values()}
    assert len(names) == 4


@pytest.mark.parametrize("platform", ["CUDA", "ROCM"])
def test_registration_accepted(platform):
    jax.ffi.register_ffi_target(ffi.TARGET, L.registrations()[platform], platform=platform)


def test_extension_has_no_gpu_link_dependency():
    ldd = subprocess.run(["ldd", L.__file__], capture_output=True, text=True)
    if ldd.returncode != 0:
        pytest.skip("ldd unavailable")
    for lib in ("libcuda", "libcudart", "libamdhip64", "libhsa"):
        assert lib not in ldd.stdout


def test_sha256_matches_hashlib():
    for n in (0, 1, 55, 56, 63, 64, 65, 119, 120, 1000, 70000):
        data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
        assert L.sha256_hex(data) == hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------
# Kernarg layout and packing
# --------------------------------------------------------------------------

def test_kernarg_layout_known_case():
    # Triton-like: two pointers, i32, f32, i64 (realigned to 8), two hidden nulls.
    offsets, size = ffi.kernarg_layout(["ptr", "ptr", "i32", "f32", "i32", "i64", "null", "null"])
    assert offsets == (0, 8, 16, 20, 24, 32, 40, 48)
    assert size == 56
    assert ffi.kernarg_layout(["i32"]) == ((0,), 4)
    assert ffi.kernarg_layout(["i32", "ptr", "u32"]) == ((0, 8, 16), 20)
    assert ffi.kernarg_layout([]) == ((), 0)


@given(st.lists(st.sampled_from(KINDS), max_size=40))
def test_kernarg_layout_is_natural_alignment(params):
    offsets, size = ffi.kernarg_layout(params)
    end = 0
    for kind, off in zip(params, offsets):
        width = struct.calcsize(STRUCT[kind])
        assert off % width == 0  # naturally aligned
        assert end <= off < end + width  # the first aligned slot after the previous one
        end = off + width
    assert size == end


def oracle_pack(params, values, buffers):
    """Bytes a C compiler would lay out for a struct of these fields."""
    offsets, size = ffi.kernarg_layout(params)
    out = bytearray(size)
    for kind, off, v in zip(params, offsets, values):
        if kind in ("ptr", "ptr16"):
            v = buffers[v]
        elif kind == "null":
            v = 0
        elif kind == "f32":
            v = struct.unpack("<f", struct.pack("<I", v))[0]
        struct.pack_into(STRUCT[kind], out, off, v)
    return bytes(out)


def draw_value(draw, kind, num_buffers):
    if kind in ("ptr", "ptr16"):
        return draw(st.integers(0, num_buffers - 1))
    if kind == "i32":
        return draw(st.integers(-(2**31), 2**31 - 1))
    if kind in ("u32", "f32"):
        return draw(st.integers(0, 2**32 - 1).filter(
            lambda b: kind == "u32" or not np.isnan(np.uint32(b).view(np.float32))))
    if kind == "i64":
        return draw(st.integers(-(2**63), 2**63 - 1))
    return 0


@st.composite
def launches(draw):
    params = draw(st.lists(st.sampled_from(KINDS), max_size=24))
    # 16-byte aligned addresses, as XLA allocates them ("ptr16" requires it).
    buffers = draw(st.lists(st.integers(1, 2**60 - 1).map(lambda b: 16 * b), min_size=1,
                            max_size=6))
    values = [draw_value(draw, k, len(buffers)) for k in params]
    return params, values, buffers


@given(launches())
@settings(max_examples=200)
def test_cpp_packing_agrees_with_layout_and_oracle(launch):
    params, values, buffers = launch
    offsets, size = ffi.kernarg_layout(params)
    codes = [ffi._KINDS[k][0] for k in params]
    packed = L.pack_kernargs(codes, values, list(offsets), size, buffers)
    assert packed == oracle_pack(params, values, buffers)


@pytest.mark.parametrize("kinds, values, offsets, size, message", [
    ([0], [3], [0], 8, "buffer index 3"),
    ([1], [2**31], [0], 4, "does not fit 32 bits"),
    ([2], [-1], [0], 4, "outside [0, 2^32)"),
    ([3], [0], [4], 8, "do not fit kernarg_size"),
    ([1, 1], [0, 0], [0, 2], 8, "overlap"),
    ([9], [0], [0], 8, "unknown kind 9"),
    ([1], [0], [-4], 8, "do not fit"),
    ([6, 6], [0, 1], [0, 8], 16, "parameter 1: buffer 1 is not 16-byte aligned"),
])
def test_cpp_packing_rejects_bad_descriptions(kinds, values, offsets, size, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)").replace("^", r"\^")):
        L.pack_kernargs(kinds, values, offsets, size, [0x1000, 0x2008])


def test_cpp_packing_rejects_oversize():
    with pytest.raises(ValueError, match="size"):
        L.pack_kernargs([], [], [], ffi.MAX_KERNARG_SIZE + 1, [])
    with pytest.raises(ValueError, match="equal lengths"):
        L.pack_kernargs([1, 1], [0], [0, 4], 8, [])


# --------------------------------------------------------------------------
# The whole launch description through XLA (CPU dry-run target)
# --------------------------------------------------------------------------

@pytest.fixture
def on_cpu():
    """The dry-run target is registered for the CPU platform only."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


AXPY = ffi.Kernel(HASH, "axpy", block=(128,),
                  params=("ptr", "ptr", "ptr", "i32", "f32", "i64", "u32", "null", "null"))


def test_dry_run_packs_like_the_oracle_with_real_buffer_addresses(on_cpu):
    x = jnp.arange(16, dtype=jnp.float32)
    b = jnp.ones((4,), jnp.int32)
    outs, kernargs = ffi.dry_run(
        AXPY, (3, 2), [x, ffi.Out(1), b, -7, 2.5, -(2**40), 2**32 - 1, None, None],
        [jax.ShapeDtypeStruct((8,), jnp.float32), jax.ShapeDtypeStruct((16,), jnp.float32)],
        zero_outputs=(0,))
    kernargs = np.asarray(kernargs).tobytes()
    offsets, size = AXPY.layout
    assert len(kernargs) == size
    ptrs = [struct.unpack_from("<Q", kernargs, offsets[i])[0] for i in range(3)]
    # Operands' addresses are the arrays' own buffers on CPU.
    assert ptrs[0] == x.unsafe_buffer_pointer()
    assert ptrs[2] == b.unsafe_buffer_pointer()
    assert len(set(ptrs)) == 3 and 0 not in ptrs
    # Scalars and nulls exactly as the struct oracle packs them (buffers as decoded).
    expected = oracle_pack(AXPY.params, [0, 1, 2, -7, f32_bits(2.5), -(2**40), 2**32 - 1, 0, 0],
                           ptrs)
    assert kernargs == expected
    np.testing.assert_array_equal(np.asarray(outs[0]), np.zeros(8, np.float32))


def test_dry_run_without_params_or_zero_outputs(on_cpu):
    k = ffi.Kernel(HASH, "noop", block=(64, 2), params=())
    outs, kernargs = ffi.dry_run(k, 1, [], [jax.ShapeDtypeStruct((2,), jnp.int32)])
    assert np.asarray(kernargs).shape == (0,)
    assert np.asarray(outs[0]).shape == (2,)


def test_dry_run_under_jit_with_out_pointer_order(on_cpu):
    k = ffi.Kernel(HASH, "two_outs", params=("ptr", "ptr", "ptr"))

    @jax.jit
    def f(x):
        outs, kernargs = ffi.dry_run(k, 1, [ffi.Out(1), x, ffi.Out(0)],
                                     [jax.ShapeDtypeStruct((4,), jnp.float32)] * 2,
                                     zero_outputs=(0, 1))
        return outs, kernargs

    outs, kernargs = f(jnp.ones(4))
    p = struct.unpack("<3Q", np.asarray(kernargs).tobytes())
    assert len(set(p)) == 3
    for o in outs:
        np.testing.assert_array_equal(np.asarray(o), 0)


def test_handler_error_names_the_kernel_and_process_continues(on_cpu):
    # Bypass Python validation to reach the C++ checks: lengths disagree.
    call = jax.ffi.ffi_call(ffi.DRY_RUN_TARGET, [jax.ShapeDtypeStruct((8,), jnp.uint8)],
                            vmap_method="sequential")
    attrs = ffi._attributes(AXPY, (1, 1, 1), [1, 1], [0], [])
    attrs["arg_offsets"] = np.array([0, 4], np.int64)
    attrs["kernarg_size"] = np.int64(8)
    with pytest.raises(Exception, match=r"kernel 'axpy'.*lengths 2, 1, 2"):
        jax.block_until_ready(call(**attrs))
    attrs = ffi._attributes(AXPY, (1, 1, 1), [0], [5], [])
    attrs["arg_offsets"] = np.array([0], np.int64)
    attrs["kernarg_size"] = np.int64(8)
    with pytest.raises(Exception, match=r"kernel 'axpy'.*buffer index 5"):
        jax.block_until_ready(call(**attrs))
    # The process keeps working.
    assert float(jnp.sum(jnp.ones(3))) == 3.0
    _, ok = ffi.dry_run(ffi.Kernel(HASH, "k", params=("i32",)), 1, [5], [])
    assert np.asarray(ok).tobytes() == struct.pack("<i", 5)


def test_cpp_packing_puts_the_workspace_address_at_its_parameter():
    packed = L.pack_kernargs([1, 7, 0], [5, 64, 0], [0, 8, 16], 24, [0x2000], 0xABC00)
    assert packed == struct.pack("<iiQQ", 5, 0, 0xABC00, 0x2000)


WS = ffi.Kernel(HASH, "ws", params=("ptr16", "i32", "ptr"))


def test_workspace_packs_its_pointer_and_each_launch_site_gets_its_own(on_cpu):
    out = [jax.ShapeDtypeStruct((4,), jnp.float32)]
    _, kernargs = ffi.dry_run(WS, 1, [ffi.Workspace(4096), 7, ffi.Out(0)], out)
    b = np.asarray(kernargs).tobytes()
    offsets, _ = WS.layout
    assert struct.unpack_from("<Q", b, offsets[0])[0] == L.DRY_RUN_WORKSPACE
    assert struct.unpack_from("<i", b, offsets[1])[0] == 7
    attrs = [ffi._describe(WS, 1, [ffi.Workspace(4096), 7, ffi.Out(0)], out, ())[2]
             for _ in range(2)]
    assert list(attrs[0]["arg_kinds"]) == [7, 1, 0] and attrs[0]["arg_values"][0] == 4096
    assert 0 < attrs[0]["workspace_id"] != attrs[1]["workspace_id"] > 0
    plain = ffi._describe(WS, 1, [jnp.ones(4), 7, ffi.Out(0)], out, ())[2]
    assert plain["workspace_id"] == 0 and plain["arg_kinds"][0] == 6


@pytest.mark.parametrize("make, error, match", [
    (lambda: ffi.Workspace(0), ValueError, "nbytes"),
    (lambda: ffi.Workspace(2**30 + 1), ValueError, "nbytes"),
    (lambda: ffi.Workspace(True), ValueError, "nbytes"),
    (lambda: ffi.launch(ffi.Kernel(HASH, "two", params=("ptr", "ptr")), 1,
                        [ffi.Workspace(8), ffi.Workspace(8)], [X]),
     ValueError, r"args\[1\] \(ptr\): a launch has at most one Workspace"),
    (lambda: ffi.launch(WS, 1, [jnp.ones(4), ffi.Workspace(8), ffi.Out(0)], [X]),
     TypeError, r"args\[1\] \(i32\)"),
])
def test_workspace_rejects_bad_use(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("kinds, values, workspace_id, match", [
    ([7], [64], 0, "needs a nonzero workspace_id"),
    ([0], [0], 5, "no parameter is a workspace"),
    ([7], [0], 5, r"workspace of 0 bytes is outside"),
    ([7, 7], [64, 64], 5, "more than one workspace parameter"),
])
def test_handler_checks_the_workspace_description(on_cpu, kinds, values, workspace_id, match):
    k = ffi.Kernel(HASH, "w", params=("ptr",) * len(kinds))
    call = jax.ffi.ffi_call(ffi.DRY_RUN_TARGET, [jax.ShapeDtypeStruct((8 * len(kinds),), jnp.uint8)],
                            vmap_method="sequential")
    attrs = ffi._attributes(k, (1, 1, 1), kinds, values, [])
    attrs["workspace_id"] = np.int64(workspace_id)
    operands = [jnp.ones(4)] if 0 in kinds else []
    with pytest.raises(Exception, match=r"kernel 'w'.*" + match):
        jax.block_until_ready(call(*operands, **attrs))


# --------------------------------------------------------------------------
# Lowering for the GPU platforms (no GPU needed)
# --------------------------------------------------------------------------

def exported_text(fn, *avals):
    exp = jax.export.export(jax.jit(fn), platforms=["cuda", "rocm"],
                            disabled_checks=ffi.export_disabled_checks())(*avals)
    return exp.mlir_module()


def test_lowers_for_cuda_and_rocm_with_attributes_and_without_code_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_MXFP4_MOE_CACHE_DIR", str(tmp_path))
    code = b"\x7fELF" + np.random.default_rng(0).integers(0, 256, 8192, np.uint8).tobytes()
    code_hash = ffi.store_code_object(code)
    k = ffi.Kernel(code_hash, "saxpy_kernel", block=(256, 1, 1), shared_mem=70000,
                   params=("ptr", "ptr", "i32", "f32", "null", "null"))

    def f(x):
        (y,) = ffi.launch(k, (7, 3), [x, ffi.Out(0), 1024, 0.5, None, None],
                          [jax.ShapeDtypeStruct(x.shape, x.dtype)], zero_outputs=(0,))
        return y * 2

    text = exported_text(f, jax.ShapeDtypeStruct((1024,), jnp.float32))
    assert "stablehlo.custom_call @jax_mxfp4_moe_launch" in text
    assert f'code_hash = "{code_hash}"' in text
    assert 'kernel = "saxpy_kernel"' in text
    assert "grid = dense<[7, 3, 1]>" in text
    assert "block = dense<[256, 1, 1]>" in text
    assert "shared_mem = 70000" in text
    assert "arg_kinds = dense<[0, 0, 1, 4, 5, 5]>" in text
    assert f"arg_values = dense<[0, 1, 1024, {f32_bits(0.5)}, 0, 0]>" in text
    assert "arg_offsets = dense<[0, 8, 16, 20, 24, 32]>" in text
    assert "kernarg_size = 40" in text
    assert "zero_outputs = dense<0>" in text
    # The code object is named, never embedded.
    assert code[4:40].hex() not in text.lower()
    assert len(text) < 8000


def test_serialized_export_names_the_code_object_only(tmp_path, monkeypatch):
    pytest.importorskip("flatbuffers", reason="jax.export serialisation needs flatbuffers")
    monkeypatch.setenv("JAX_MXFP4_MOE_CACHE_DIR", str(tmp_path))
    code = os.urandom(4096)
    k = ffi.Kernel(ffi.store_code_object(code), "k", params=("ptr", "ptr"))

    def f(x):
        return ffi.launch(k, 1, [x, ffi.Out(0)], [jax.ShapeDtypeStruct(x.shape, x.dtype)])[0]

    exp = jax.export.export(jax.jit(f), platforms=["cuda", "rocm"],
                            disabled_checks=ffi.export_disabled_checks())(
        jax.ShapeDtypeStruct((8,), jnp.float32))
    blob = exp.serialize()
    assert code[:64] not in blob and len(blob) < len(code)
    back = jax.export.deserialize(blob)
    assert back.platforms == ("cuda", "rocm")
    assert f'code_hash = "{k.code_hash}"' in back.mlir_module()


def test_lowering_with_aliases_and_several_launches():
    k = ffi.Kernel(HASH, "inplace", params=("ptr", "ptr", "i32"))

    def f(a, b):
        (a2,) = ffi.launch(k, 1, [a, b, 3], [jax.ShapeDtypeStruct(a.shape, a.dtype)],
                           input_output_aliases={0: 0})
        (b2,) = ffi.launch(k, 2, [b, a2, 4], [jax.ShapeDtypeStruct(b.shape, b.dtype)])
        return a2, b2

    s = jax.ShapeDtypeStruct((8,), jnp.int32)
    text = exported_text(f, s, s)
    assert text.count("custom_call @jax_mxfp4_moe_launch") == 2
    assert "output_operand_aliases" in text


def test_launch_without_extension_raises_clearly(monkeypatch):
    monkeypatch.setattr(ffi, "_launcher", None)
    k = ffi.Kernel(HASH, "k", params=("i32",))
    with pytest.raises(RuntimeError, match="_launcher"):
        ffi.launch(k, 1, [1], [jax.ShapeDtypeStruct((1,), jnp.int32)])


def test_package_imports_without_extension():
    code = ("import sys; sys.modules['jax_mxfp4_moe._launcher'] = None\n"
            "import jax_mxfp4_moe, jax_mxfp4_moe.runtime.ffi as f\n"
            "assert not f.available()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------
# Argument validation: ValueError / TypeError naming the argument
# --------------------------------------------------------------------------

X = jax.ShapeDtypeStruct((4,), jnp.float32)
K3 = ffi.Kernel(HASH, "k3", params=("ptr", "i32", "f32"))


@pytest.mark.parametrize("args, error, match", [
    ([jnp.ones(4), 1], ValueError, r"args: kernel 'k3' takes 3 arguments"),
    ([jnp.ones(4), 1, 2.0, 3], ValueError, "takes 3 arguments"),
    ([1, 1, 2.0], TypeError, r"args\[0\] \(ptr\)"),
    ([ffi.Out(1), 1, 2.0], ValueError, r"args\[0\] \(ptr\): Out\(1\)"),
    ([jnp.ones(4), 1.5, 2.0], TypeError, r"args\[1\] \(i32\)"),
    ([jnp.ones(4), 2**31, 2.0], ValueError, r"args\[1\] \(i32\): 2147483648 does not fit"),
    ([jnp.ones(4), jnp.int32(3), 2.0], TypeError, r"args\[1\] \(i32\)"),
    ([jnp.ones(4), 1, "2"], TypeError, r"args\[2\] \(f32\)"),
    ([jnp.ones(4), 1, jnp.ones(())], TypeError, r"args\[2\] \(f32\)"),
])
def test_launch_rejects_bad_args(args, error, match):
    with pytest.raises(error, match=match):
        ffi.launch(K3, 1, args, [X])


def test_launch_rejects_bad_scalar_kinds():
    k = ffi.Kernel(HASH, "k", params=("u32", "i64", "null"))
    with pytest.raises(ValueError, match=r"args\[0\] \(u32\)"):
        ffi.launch(k, 1, [-1, 0, None], [X])
    with pytest.raises(ValueError, match=r"args\[1\] \(i64\)"):
        ffi.launch(k, 1, [0, 2**63, None], [X])
    with pytest.raises(TypeError, match=r"args\[2\] \(null\)"):
        ffi.launch(k, 1, [0, 0, jnp.ones(1)], [X])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(grid=0), ValueError, "grid"),
    (dict(grid=(1, 2, 3, 4)), ValueError, "grid"),
    (dict(grid=(1.5,)), TypeError, "grid"),
    (dict(grid=2**31), ValueError, "grid"),
    (dict(out_types=X), TypeError, "out_types"),
    (dict(out_types=[3]), TypeError, r"out_types\[0\]"),
    (dict(zero_outputs=(1,)), ValueError, "zero_outputs"),
    (dict(input_output_aliases={1: 0}), ValueError, "input_output_aliases: operand 1"),
    (dict(input_output_aliases={0: 1}), ValueError, "input_output_aliases: result 1"),
    (dict(input_output_aliases={0: 0}, out_types=[jax.ShapeDtypeStruct((5,), jnp.float32)]),
     ValueError, "cannot alias"),
    (dict(kernel="k3"), TypeError, "kernel"),
])
def test_launch_rejects_bad_options(kwargs, error, match):
    call = dict(kernel=K3, grid=1, args=[jnp.ones(4), 1, 2.0], out_types=[X])
    call.update(kwargs)
    with pytest.raises(error, match=match):
        ffi.launch(call.pop("kernel"), call.pop("grid"), call.pop("args"), call.pop("out_types"),
                   **call)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(code_hash="abc"), ValueError, "code_hash"),
    (dict(code_hash=HASH.upper()), ValueError, "code_hash"),
    (dict(name=""), ValueError, "name"),
    (dict(block=(0,)), ValueError, "block"),
    (dict(block=(64, 32)), ValueError, "block"),
    (dict(shared_mem=-1), ValueError, "shared_mem"),
    (dict(params=("ptr", "f64")), ValueError, r"params\[1\]"),
    (dict(params="ptr"), TypeError, "params"),
    (dict(params=("i64",) * 513), ValueError, "params"),
])
def test_kernel_rejects_bad_fields(kwargs, error, match):
    fields = dict(code_hash=HASH, name="k", block=(32,), shared_mem=0, params=("ptr",))
    fields.update(kwargs)
    with pytest.raises(error, match=match):
        ffi.Kernel(**fields)


def test_kernel_normalises_block():
    assert ffi.Kernel(HASH, "k", block=128).block == (128, 1, 1)
    assert ffi.Kernel(HASH, "k", block=(32, 4)).block == (32, 4, 1)


# --------------------------------------------------------------------------
# Code-object store and search path
# --------------------------------------------------------------------------

def test_store_rejects_bytes_that_do_not_match_the_name():
    data = b"some code object bytes"
    with pytest.raises(ValueError, match="SHA-256"):
        L.store_code_object(hashlib.sha256(b"other").hexdigest(), data)
    with pytest.raises(ValueError, match="hex digest"):
        L.store_code_object("nothex", data)
    with pytest.raises(TypeError, match="data"):
        ffi.store_code_object("text")
    with pytest.raises(ValueError, match="data"):
        ffi.store_code_object(b"")


def test_store_code_object_fills_store_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_MXFP4_MOE_CACHE_DIR", str(tmp_path))
    data = os.urandom(300)
    h = ffi.store_code_object(data)
    assert h == hashlib.sha256(data).hexdigest()
    assert (tmp_path / f"{h}.bin").read_bytes() == data
    assert L.has_code_object(h)
    assert L.search_paths() == [str(ffi.OBJECTS_DIR), str(tmp_path)]


def test_search_path_lookup_verifies_content(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_MXFP4_MOE_CACHE_DIR", str(tmp_path))
    ffi._sync_search_paths()
    good = os.urandom(200)
    h_good = hashlib.sha256(good).hexdigest()
    (tmp_path / f"{h_good}.bin").write_bytes(good)
    assert L.has_code_object(h_good)  # found on disk, never stored in-process
    bad = os.urandom(200)
    h_bad = hashlib.sha256(bad).hexdigest()
    (tmp_path / f"{h_bad}.bin").write_bytes(bad[:-1] + bytes([bad[-1] ^ 1]))
    assert not L.has_code_object(h_bad)
    assert not L.has_code_object(hashlib.sha256(b"absent").hexdigest())


def test_fresh_process_finds_cached_object_by_hash(tmp_path):
    data = os.urandom(500)
    h = hashlib.sha256(data).hexdigest()
    (tmp_path / f"{h}.bin").write_bytes(data)
    code = ("import jax_mxfp4_moe.runtime.ffi, jax_mxfp4_moe._launcher as L, sys\n"
            f"sys.exit(0 if L.has_code_object('{h}') else 1)\n")
    env = dict(os.environ, JAX_MXFP4_MOE_CACHE_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)

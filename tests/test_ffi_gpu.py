"""The launcher on a CUDA GPU: a Triton kernel compiled ahead of time and
launched through ffi.launch under jit, compared with jnp; errors; zeroing;
repeated calls (XLA captures the handler into CUDA graphs from the second
execution on)."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

triton = pytest.importorskip("triton", reason="triton not installed")

from jax_mxfp4_moe.runtime import ffi  # noqa: E402
from jax_mxfp4_moe.cuda.compile import compile_triton  # noqa: E402
from test_triton_compile import AXPY_SIGNATURE, axpy_kernel  # noqa: E402

BLOCK = 256


def device_arch() -> int:
    major, minor = jax.devices("cuda")[0].compute_capability.split(".")
    return int(major) * 10 + int(minor)


@pytest.fixture(scope="module")
def axpy(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("JAX_MXFP4_MOE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    cubin, meta = compile_triton(axpy_kernel, AXPY_SIGNATURE, {"BLOCK": BLOCK},
                                 arch=device_arch(), num_warps=4)
    code_hash = ffi.store_code_object(cubin)
    yield ffi.Kernel(code_hash, meta["name"], block=meta["block"], shared_mem=meta["shared"],
                     params=meta["params"])
    mp.undo()


def run_axpy(kernel, x, a, b, *, out=None, zero=False):
    """One launch of y = x * a + b over len(x) elements."""
    n = x.shape[0]
    out_len = n if out is None else out.shape[0]
    hidden = [None] * (len(kernel.params) - 5)
    dst = ffi.Out(0)
    aliases = None
    args = [x, dst, n, a, b] + hidden
    if out is not None:  # write into `out`'s buffer (operand 1 aliases result 0)
        args[1] = out
        aliases = {1: 0}
    (y,) = ffi.launch(kernel, (-(-n // BLOCK),), args,
                      [jax.ShapeDtypeStruct((out_len,), jnp.float32)],
                      zero_outputs=(0,) if zero else (), input_output_aliases=aliases,
                      name="axpy")
    return y


def test_axpy_matches_jnp(axpy):
    x = jax.random.normal(jax.random.key(0), (1000,), jnp.float32)
    f = jax.jit(lambda x: run_axpy(axpy, x, 1.5, -0.25))
    np.testing.assert_allclose(np.asarray(f(x)), np.asarray(x * 1.5 - 0.25), rtol=1e-6, atol=1e-6)


def test_repeated_calls_and_chains_stay_right(axpy):
    # Six launches in one executable; executions after the first may replay
    # a captured CUDA graph, with new input buffers each time. Small integers
    # and these coefficients keep every step exact in f32 (fused or not).
    coefficients = [(2.0, 1.0), (-1.0, 3.0), (0.5, -2.0), (3.0, 0.25), (1.0, 5.0), (-2.0, 7.0)]

    def chain(x):
        for a, b in coefficients:
            x = run_axpy(axpy, x, a, b)
        return x

    f = jax.jit(chain)
    for seed in range(4):
        x = np.random.default_rng(seed).integers(-8, 9, 4099).astype(np.float32)
        expected = x.copy()
        for a, b in coefficients:
            expected = expected * np.float32(a) + np.float32(b)
        np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x))), expected)


def test_zero_outputs_clears_the_result_before_the_launch(axpy):
    x = jnp.ones((300,), jnp.float32)
    base = jnp.full((512,), 7.0, jnp.float32)

    @jax.jit
    def f(x, base):
        zeroed = run_axpy(axpy, x, 2.0, 1.0, out=base, zero=True)
        kept = run_axpy(axpy, x, 2.0, 1.0, out=base + 0.0, zero=False)
        return zeroed, kept

    zeroed, kept = (np.asarray(r) for r in f(x, base))
    np.testing.assert_array_equal(zeroed[:300], 3.0)
    np.testing.assert_array_equal(zeroed[300:], 0.0)
    np.testing.assert_array_equal(kept[:300], 3.0)
    np.testing.assert_array_equal(kept[300:], 7.0)


def test_unknown_code_object_fails_with_the_kernel_name_and_process_continues(axpy):
    missing = ffi.Kernel(hashlib.sha256(b"no such code object").hexdigest(), "ghost_kernel",
                         block=axpy.block, params=axpy.params)
    x = jnp.ones((16,), jnp.float32)
    with pytest.raises(Exception, match=r"ghost_kernel.*in-process store"):
        jax.block_until_ready(jax.jit(lambda x: run_axpy(missing, x, 1.0, 0.0))(x))
    wrong_name = ffi.Kernel(axpy.code_hash, "not_in_this_module", block=axpy.block,
                            params=axpy.params)
    with pytest.raises(Exception, match="not_in_this_module"):
        jax.block_until_ready(jax.jit(lambda x: run_axpy(wrong_name, x, 1.0, 0.0))(x))
    # The process and the launcher keep working.
    y = jax.jit(lambda x: run_axpy(axpy, x, 3.0, 1.0))(x)
    np.testing.assert_array_equal(np.asarray(y), 4.0)


def test_dynamic_shared_memory_above_48k_is_opted_in(axpy):
    # The launch fails unless the launcher raised the function's dynamic
    # shared memory limit (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES).
    big = ffi.Kernel(axpy.code_hash, axpy.name, block=axpy.block, shared_mem=100 * 1024,
                     params=axpy.params)
    x = jnp.arange(64, dtype=jnp.float32)
    y = jax.jit(lambda x: run_axpy(big, x, 2.0, 1.0))(x)
    np.testing.assert_array_equal(np.asarray(y), np.arange(64, dtype=np.float32) * 2 + 1)
    # The same function still launches with its original (smaller) request.
    y = jax.jit(lambda x: run_axpy(axpy, x, 2.0, 1.0))(x)
    np.testing.assert_array_equal(np.asarray(y), np.arange(64, dtype=np.float32) * 2 + 1)

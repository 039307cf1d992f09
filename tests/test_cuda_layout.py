"""The sm90 weight layout (backends/cuda_layout.py) on CPU: padded scale rows
round-trip to the canonical arrays, shapes are validated, the kernels' stride
matches the layout's, and the jnp path reads it."""

import dataclasses

import numpy as np
import pytest

import jax_mxfp4_moe as mm
from jax_mxfp4_moe import layouts, reference
from jax_mxfp4_moe.backends import cuda_layout

from accuracy import assert_close
from moe_cases import GPT_OSS_LIKE, ODD_K, make_tokens, make_weights


@pytest.mark.parametrize("K", [32, 160, 512, 544, 2048, 2880, 7168])
def test_scale_rows_are_16_byte_multiples_that_hold_k_over_32(K):
    n = cuda_layout.scale_row_bytes(K)
    assert n % 16 == 0 and K // 32 <= n < K // 32 + 16


@pytest.mark.parametrize("shape", [GPT_OSS_LIKE, ODD_K])
def test_pack_pads_scale_rows_with_zeros_and_unpack_inverts(shape):
    w = make_weights(shape, gate_up="interleaved", bias=True)
    p = w.to_layout("sm90")
    assert p.layout == "sm90" and p.scale_max == w.scale_max
    for name, k in (("w1_scale", shape.H), ("w2_scale", shape.I)):
        a, c = np.asarray(getattr(p, name)), np.asarray(getattr(w, name))
        assert a.shape == c.shape[:2] + (cuda_layout.scale_row_bytes(k),)
        np.testing.assert_array_equal(a[..., : k // 32], c)
        assert not a[..., k // 32:].any()
    for name in ("w1", "w2", "b1", "b2"):  # the rest is canonical
        np.testing.assert_array_equal(np.asarray(getattr(p, name)), np.asarray(getattr(w, name)))
    back = p.canonical()
    for name in ("w1", "w1_scale", "w2", "w2_scale", "b1", "b2"):
        np.testing.assert_array_equal(np.asarray(getattr(back, name)), np.asarray(getattr(w, name)))


def test_validation_names_a_wrongly_shaped_sm90_array():
    p = make_weights(ODD_K).to_layout("sm90")
    p.validate()
    bad = dataclasses.replace(p, w2_scale=p.w2_scale[..., :-1])
    with pytest.raises(ValueError, match="w2_scale"):
        bad.validate()
    canon_scales = dataclasses.replace(p, w1_scale=make_weights(ODD_K).w1_scale)
    with pytest.raises(ValueError, match="w1_scale"):
        canon_scales.validate()


def test_kernels_compute_the_layouts_stride():
    """moe_gemm.scale_stride (run by triton's interpreter) equals the layout's."""
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    import os
    import subprocess
    import sys
    code = ("import triton, triton.language as tl, torch\n"
            "from jax_mxfp4_moe.backends.cuda_kernels import kernel_modules\n"
            "import importlib\n"
            "g = importlib.import_module(kernel_modules().__name__ + '.moe_gemm')\n"
            "@triton.jit\n"
            "def k(out, K, PAD: tl.constexpr):\n"
            "    tl.store(out, g.scale_stride(K, PAD))\n"
            "for K in (32, 160, 544, 2880, 7168):\n"
            "    for pad in (True, False):\n"
            "        o = torch.zeros(1, dtype=torch.int32)\n"
            "        k[(1,)](o, K, pad)\n"
            "        print(K, int(pad), int(o[0]))\n")
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = [tuple(int(v) for v in line.split()) for line in run.stdout.strip().splitlines()]
    assert len(got) == 10
    for K, pad, stride in got:
        assert stride == (cuda_layout.scale_row_bytes(K) if pad else K // 32), (K, pad)


def test_jnp_path_reads_sm90_weights():
    w = make_weights(ODD_K, gate_up="interleaved")
    x, tw, ids = make_tokens(ODD_K, 5)
    y = mm.moe(x, w.to_layout("sm90"), tw, ids, activation="swiglu_oai", backend="jnp")
    assert_close(y, reference.moe(x, w, tw, ids, activation="swiglu_oai"))
    assert "sm90" in layouts.names()

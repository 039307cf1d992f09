"""The sm90 weight layout (backends/cuda_layout.py) on CPU: 64 x 128 tiles
round-trip to the canonical arrays, shapes are validated, the kernels'
offsets find the layout's bytes, and the jnp path reads it."""

import dataclasses

import numpy as np
import pytest

import jax_mxfp4_moe as mm
from jax_mxfp4_moe.layer import layouts
from jax_mxfp4_moe.numerics import reference
from jax_mxfp4_moe.cuda import layout as cuda_layout

from accuracy import assert_close
from moe_cases import GPT_OSS_LIKE, ODD_K, make_tokens, make_weights


@pytest.mark.parametrize("shape", [GPT_OSS_LIKE, ODD_K])
def test_pack_tiles_values_and_scales_and_unpack_inverts(shape):
    """Each 64-row x 128-K tile is contiguous: tile (t, s) row r holds the
    canonical row 64t + r's bytes of K step s; past N and K, zeros."""
    w = make_weights(shape, gate_up="interleaved", bias=True)
    p = w.to_layout("sm90")
    assert p.layout == "sm90" and p.scale_max == w.scale_max
    for name, n, k in (("w1", 2 * shape.I, shape.H), ("w2", shape.H, shape.I)):
        nt, kt = cuda_layout.tiles(n, k)
        for suffix, row_bytes, per in (("", 64, 2), ("_scale", 4, 32)):
            a = np.asarray(getattr(p, name + suffix))
            c = np.asarray(getattr(w, name + suffix))
            assert a.shape == (shape.E, nt, kt, 64, row_bytes), (name + suffix, a.shape)
            full = np.zeros((shape.E, nt * 64, kt * row_bytes), np.uint8)
            full[:, :n, : k // per] = c
            for t in range(nt):
                for s in range(kt):
                    np.testing.assert_array_equal(
                        a[:, t, s], full[:, 64 * t: 64 * t + 64, row_bytes * s: row_bytes * (s + 1)])
    for name in ("b1", "b2"):  # canonical
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
    canon_values = dataclasses.replace(p, w1=make_weights(ODD_K).w1)
    with pytest.raises(ValueError, match="w1"):
        canon_values.validate()


def test_kernels_address_the_layouts_bytes():
    """addressing.py's offsets (run by triton's interpreter) find every byte of
    canonical and sm90 (TILED) weights: for each row and K step of 128 and
    64, the values and scales the canonical arrays hold there."""
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    import json
    import os
    import subprocess
    import sys
    shape = ODD_K  # N = 2I = 192 and H = 96: neither is a multiple of the tile
    w = make_weights(shape, gate_up="interleaved")
    arrays = {}
    for layout in ("canonical", "sm90"):
        wl = w.to_layout(layout)
        arrays[layout] = [np.asarray(wl.w2).ravel().tolist(), np.asarray(wl.w2_scale).ravel().tolist()]
    code = ("import json, sys, triton, triton.language as tl, torch, importlib\n"
            "from jax_mxfp4_moe.cuda.compile import KERNEL_PACKAGE\n"
            "if not hasattr(tl.constexpr, '__rmod__'):  # as tests/cuda_interpreted.py says\n"
            "    tl.constexpr.__rmod__ = lambda self, other: tl.constexpr(other % self.value)\n"
            "g = importlib.import_module(KERNEL_PACKAGE + '.addressing')\n"
            "@triton.jit\n"
            "def k(w, s, ow, os_, E, N, K, BK: tl.constexpr, TILED: tl.constexpr):\n"
            "    e = tl.program_id(0)\n"
            "    r = tl.arange(0, 256)\n"
            "    row = tl.minimum(r, N - 1)\n"
            "    we = w + e * g.expert_bytes(N, K, g.VALUE_BYTES, TILED)\n"
            "    se = s + e * g.expert_bytes(N, K, g.SCALE_BYTES, TILED)\n"
            "    for k0 in range(0, K, BK):\n"
            "        c = tl.arange(0, BK // 2)\n"
            "        v = tl.load(we + g.row_offsets(row, K, g.VALUE_BYTES, TILED)[:, None] + g.step_offset(k0, BK, g.VALUE_BYTES, TILED) + c[None, :])\n"
            "        tl.store(ow + (e * N + row[:, None]) * (K // 2) + k0 // 2 + c[None, :], v, mask=(r < N)[:, None] & (k0 // 2 + c < K // 2)[None, :])\n"
            "        b = tl.arange(0, BK // 32)\n"
            "        v = tl.load(se + g.row_offsets(row, K, g.SCALE_BYTES, TILED)[:, None] + g.step_offset(k0, BK, g.SCALE_BYTES, TILED) + b[None, :])\n"
            "        tl.store(os_ + (e * N + row[:, None]) * (K // 32) + k0 // 32 + b[None, :], v, mask=(r < N)[:, None] & (k0 // 32 + b < K // 32)[None, :])\n"
            "a = json.load(sys.stdin)\n"
            "E, N, K = a['E'], a['N'], a['K']\n"
            "for layout, tiled in (('canonical', False), ('sm90', True)):\n"
            "    for bk in (128, 64):\n"
            "        ow = torch.zeros(E * N * K // 2, dtype=torch.uint8)\n"
            "        os_ = torch.zeros(E * N * K // 32, dtype=torch.uint8)\n"
            "        w, s = (torch.tensor(v, dtype=torch.uint8) for v in a[layout])\n"
            "        k[(E,)](w, s, ow, os_, E, N, K, BK=bk, TILED=tiled)\n"
            "        print(json.dumps([layout, bk, ow.tolist(), os_.tolist()]))\n")
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600, input=json.dumps(dict(E=shape.E, N=shape.H, K=shape.I,
                                                            **arrays)))
    assert run.returncode == 0, run.stderr[-3000:]
    got = [json.loads(line) for line in run.stdout.strip().splitlines()]
    assert len(got) == 4
    for layout, bk, values, scales in got:
        np.testing.assert_array_equal(np.asarray(values, np.uint8), np.asarray(w.w2).ravel(),
                                      err_msg=f"{layout} BK {bk}")
        np.testing.assert_array_equal(np.asarray(scales, np.uint8),
                                      np.asarray(w.w2_scale).ravel(), err_msg=f"{layout} BK {bk}")


def test_jnp_path_reads_sm90_weights():
    w = make_weights(ODD_K, gate_up="interleaved")
    x, tw, ids = make_tokens(ODD_K, 5)
    y = mm.moe(x, w.to_layout("sm90"), tw, ids, activation="swiglu_oai", backend="jnp")
    assert_close(y, reference.moe(x, w, tw, ids, activation="swiglu_oai"))
    assert "sm90" in layouts.names()

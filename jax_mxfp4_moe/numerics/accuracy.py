"""Accuracy bounds of ``moe`` against the reference: the tests (CPU and GPU) and
``python -m jax_mxfp4_moe.selfcheck`` hold every path to them.

Every mode is held to a relative Frobenius error of 1e-2 and a max-abs error
of 5% of the output's largest magnitude.  Why that suffices for a4w4/a8w4:
the reference quantises x and the intermediate with the same rule in float64
while the implementations accumulate in float32, so a value sitting on a
rounding boundary may fall one quantisation step apart; such elements are a
few in T*k*I and each moves one output row by (one step) x (one W2 column),
far below the bound, while a systematic bug (wrong scale byte, swapped
nibbles, gate/up confusion, a wrong row) gives O(1) errors.  The floor of the
error is the bf16 rounding of y (~2e-3 relative).
"""

import numpy as np

REL_FROBENIUS = 1e-2
MAX_ABS_FRACTION = 5e-2


def errors(y, ref):
    y = np.asarray(np.asarray(y).astype(np.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    denom = max(np.linalg.norm(ref), 1e-30)
    return np.linalg.norm(y - ref) / denom, np.max(np.abs(y - ref), initial=0.0) / max(np.max(np.abs(ref), initial=0.0), 1e-30)


def assert_close(y, ref, *, rel=REL_FROBENIUS, max_abs=MAX_ABS_FRACTION):
    y = np.asarray(np.asarray(y).astype(np.float32), np.float64)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    assert np.isfinite(y).all() == np.isfinite(ref).all(), "NaN/Inf pattern differs"
    fro, mx = errors(y, ref)
    assert fro <= rel and mx <= max_abs, f"relative Frobenius {fro:.3e} (bound {rel}), max-abs {mx:.3e} (bound {max_abs})"


def cosine(a, b):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

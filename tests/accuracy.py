"""The accuracy bounds of the tests: jax_mxfp4_moe.numerics.accuracy (shipped,
so that the selfcheck holds the kernels to the same bounds)."""

from jax_mxfp4_moe.numerics.accuracy import (MAX_ABS_FRACTION, REL_FROBENIUS, assert_close,  # noqa: F401
                                             cosine, errors)

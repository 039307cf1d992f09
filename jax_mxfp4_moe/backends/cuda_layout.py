"""The sm90 weight layout: canonical MXFP4 weights with each scale row padded
to a multiple of 16 bytes.

With K/32 scale bytes per row (90 for gpt-oss's 2880) a row's scales start
at any byte, so a K step's scales are single-byte loads the kernels must
wait for; padded rows start 16-byte aligned, and triton's pipeliner copies
them ahead with the weights (cp.async). The padding (zeros) is never used:
past K the weights read as zero. The fp4 arrays and biases are canonical.
"""

from __future__ import annotations

import jax.numpy as jnp

from .. import formats, layouts

NAME = "sm90"
SCALE_ROW_ALIGN = 16  # bytes; kernels/triton/moe_gemm.py scale_stride computes the same


def scale_row_bytes(k: int) -> int:
    """Bytes per padded scale row of a K-long weight row."""
    return -(-(k // formats.MX_BLOCK) // SCALE_ROW_ALIGN) * SCALE_ROW_ALIGN


class Sm90Layout:
    name = NAME

    def shapes(self, *, num_experts, hidden, intermediate):
        from ..weights import canonical_shapes
        E, H, I = num_experts, hidden, intermediate
        out = canonical_shapes(E, H, I)
        out["w1_scale"] = ((E, 2 * I, scale_row_bytes(H)), "uint8")
        out["w2_scale"] = ((E, H, scale_row_bytes(I)), "uint8")
        return out

    def pack(self, canon, *, num_experts, hidden, intermediate):
        out = {k: v for k, v in canon.items() if v is not None}
        for name, k in (("w1_scale", hidden), ("w2_scale", intermediate)):
            s = jnp.asarray(out[name])
            out[name] = jnp.pad(s, ((0, 0), (0, 0), (0, scale_row_bytes(k) - s.shape[2])))
        return out

    def unpack(self, arrays, *, num_experts, hidden, intermediate):
        out = {k: v for k, v in arrays.items() if v is not None}
        for name, k in (("w1_scale", hidden), ("w2_scale", intermediate)):
            out[name] = jnp.asarray(out[name])[:, :, : k // formats.MX_BLOCK]
        return out


LAYOUT = Sm90Layout()
layouts.register(LAYOUT)

"""Scaled-MFMA operand loads and the instruction itself (gfx950).

Operand placement is ``jax_mxfp4_moe.backends.rocm_index`` (shared with the
host model): lane ``l`` feeds row ``l % 16`` and the 32 K elements of MX block
``l // 16`` of a 128-wide K step, with that block's scale byte.
"""

import flydsl.expr as fx
from flydsl._mlir import ir
from flydsl._mlir.dialects import arith, vector
from flydsl.expr import rocdl

from jax_mxfp4_moe.backends import rocm_index as ix

from . import common as c

# MatrixFormat codes of the scaled MFMA (cbsz for A, blgp for B).
FMT_CODE = {"mxfp8": 0, "mxfp4": 4}
LANE_BYTES = {"mxfp4": 16, "mxfp8": 32}  # bytes of one lane's 32 elements


def row_bytes(k, fmt):
    return k // 2 if fmt == "mxfp4" else k


def zero_acc():
    f32 = ir.F32Type.get()
    ty = ir.VectorType.get([4], f32)
    return arith.constant(ty, ir.DenseElementsAttr.get_splat(ty, ir.FloatAttr.get(f32, 0.0)))


def load_a(rsrc, row_offset, kb, lane, fmt):
    """A operand of K step ``kb`` for a row starting at byte ``row_offset``."""
    nbytes = LANE_BYTES[fmt]
    off = row_offset + kb * row_bytes(ix.MFMA_K, fmt) + ix.operand_kblock(lane) * nbytes
    if fmt == "mxfp4":
        return c.load(rsrc, off, 16)
    lo = c.load(rsrc, off, 16)
    hi = c.load(rsrc, off + 16, 16)
    return vector.shuffle(lo, hi, list(range(8)))


def load_a_scale(rsrc, scale_row_offset, kb, lane):
    return c.load(rsrc, scale_row_offset + kb * ix.SCALES_PER_MFMA_K + ix.operand_kblock(lane), 1)


def load_b(rsrc, srsrc, nb, kb, lane, kblocks, aux):
    """Pre-shuffled MXFP4 B tile (nb, kb): this lane's 16 bytes and scale byte."""
    data = c.load(rsrc, ix.tile_offset(nb, kb, lane, kblocks), 16, aux)
    scale = c.load(srsrc, ix.tile_scale_offset(nb, kb, lane, kblocks), 1, aux)
    return data, scale


def mfma(a, a_scale, b, b_scale, acc, a_fmt):
    """acc += (A * 2**scaleA) @ (B * 2**scaleB) over one 16x16x128 step; B is MXFP4."""
    f32 = ir.F32Type.get()
    return rocdl.mfma_scale_f32_16x16x128_f8f6f4(
        ir.VectorType.get([4], f32),
        [a, b, acc, FMT_CODE[a_fmt], FMT_CODE["mxfp4"], 0, c.raw(a_scale), 0, c.raw(b_scale)],
    )


def acc_elem(acc, i):
    return fx.Float32(vector.extract(acc, static_position=[i], dynamic_position=[]))

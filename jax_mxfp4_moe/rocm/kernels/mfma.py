"""Scaled-MFMA operand loads and the instruction itself (gfx950).

Operand placement is ``jax_mxfp4_moe.rocm.geometry`` (shared with the
host model): lane ``l`` feeds row ``l % 16`` and the 32 K elements of MX block
``l // 16`` of a 128-wide K step, with that block's scale byte.
"""

import flydsl.expr as fx
from flydsl._mlir import ir
from flydsl._mlir.dialects import arith, vector
from flydsl.expr import rocdl

from jax_mxfp4_moe.rocm import geometry as ix

from jax_mxfp4_moe.rocm.kernels import common as c

# MatrixFormat codes of the scaled MFMA (cbsz for A, blgp for B).
FMT_CODE = {"mxfp8": 0, "mxfp4": 4}
LANE_BYTES = {"mxfp4": 16, "mxfp8": 32}  # bytes of one lane's 32 elements (an MX block's worth)


def row_bytes(k, fmt):
    return k // 2 if fmt == "mxfp4" else k


def zero_acc():
    f32 = ir.F32Type.get()
    ty = ir.VectorType.get([4], f32)
    return arith.constant(ty, ir.DenseElementsAttr.get_splat(ty, ir.FloatAttr.get(f32, 0.0)))


def load_a(rsrc, row_offset, kb, lane, fmt):
    """A operand of K step ``kb`` for a row starting at byte ``row_offset`` (register order)."""
    base = row_offset + kb * row_bytes(ix.MFMA_K, fmt)
    parts = [c.load(rsrc, base + off, n) for off, n in ix.operand_chunks(lane, fmt)]
    if len(parts) == 1:
        return parts[0]
    return vector.shuffle(parts[0], parts[1], list(range(8)))


def load_a_scale(rsrc, scale_row_offset, kb, lane):
    return c.load(rsrc, scale_row_offset + kb * ix.SCALES_PER_MFMA_K + ix.operand_kblock(lane), 1)


class WeightTiles:
    """One expert's pre-shuffled MXFP4 tiles as FlyDSL buffer tensors.

    Loads go through the layout API: ``fx.copy`` with a ``BufferCopy128b``
    atom (data, 16 bytes per lane) and ``BufferCopy8b`` (scale byte), cached
    or non-temporal (``nt``).  The views' strides are ``rocm_index``'s tile
    strides, their extents one expert's tiles (the buffer descriptor's size:
    loads past the expert read 0)."""

    def __init__(self, data_addr, scale_addr, nblocks, kblocks, nt):
        from flydsl._mlir.extras import types as T

        cm = c.AUX_NONTEMPORAL if nt else c.AUX_CACHED
        s_nb, s_kb, s_lane = ix.tile_strides(kblocks)
        i32p = fx.PointerType.get(T.i32(), address_space=fx.AddressSpace.Global, alignment=16)
        data = fx.make_view(fx.inttoptr(i32p, fx.Int64(data_addr)), fx.make_layout(
            (nblocks, kblocks, ix.WAVE, ix.LANE_BYTES // 4), (s_nb // 4, s_kb // 4, s_lane // 4, 1)))
        self.data = fx.rocdl.make_buffer_tensor(fx.Tensor(data), max_size=False)
        self.data_atom = fx.make_copy_atom(fx.rocdl.BufferCopy128b(cm), 32)
        t_nb, t_kb, t_lane = ix.tile_scale_strides(kblocks)
        i8p = fx.PointerType.get(T.i8(), address_space=fx.AddressSpace.Global, alignment=1)
        scales = fx.make_view(fx.inttoptr(i8p, fx.Int64(scale_addr)), fx.make_layout(
            (nblocks, kblocks, ix.WAVE, 1), (t_nb, t_kb, t_lane, 1)))
        self.scales = fx.rocdl.make_buffer_tensor(fx.Tensor(scales), max_size=False)
        self.scale_atom = fx.make_copy_atom(fx.rocdl.BufferCopy8b(cm), 8)

    # Region-local: carried through the DSL's if/for rewriting as no IR values.
    def __extract_to_ir_values__(self):
        return []

    def __get_ir_types__(self):
        return []

    @classmethod
    def __construct_from_ir_values__(cls, values, exemplar=None):
        return exemplar

    def load(self, nb, kb, lane):
        """(vector<4xi32> of this lane's 32 fp4 values, its scale byte as i32) of tile (nb, kb)."""
        frag = fx.make_rmem_tensor(ix.LANE_BYTES // 4, fx.Int32)
        fx.copy(self.data_atom, self.data[nb, kb, lane, None], frag)
        sfrag = fx.make_rmem_tensor(1, fx.Int8)
        fx.copy(self.scale_atom, self.scales[nb, kb, lane, None], sfrag)
        byte = vector.extract(c.raw(fx.memref_load_vec(sfrag)), static_position=[0], dynamic_position=[])
        return c.raw(fx.memref_load_vec(frag)), fx.Int32(arith.extui(ir.IntegerType.get_signless(32), byte))


def mfma(a, a_scale, b, b_scale, acc, a_fmt):
    """acc += (A * 2**scaleA) @ (B * 2**scaleB) over one 16x16x128 step; B is MXFP4."""
    f32 = ir.F32Type.get()
    return rocdl.mfma_scale_f32_16x16x128_f8f6f4(
        ir.VectorType.get([4], f32),
        [a, b, acc, FMT_CODE[a_fmt], FMT_CODE["mxfp4"], 0, c.raw(a_scale), 0, c.raw(b_scale)],
    )


def acc_elem(acc, i):
    return fx.Float32(vector.extract(acc, static_position=[i], dynamic_position=[]))

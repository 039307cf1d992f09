"""Activation quantisation x[T, K] -> MXFP4 / MXFP8 (+ E8M0 scales), gfx950.

One thread per 32-element block: it loads the block (bf16 or f32), applies
the rule in ``mx.py`` (hardware conversions) and writes 16 (fp4) or 32 (fp8)
bytes in row order and its scale byte where the GEMMs load it
(``geometry.act_scale_offset``: a lane's scales of four K steps in one
dword).  The thread of a row's last block also zeroes the row's unused scale
bytes (steps past K in the last chunk), so the output holds no stale bytes.
Rows are runtime (``rows``), K is static (a multiple of 128).
"""


import flydsl.compiler as flyc
import flydsl.expr as fx
from flydsl.expr import gpu

from jax_mxfp4_moe.rocm import geometry as ix

from jax_mxfp4_moe.rocm.kernels import common as c
from jax_mxfp4_moe.rocm.kernels.mx import quantize_block
from jax_mxfp4_moe.spec import MX_BLOCK

BLOCK = ix.QUANT_BLOCK
IN_DTYPES = {"bf16": 2, "f32": 4}
FORMATS = {"mxfp4": 16, "mxfp8": 32}  # bytes per quantised block


def kernel_name(*, cols, fmt, in_dtype):
    return f"moe_quant_{in_dtype}_{fmt}_k{cols}"


def build(*, cols, fmt, in_dtype):
    if cols % ix.MFMA_K or cols <= 0:
        raise ValueError(f"cols: must be a positive multiple of {ix.MFMA_K}, got {cols}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {sorted(FORMATS)}, got {fmt!r}")
    if in_dtype not in IN_DTYPES:
        raise ValueError(f"in_dtype: expected one of {sorted(IN_DTYPES)}, got {in_dtype!r}")
    name = kernel_name(cols=cols, fmt=fmt, in_dtype=in_dtype)
    kblocks = cols // MX_BLOCK
    in_bytes = IN_DTYPES[in_dtype]
    out_bytes = FORMATS[fmt]
    srow = ix.act_scale_row_bytes(cols)
    used = {ix.act_scale_offset(0, b, cols) for b in range(kblocks)}
    unused = [o for o in range(srow) if o not in used]

    @flyc.kernel(name=name, known_block_size=[BLOCK, 1, 1])
    def quant_kernel(x: fx.Int64, q: fx.Int64, scale: fx.Int64, rows: fx.Int32):
        gid = gpu.block_idx.x * BLOCK + gpu.thread_idx.x
        if gid < rows * kblocks:
            xb = c.buffer(x)
            qb = c.buffer(q)
            sb = c.buffer(scale)
            row = gid // kblocks
            blk = gid % kblocks
            base = gid * (MX_BLOCK * in_bytes)
            vals = []
            for i in fx.range_constexpr(MX_BLOCK * in_bytes // 16):
                words = c.vec_elems(c.load(xb, base + i * 16, 16), 4)
                for w in words:
                    if in_bytes == 2:
                        lo, hi = c.bf16_pair_to_f32(w)
                        vals += [lo, hi]
                    else:
                        vals.append(c.f32_from_bits(w))
            byte, packed = quantize_block(vals, fmt)
            for i in fx.range_constexpr(out_bytes // 16):
                c.store(qb, gid * out_bytes + i * 16, c.vec_i32(packed[4 * i : 4 * i + 4]), 16)
            c.store(sb, ix.act_scale_offset(row, blk, cols), byte, 1)
            if blk == kblocks - 1:
                for o in fx.range_constexpr(len(unused)):
                    c.store(sb, row * srow + unused[o], fx.Int32(0), 1)

    @flyc.jit
    def launch(x: fx.Int64, q: fx.Int64, scale: fx.Int64, rows: fx.Int32, stream: fx.Stream = fx.Stream(None)):
        quant_kernel(x, q, scale, rows).launch(grid=(1, 1, 1), block=(BLOCK, 1, 1), stream=stream)

    return c.KernelBuild(name, (BLOCK, 1, 1), ("ptr", "ptr", "ptr", "i32"), launch)

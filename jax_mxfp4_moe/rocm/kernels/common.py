"""Low-level helpers shared by the gfx950 kernels (emit IR inside a kernel).

Kernel arguments are raw ``fx.Int64`` addresses and ``fx.Int32`` scalars, so
the kernarg segment is a plain naturally aligned struct the FFI launcher can
pack.  Global memory is reached through buffer resources: a resource carries
its size in bytes, and the hardware returns 0 for a load past it and drops a
store past it (CDNA raw-buffer range check), which keeps gathers of padding
rows in bounds.
"""


import flydsl.expr as fx
from flydsl._mlir import ir
from flydsl._mlir.dialects import arith, llvm, rocdl, scf, vector
from flydsl.expr import gpu

WAVE = 64
# Buffer descriptor word 3 on CDNA: DATA_FORMAT=7 (32 bit), NUM_FORMAT=4.
_BUFFER_FLAGS = (7 << 12) | (4 << 15)
# Cache policy operand of buffer loads on gfx940+: bit 1 is NT (streaming).
AUX_CACHED = 0
AUX_NONTEMPORAL = 2


def raw(v):
    """The MLIR value of a DSL value (or the value itself)."""
    return v.ir_value() if hasattr(v, "ir_value") else v


def global_ptr(addr_i64):
    return llvm.inttoptr(ir.Type.parse("!llvm.ptr<1>"), raw(fx.Int64(addr_i64)))


def buffer(addr_i64, nbytes=None):
    """Buffer resource over ``nbytes`` bytes at address ``addr_i64``."""
    size = fx.Int64(0xFFFFFFFF) if nbytes is None else fx.Int64(nbytes)
    return rocdl.make_buffer_rsrc(
        ir.Type.parse("!llvm.ptr<8>"),
        global_ptr(addr_i64),
        raw(fx.Int16(0)),
        raw(size),
        raw(fx.Int32(_BUFFER_FLAGS)),
    )


def i32_buffer(addr_i64, nbytes=None, tile=4):
    """A buffer-resource tensor of i32 over ``nbytes`` bytes at ``addr_i64``
    (None: the largest range), divided into tiles of ``tile`` i32: the view
    ``fx.copy`` atoms (buffer loads, the LDS DMA) take, indexed by tile."""
    from flydsl._mlir.extras import types as T

    size = fx.Int64(0xFFFFFFFF) if nbytes is None else fx.Int64(nbytes)
    ptr_ty = fx.PointerType.get(T.i32(), address_space=fx.AddressSpace.Global, alignment=4 * tile)
    view = fx.Tensor(fx.make_view(fx.inttoptr(ptr_ty, fx.Int64(addr_i64)), fx.make_layout(size // fx.Int64(4), 1)))
    buf = fx.rocdl.make_buffer_tensor(view, max_size=False, num_records_bytes=size)
    return fx.logical_divide(buf, fx.make_layout(tile, 1))


def byte_buffer(addr_i64, nbytes=None):
    """A buffer-resource tensor of bytes over ``nbytes`` bytes at ``addr_i64``
    (None: the largest range): views of it at byte offsets (``at``) let a lane
    offset in bytes feed a load as is (no shift to element units)."""
    from flydsl._mlir.extras import types as T

    size = fx.Int64(0xFFFFFFFF) if nbytes is None else fx.Int64(nbytes)
    ptr_ty = fx.PointerType.get(T.i8(), address_space=fx.AddressSpace.Global, alignment=16)
    view = fx.Tensor(fx.make_view(fx.inttoptr(ptr_ty, fx.Int64(addr_i64)), fx.make_layout(size, 1)))
    return fx.rocdl.make_buffer_tensor(view, max_size=False, num_records_bytes=size)


def at(buf, byte_offset, nbytes):
    """The ``nbytes`` bytes of ``buf`` (a byte_buffer, or LDS bytes) from ``byte_offset`` on, as a view."""
    return fx.make_view(fx.get_iter(buf) + byte_offset, fx.make_layout(nbytes, 1))


def _vec_type(nbytes):
    i32 = ir.IntegerType.get_signless(32)
    if nbytes == 1:
        return ir.IntegerType.get_signless(8)
    if nbytes == 2:
        return ir.IntegerType.get_signless(16)
    if nbytes == 4:
        return i32
    if nbytes in (8, 12, 16):
        return ir.VectorType.get([nbytes // 4], i32)
    raise ValueError(f"nbytes: unsupported buffer access width {nbytes}")


def _aux(value):
    return ir.IntegerAttr.get(ir.IntegerType.get_signless(32), value)


def load(rsrc, byte_offset, nbytes, aux=AUX_CACHED):
    """Buffer load of ``nbytes`` (1, 2, 4, 8 or 16) at ``byte_offset``.

    Returns an ``fx.Int32`` for widths up to 4 (zero-extended) and a raw
    ``vector<Nxi32>`` value for 8 and 16."""
    val = rocdl.raw_ptr_buffer_load(_vec_type(nbytes), rsrc, raw(fx.Int32(byte_offset)), raw(fx.Int32(0)), aux=_aux(aux))
    if nbytes < 4:
        return fx.Int32(arith.extui(ir.IntegerType.get_signless(32), val))
    if nbytes == 4:
        return fx.Int32(val)
    return val


def store(rsrc, byte_offset, value, nbytes):
    """Buffer store of an i32 value (low ``nbytes`` bytes for 1/2) or a vector."""
    v = raw(value)
    if nbytes < 4:
        v = arith.trunci(_vec_type(nbytes), v)
    rocdl.raw_ptr_buffer_store(v, rsrc, raw(fx.Int32(byte_offset)), raw(fx.Int32(0)), aux=_aux(0))


def vec_elems(v, n):
    """Split a raw ``vector<nxi32>`` into ``n`` ``fx.Int32``."""
    return [fx.Int32(vector.extract(v, static_position=[i], dynamic_position=[])) for i in range(n)]


def vec_i32(elems):
    """Build a raw ``vector<nxi32>`` from DSL/raw i32 values."""
    i32 = ir.IntegerType.get_signless(32)
    return vector.from_elements(ir.VectorType.get([len(elems)], i32), [raw(fx.Int32(e)) for e in elems])


def vec_f32(elems):
    f32 = ir.F32Type.get()
    return vector.from_elements(ir.VectorType.get([len(elems)], f32), [raw(e) for e in elems])


def opaque(x):
    """``x`` (an i32 in a VGPR) through an empty asm statement: zero
    instructions, but the compiler can no longer treat it as loop-invariant.
    Used on lane offsets at the top of a loop body, so that ``offset + C``
    stays next to its load and C lands in the instruction's immediate offset
    field, instead of being hoisted into one more VGPR per distinct C."""
    i32 = ir.IntegerType.get_signless(32)
    return fx.Int32(llvm.inline_asm(i32, [raw(fx.Int32(x))], "", "=v,0", has_side_effects=False))


def pin(x):
    """``x`` (an f32 or i32 in a VGPR) through an empty asm statement with
    side effects: zero instructions, but it is computed here, in program
    order, and cannot be sunk into a later branch (the memory waits its
    operands need are then issued here too)."""
    t = raw(x).type
    return type(x)(llvm.inline_asm(t, [raw(x)], "", "=v,0", has_side_effects=True))


def if_else(cond, n, then_fn, else_fn):
    """scf.if yielding the ``n`` i32 values each branch function returns (a list).

    The DSL turns ``if`` into scf.if only inside kernel bodies; helpers in
    other modules build it here."""
    i32 = ir.IntegerType.get_signless(32)
    op = scf.IfOp(raw(cond), [i32] * n, has_else=True)
    for block, fn in ((op.then_block, then_fn), (op.else_block, else_fn)):
        with ir.InsertionPoint(block):
            vals = fn()
            if len(vals) != n:
                raise ValueError(f"if_else: a branch returned {len(vals)} values, expected {n}")
            scf.YieldOp([raw(fx.Int32(v)) for v in vals])
    return [fx.Int32(r) for r in op.results]


def f32_bits(x):
    return fx.Float32(x).bitcast(fx.Int32)


def f32_from_bits(u):
    return fx.Int32(u).bitcast(fx.Float32)


def shr(x, n):
    """Logical right shift of an i32."""
    return fx.Int32(x).shrui(raw(fx.Int32(n)))


def bf16_pair_to_f32(word):
    """An i32 holding two bf16 (element 0 low) -> (f32, f32)."""
    w = fx.Int32(word)
    return f32_from_bits(w << 16), f32_from_bits(w & fx.Int32(-65536))


def ballot(pred):
    """64-bit mask of the lanes whose ``pred`` is true."""
    return fx.Int64(rocdl.ballot(ir.IntegerType.get_signless(64), raw(pred)))


def popcount64(m):
    return fx.Int32(arith.trunci(ir.IntegerType.get_signless(32), llvm.intr_ctpop(raw(fx.Int64(m)))))


def lane_id():
    """Lane index within the wave (mbcnt over a full mask)."""
    i32 = ir.IntegerType.get_signless(32)
    lo = rocdl.mbcnt_lo(i32, raw(fx.Int32(-1)), raw(fx.Int32(0)))
    return fx.Int32(rocdl.mbcnt_hi(i32, raw(fx.Int32(-1)), lo))


def readfirstlane(x):
    return fx.Int32(rocdl.readfirstlane(ir.IntegerType.get_signless(32), raw(fx.Int32(x))))


def lds_load(ptr, idx):
    return fx.ptr_load(ptr + fx.Int64(idx))


def lds_store(ptr, idx, value):
    fx.ptr_store(value, ptr + fx.Int64(idx))


def lds_load_f32(ptr, idx, n):
    """``n`` consecutive f32 (one vector load) as a list."""
    v = fx.ptr_load(ptr + fx.Int64(idx), result_type=fx.Vector.make_type(n, fx.Float32))
    return [fx.Float32(v[i]) for i in range(n)]


def _dpp(x, ctrl):
    """llvm.amdgcn.update.dpp.i32 (a raw intrinsic: the layout API has no cross-lane operation)."""
    i32 = ir.IntegerType.get_signless(32)
    i1 = ir.IntegerType.get_signless(1)
    xr = raw(fx.Int32(x))
    args = [xr, xr, arith.constant(i32, ctrl), arith.constant(i32, 0xF), arith.constant(i32, 0xF),
            arith.constant(i1, 1)]
    return fx.Int32(llvm.call_intrinsic(i32, "llvm.amdgcn.update.dpp.i32", args, [], []))


def quad_max_i32(x):
    """Max of a non-negative i32 over the 4 lanes of each quad (two DPP quad_perm steps)."""
    x = fx.Int32(x)
    for ctrl in (0xB1, 0x4E):  # quad_perm [1,0,3,2], then [2,3,0,1]
        y = _dpp(x, ctrl)
        x = (x > y).select(x, y)
    return x


def lds_load_f32x2(ptr, idx):
    """Two consecutive f32 (ds_read_b64) as a list."""
    v = fx.ptr_load(ptr + fx.Int64(idx), result_type=fx.Vector.make_type(2, fx.Float32))
    return [fx.Float32(v[0]), fx.Float32(v[1])]


def atomic_add_bf16x2(addr_i64, lo_f32, hi_f32):
    """``global_atomic_pk_add_bf16``: add (lo, hi) rounded to bf16 at a 4-byte aligned address."""
    bf16 = ir.BF16Type.get()
    v2 = ir.VectorType.get([2], bf16)
    lo = arith.truncf(bf16, raw(fx.Float32(lo_f32)))
    hi = arith.truncf(bf16, raw(fx.Float32(hi_f32)))
    val = vector.from_elements(v2, [lo, hi])
    llvm.atomicrmw(
        llvm.AtomicBinOp.fadd,
        global_ptr(addr_i64),
        val,
        llvm.AtomicOrdering.monotonic,
        syncscope="agent",
        alignment=4,
    )


class KernelBuild:
    """What a kernel builder hands the compiler: symbol, block, params, launcher.

    ``params`` are FFI kernarg kinds in order ("ptr" = raw i64 address,
    "i32"); ``launcher`` is the ``@flyc.jit`` host function taking exactly
    those arguments.  Its own grid is a placeholder: the FFI launcher uses
    the grids of ``rocm.geometry``."""

    def __init__(self, name, block, params, launcher):
        self.name = name
        self.block = tuple(block)
        self.params = tuple(params)
        self.launcher = launcher


def global_store_f32x2(addr_i64, lo_f32, hi_f32):
    """Plain 8-byte global store of two f32 at an 8-byte aligned address."""
    llvm.store(vec_f32([fx.Float32(lo_f32), fx.Float32(hi_f32)]), global_ptr(addr_i64), alignment=8)


"""The pipelined K loop shared by gemm1 and gemm2 (gfx950).

One block of ``waves`` waves multiplies bm gathered A rows (MXFP4 or MXFP8,
E8M0 scales) by ``nt`` pre-shuffled 16-row MXFP4 weight tiles per wave,
128 K per step, with ``v_mfma_scale_f32_16x16x128_f8f6f4`` through
``fx.gemm`` and the scaled-MFMA atoms (``op_sel`` picks each step's scale
byte out of the packed dwords, ``geometry.SCALE_STEPS``).

Pipeline (``geometry`` holds every index it uses):

- A is staged once per block through an LDS ring of ``RING_SLOTS`` slots of
  two steps, filled by ``buffer_load_dwordx4 ... lds`` (the async LDS-DMA
  copy atom) and XOR-swizzled by ``lds_chunk``: the DMA of stage u + 2 is
  issued right after the barrier of stage u, one barrier per stage.  The
  waves read A with ``ds_read_b128`` one step ahead of its MFMAs.
- B tiles are prefetched ``prefetch`` steps ahead into rotating register
  sets, each load issued right after the MFMAs that free its registers; the
  packed scale dwords of four steps are loaded ``scale_lead`` steps ahead.
- One ``s_waitcnt`` per step, before its MFMAs: loads a step consumes are
  issued in reverse order of use, so the compiler's wait for the first one
  covers them all, and counts only what those MFMAs need (``sched_barrier``
  pins the issue order).
  The DMA, which the compiler does not track, is waited for with an
  explicit ``s_waitcnt vmcnt(n)`` before each barrier, n counted from the
  plan (the vector-memory operations issued after it).

The steady loop is an ``scf.for`` over bodies of ``loop_body_steps`` steps
(every register set, scale set and ring slot index is static in a body);
the remaining steps run unrolled and issue only loads that exist.  The DMA
may run past the last stage in the loop (it reads inside the A buffer or
zeros into slots nobody reads); ``finish`` drains it before the LDS is
reused.
"""

import flydsl.expr as fx
from flydsl._mlir import ir
from flydsl._mlir.dialects import arith, scf
from flydsl.expr import rocdl
from flydsl.expr.typing import Float4E2M1FN, Float8E4M3FN

from jax_mxfp4_moe.rocm import geometry as ix

from jax_mxfp4_moe.rocm.kernels import common as c

_ELEM = {"mxfp4": Float4E2M1FN, "mxfp8": Float8E4M3FN}
_VMCNT_MAX = 63  # 6-bit field on gfx9


def sched_fence():
    """Nothing moves across this point (the issue order the wait counts assume)."""
    rocdl.sched_barrier(0)


class Config:
    """Static shape of one block's K loop."""

    def __init__(self, *, fmt, bm, nt, waves, prefetch):
        if fmt not in _ELEM:
            raise ValueError(f"fmt: expected 'mxfp4' or 'mxfp8', got {fmt!r}")
        if bm not in (16, 32, 64, 128):
            raise ValueError(f"bm: expected 16, 32, 64 or 128, got {bm}")
        if nt < 1 or waves not in (1, 2, 4, 8):
            raise ValueError(f"tiles/waves: expected tiles >= 1 and waves in (1, 2, 4, 8), got {nt}, {waves}")
        self.fmt, self.bm, self.nt, self.waves, self.prefetch = fmt, bm, nt, waves, prefetch
        self.mt = bm // ix.MFMA_M
        self.pieces = len(ix.operand_chunks(0, fmt))  # ds_read_b128 per A operand
        self.a_words = 4 * self.pieces
        self.srow = ix.stage_row_bytes(fmt)
        self.ops = ix.dma_ops(bm, fmt)
        self.rounds = -(-self.ops // waves)
        self.slot_bytes = self.rounds * waves * ix.WAVE * ix.DMA_BYTES  # >= bm * srow (idle ops fill padding)
        self.ring_bytes = ix.RING_SLOTS * self.slot_bytes
        self.step_a_bytes = ix.row_bytes(ix.MFMA_K, fmt)
        self.lead = ix.scale_lead(prefetch)
        self.scale_sets = ix.scale_sets(prefetch)
        self.body = ix.loop_body_steps(prefetch)
        # Up to two M tiles, A(t + 1) is read whole before the MFMAs of step t
        # (one lgkmcnt per step); more, each M tile's registers are refilled
        # right after its MFMAs (half the registers, one lgkmcnt per M tile).
        self.a_sets = 2 if self.mt <= 2 else 1


class Sources:
    """Operand addresses of one block, built by the gemm kernel.

    ``a_buf[r]``: A rows as a byte buffer (``common.byte_buffer``) for DMA
    round r; ``dma_voff[r]``: byte offset of the 16 bytes this lane moves
    in round r at K step 0 (its row's start + logical chunk * 16);
    ``as_buf``/``as_voff[m]``: byte offset of this lane's A-scale dword of M
    tile m at chunk 0; ``w_bufs[j]``/``ws_bufs[j]``: byte buffers whose
    base is the wave's weight tile j / its scales at step 0 (a resource per
    tile: the loads of one step then share one soffset).  All offsets are non-negative.  ``ring``: the LDS ring (i32
    pointer)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class KLoop:
    # Carried through the DSL's if/for rewriting as no IR values: its state
    # lives in register tensors (memrefs), which branches update in place.
    def __extract_to_ir_values__(self):
        return []

    def __get_ir_types__(self):
        return []

    @classmethod
    def __construct_from_ir_values__(cls, values, exemplar=None):
        return exemplar

    def __init__(self, cfg, src, lane, wave, cache_modifier=0):
        self.cfg, self.src, self.lane, self.wave = cfg, src, lane, wave
        # Copy atoms on byte views: a lane's offset in bytes feeds the
        # instruction as is, static parts land in its immediate field.
        self.dma_atom = fx.make_copy_atom(fx.rocdl.cdna4.BufferLoadAsyncLDS128b(), fx.Int8)
        self.ld128 = fx.make_copy_atom(fx.rocdl.BufferCopy128b(cache_modifier), fx.Int8)
        self.ld32w = fx.make_copy_atom(fx.rocdl.BufferCopy32b(cache_modifier), fx.Int8)
        self.ld32a = fx.make_copy_atom(fx.rocdl.BufferCopy32b(0), fx.Int8)
        self.lds128 = fx.make_copy_atom(fx.UniversalCopy128b(), fx.Int8)
        self.atoms = [fx.make_mma_atom(fx.rocdl.cdna4.MFMA_Scale(
            16, 16, 128, _ELEM[cfg.fmt], Float4E2M1FN, opsel_a=i, opsel_b=i)) for i in range(ix.SCALE_STEPS)]
        self.ring = fx.make_view(fx.recast_iter(fx.Int8, src.ring), fx.make_layout(cfg.ring_bytes, 1))
        r = lane % ix.MFMA_M
        # Per-lane byte offsets (VGPRs); everything wave-uniform (tile bases,
        # the K position) goes to soffset or the resource, static parts to
        # the immediate field.  ds_read: per (step in stage, piece), M tile 0.
        read_off = [r * cfg.srow + ix.lds_chunk(r, ch, cfg.fmt) * ix.DMA_BYTES
                    for h in range(ix.STAGE_STEPS) for ch in ix.a_read_chunks(lane, h, cfg.fmt)]
        self.lanes = {
            "dma": list(src.dma_voff),
            "as": list(src.as_voff),
            "b": [fx.Int32(lane) * ix.LANE_BYTES],  # lane slots of a weight tile
            "bs": [fx.Int32(lane) * ix.SCALE_STEPS],  # lane dwords of a scale tile
            "read": read_off,
        }
        rm = lambda n, ty: fx.make_rmem_tensor(fx.make_layout(n, 1), ty)  # noqa: E731
        self.acc = [[rm(4, fx.Float32) for _ in range(cfg.nt)] for _ in range(cfg.mt)]
        for row in self.acc:
            for a in row:
                a.store(fx.Vector.filled(4, 0.0, fx.Float32))
        self.b = [[rm(4, fx.Int32) for _ in range(cfg.nt)] for _ in range(cfg.prefetch)]
        self.bs = [[rm(1, fx.Int32) for _ in range(cfg.nt)] for _ in range(cfg.scale_sets)]
        self.as_ = [[rm(1, fx.Int32) for _ in range(cfg.mt)] for _ in range(cfg.scale_sets)]
        self.a = [[rm(cfg.a_words, fx.Int32) for _ in range(cfg.mt)] for _ in range(cfg.a_sets)]

    @staticmethod
    def _load(atom, view, dst, nbytes, **kw):
        """``fx.copy`` of ``nbytes`` into a byte fragment, stored as i32 words into ``dst``."""
        frag = fx.make_rmem_tensor(fx.make_layout(nbytes, 1), fx.Int8)
        fx.copy(atom, view, frag, **kw)
        words = fx.memref_load_vec(frag).bitcast(fx.Int32)
        if dst is None:
            return words
        dst.store(words)
        return None

    # ================================================================ plan
    def _step_ops(self, step, steps, in_loop):
        """Operations of K step ``step`` in issue order (``in_loop``: a steady
        step, which issues every load unconditionally)."""
        cfg = self.cfg
        ops = []
        nxt = step + 1
        has_next = in_loop or nxt < steps
        dma = []
        if step % ix.STAGE_STEPS == 1 and has_next:
            # barrier of the next stage: its DMA has landed in every wave, and
            # every wave is done with the slot the new DMA overwrites
            stage = nxt // ix.STAGE_STEPS
            ops += [("wait_dma", stage, step - 1), ("barrier",), ("fence",)]
            far = stage + ix.A_DISTANCE
            if in_loop or far * ix.STAGE_STEPS < steps:
                dma = [("dma", far)]
        # Loads a later step consumes in order 0, 1, ... are issued in reverse
        # order, so that the wait before its first MFMA covers them all (the
        # compiler's per-instruction waits then collapse to one per step).
        # The DMA follows the A reads (in one scheduling region: its M0
        # write can move ahead of them instead of costing an s_nop).
        if cfg.a_sets == 2 and has_next:
            ops += [("read_a", nxt, m) for m in reversed(range(cfg.mt))]
        ops += dma + [("fence",)]
        for m in range(cfg.mt):
            ops += [("mfma", step, m, j) for j in range(cfg.nt)]
            if cfg.a_sets == 1 and has_next:
                ops.append(("read_a", nxt, m))
            ops.append(("fence",))
        if in_loop or step + cfg.prefetch < steps:
            ops += [("load_b", step + cfg.prefetch, j) for j in reversed(range(cfg.nt))] + [("fence",)]
        if (in_loop or step + cfg.lead < steps) and (step + cfg.lead) % ix.SCALE_STEPS == 0:
            ops += [("scales", step + cfg.lead), ("fence",)]
        return ops

    def _prologue_ops(self, steps):
        cfg = self.cfg
        nstages = -(-steps // ix.STAGE_STEPS)
        ops = [("dma", st) for st in range(min(ix.A_DISTANCE + 1, nstages))] + [("fence",)]
        # first-needed first: the first MFMAs then wait for these alone
        for s in range(0, min(cfg.lead, steps), ix.SCALE_STEPS):
            ops += [("scales", s), ("fence",)]
        for s in range(min(cfg.prefetch, steps)):
            ops += [("load_b", s, j) for j in reversed(range(cfg.nt))] + [("fence",)]
        ops += [("wait_dma", 0, None), ("barrier",), ("fence",)]
        order = reversed(range(cfg.mt)) if cfg.a_sets == 2 else range(cfg.mt)  # as the steps read
        # Scalar loads also count in lgkmcnt and return out of order: one left
        # pending into the loop would make every lgkm wait at its top a full
        # drain, so the prologue drains them (with A(0)) once.
        ops += [("read_a", 0, m) for m in order] + [("drain_lgkm",), ("fence",)]
        return ops

    def _plan(self, steps):
        """(iterations, {region: ops}, counts): the prologue, loop body and
        tail op lists, and for each wait (keyed by (region, index)) its count.

        Counts come from the whole issue sequence with the loop unrolled; a
        loop op's count is its smallest over the iterations."""
        cfg = self.cfg
        iters = ix.steady_iterations(steps, cfg.prefetch)
        regions = {
            "prologue": self._prologue_ops(steps),
            "body": [op for s in range(cfg.body) for op in self._step_ops(s, steps, True)] if iters else [],
            "tail": [op for s in range(iters * cfg.body, steps) for op in self._step_ops(s, steps, False)],
        }

        def shift(op, i):  # the op of iteration i of the loop body
            if op[0] in ("read_a", "mfma", "load_b", "scales"):
                return (op[0], op[1] + i * cfg.body) + op[2:]
            if op[0] == "dma":
                return (op[0], op[1] + i * cfg.body // ix.STAGE_STEPS)
            if op[0] == "wait_dma":
                return (op[0], op[1] + i * cfg.body // ix.STAGE_STEPS, None if op[2] is None else op[2] + i * cfg.body)
            return op

        seq = [(op, ("prologue", n)) for n, op in enumerate(regions["prologue"])]
        seq += [(shift(op, i), ("body", n)) for i in range(iters) for n, op in enumerate(regions["body"])]
        seq += [(op, ("tail", n)) for n, op in enumerate(regions["tail"])]
        vm = 0  # vector-memory operations issued so far (vmcnt counts them, in order)
        dma_done = {}  # stage -> vm count just after its DMA
        b_done = {}  # step -> vm count just after its last B load
        counts = {}
        for op, key in seq:
            kind = op[0]
            if kind == "dma":
                vm += cfg.rounds
                dma_done[op[1]] = vm
            elif kind == "load_b":
                vm += 1
                b_done[op[1]] = vm
            elif kind == "scales":
                vm += cfg.nt + cfg.mt
            elif kind == "wait_dma":
                # The compiler waited for B(prev) before the previous step's MFMAs;
                # vmcnt retires in issue order, so a DMA issued before that load
                # has landed already (None: no wait needed).
                prev = op[2]
                n = None if prev is not None and dma_done[op[1]] <= b_done[prev] else vm - dma_done[op[1]]
                counts[key] = n if key not in counts else (
                    None if counts[key] is None and n is None else min(v for v in (counts[key], n) if v is not None))
        return iters, regions, counts

    # ================================================================ emit
    def _emit(self, op, count, k0, t_dyn):
        kind = op[0]
        if kind == "fence":
            sched_fence()
        elif kind == "barrier":
            rocdl.s_barrier()
        elif kind == "drain_lgkm":
            rocdl.s_waitcnt(lgkmcnt=0)
        elif kind == "wait_dma":
            # s_waitcnt rather than asyncmark / wait_asyncmark: the compiler
            # does not track the async DMA, and those markers make it assume
            # the kernel needs the implicit (hidden) kernel arguments
            if count is not None:
                rocdl.s_waitcnt(vmcnt=min(count, _VMCNT_MAX))
        elif kind == "dma":
            self._dma(op[1], k0, t_dyn)
        elif kind == "read_a":
            self._read_a(op[1], op[2])
        elif kind == "mfma":
            self._mfma(*op[1:])
        elif kind == "load_b":
            self._load_b(op[1], op[2], k0, t_dyn)
        elif kind == "scales":
            self._load_scales(op[1], k0, t_dyn)
        else:
            raise AssertionError(kind)

    def _dma(self, stage, k0, t_dyn):
        """DMA of A stage ``stage`` (+ t_dyn / 2) into its slot (static slot index)."""
        cfg = self.cfg
        slot = stage % ix.RING_SLOTS
        # the instruction's offset moves the LDS address too: K goes in soffset
        soff = (k0 + t_dyn) * (cfg.step_a_bytes // 4) + stage * (cfg.srow // 4)
        for rd in range(cfg.rounds):
            dst = slot * cfg.slot_bytes + (rd * cfg.waves + self.wave) * ix.WAVE * ix.DMA_BYTES
            fx.copy(self.dma_atom, c.at(self.src.a_buf[rd], self.lanes["dma"][rd], ix.DMA_BYTES),
                    c.at(self.ring, dst, ix.DMA_BYTES), soffset=soff * 4)

    def _load_b(self, step, j, k0, t_dyn):
        cfg = self.cfg
        # the step's offset: up to 3 KB in the immediate field, the rest (and
        # the dynamic part) in soffset; no per-step lane offsets in VGPRs
        near = step % ix.SCALE_STEPS
        soff = (k0 + t_dyn + (step - near)) * ix.TILE_BYTES
        self._load(self.ld128, c.at(self.src.w_bufs[j], self.lanes["b"][0] + near * ix.TILE_BYTES, 16),
                   self.b[step % cfg.prefetch][j], 16, soffset=soff)

    def _load_scales(self, step, k0, t_dyn):
        cfg = self.cfg
        q = step // ix.SCALE_STEPS
        sset = q % cfg.scale_sets
        qd = (k0 + t_dyn) // ix.SCALE_STEPS
        for j in range(cfg.nt):
            self._load(self.ld32w, c.at(self.src.ws_bufs[j], self.lanes["bs"][0] + q * ix.SCALE_TILE_BYTES, 4),
                       self.bs[sset][j], 4, soffset=qd * ix.SCALE_TILE_BYTES)
        a_chunk = ix.SCALE_STEPS * ix.SCALES_PER_MFMA_K
        for m in range(cfg.mt):
            self._load(self.ld32a, c.at(self.src.as_buf, self.lanes["as"][m] + q * a_chunk, 4), self.as_[sset][m], 4,
                       soffset=qd * a_chunk)

    def _read_a(self, step, m):
        """ds_read_b128 of A(step) for M tile m into its register set."""
        cfg = self.cfg
        slot = (step // ix.STAGE_STEPS) % ix.RING_SLOTS
        h = step % ix.STAGE_STEPS
        parts = []
        for p in range(cfg.pieces):
            off = self.lanes["read"][h * cfg.pieces + p] + (slot * cfg.slot_bytes + m * ix.MFMA_M * cfg.srow)
            parts.append(self._load(self.lds128, c.at(self.ring, off, 16), None, 16))
        vec = parts[0] if cfg.pieces == 1 else parts[0].shuffle(parts[1], list(range(8)))
        self.a[step % cfg.a_sets][m].store(vec)

    def _mfma(self, step, m, j):
        cfg = self.cfg
        sel = step % ix.SCALE_STEPS
        sset = (step // ix.SCALE_STEPS) % cfg.scale_sets
        acc = self.acc[m][j]
        fx.gemm(self.atoms[sel], acc, self.a[step % cfg.a_sets][m], self.b[step % cfg.prefetch][j], acc,
                scale_a=fx.memref_load_vec(self.as_[sset][m])[0], scale_b=fx.memref_load_vec(self.bs[sset][j])[0])

    # ================================================================ run
    def run(self, k0, steps):
        """The K range [k0, k0 + steps) of this block (k0 a multiple of SCALE_STEPS, static or dynamic)."""
        cfg = self.cfg
        if steps < 1:
            raise ValueError(f"steps: expected >= 1, got {steps}")
        iters, regions, counts = self._plan(steps)
        for n, op in enumerate(regions["prologue"]):
            self._emit(op, counts.get(("prologue", n)), k0, 0)
        if iters:
            # raw scf.for: the DSL rewrites loops only inside kernel bodies.
            # The per-lane offsets ride along as loop-carried values made
            # opaque at the top of each body, so that ``offset + C`` stays
            # next to its load (C in the immediate field) instead of being
            # hoisted out as one more VGPR per distinct C.
            keys = list(self.lanes)
            flat = [raw for k in keys for raw in self.lanes[k]]
            idx = ir.IndexType.get()
            loop = scf.ForOp(arith.constant(idx, 0), arith.constant(idx, iters), arith.constant(idx, 1),
                             [c.raw(fx.Int32(v)) for v in flat])
            loop.attributes["loop_annotation"] = ir.Attribute.parse(
                "#llvm.loop_annotation<unroll = <count = 1 : i32, disable = true>>")
            outer = self.lanes
            with ir.InsertionPoint(loop.body):
                it = fx.Int32(arith.index_cast(ir.IntegerType.get_signless(32), loop.induction_variable))
                args = [c.opaque(fx.Int32(v)) for v in loop.inner_iter_args]
                self.lanes = self._unflatten(keys, outer, args)
                for n, op in enumerate(regions["body"]):
                    self._emit(op, counts.get(("body", n)), k0, it * cfg.body)
                scf.YieldOp([c.raw(v) for v in args])
            self.lanes = self._unflatten(keys, outer, [fx.Int32(r) for r in loop.results])
        for n, op in enumerate(regions["tail"]):
            self._emit(op, counts.get(("tail", n)), k0, 0)
        return self.acc

    @staticmethod
    def _unflatten(keys, like, flat):
        out, n = {}, 0
        for k in keys:
            out[k] = flat[n:n + len(like[k])]
            n += len(like[k])
        return out

    def finish(self):
        """Drain the DMA (the loop may have run past the last stage) before the LDS is reused."""
        rocdl.s_waitcnt(vmcnt=0)
        rocdl.s_barrier()
        sched_fence()

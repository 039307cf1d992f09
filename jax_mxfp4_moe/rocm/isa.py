"""Static analysis of gfx950 (CDNA4) kernel assembly, as LLVM prints it.

One place for the questions a reviewer asks of a GEMM's ISA, so that the
ISA tests in CI and the performance model (``perf_model``) read the code
object the same way:

- ``parse(isa)``: the instructions of the (first) kernel in an assembly
  dump, each with its class (``klass``) and, for memory instructions, the
  bytes it moves per wave.
- ``loops(prog)``: the loops, as the ranges a backward branch closes.
- ``k_loop(prog)`` / ``steady_region(prog)``: the K loop (the loop holding
  the most MFMAs) and the instructions of its steady state; a kernel whose
  K loop is fully unrolled has no loop, and its steady state is the range
  from its first MFMA to the last load before its last MFMA (within one
  straight-line K range).
- ``class_counts``, ``mfma_share``, ``drain_waits``, ``loads_in_flight``,
  ``epilogue``: the properties a review of a GEMM asks for (MFMA share of
  the steady loop, full-drain waits, loads in flight across the MFMA
  clusters, the epilogue's instruction mix); ``report(prog)`` bundles them.

Counter semantics (CDNA3/CDNA4 ISA, "Data dependency resolution"): vector
memory loads, stores and atomics, including ``buffer_load ... lds``, count in
``vmcnt`` and return in issue order; LDS and scalar-memory instructions count
in ``lgkmcnt``.  ``s_waitcnt vmcnt(N)`` waits until at most N of the wave's
vector-memory instructions are outstanding.
"""

from __future__ import annotations

import dataclasses
import re

WAVE = 64

# ----------------------------------------------------------------- classes
# Order matters: the first matching rule wins.
_CLASS_RULES = (
    ("mfma", re.compile(r"^v_(s?mfma|smfmac)_")),
    ("vmem_atomic", re.compile(r"^(buffer|global|flat)_atomic_")),
    ("vmem_store", re.compile(r"^(buffer|global|flat|scratch)_store_")),
    ("vmem_load", re.compile(r"^(buffer|global|flat|scratch)_load_")),
    ("smem", re.compile(r"^s_(load|buffer_load|store|buffer_store|dcache|scratch_load)")),
    ("lds", re.compile(r"^ds_")),
    ("waitcnt", re.compile(r"^s_waitcnt")),
    ("barrier", re.compile(r"^s_barrier")),
    ("branch", re.compile(r"^s_(c?branch|setpc|swappc)")),
    ("nop", re.compile(r"^s_nop$")),
    ("endpgm", re.compile(r"^s_endpgm")),
    ("salu", re.compile(r"^s_")),
    ("valu", re.compile(r"^v_")),
)
CLASSES = tuple(c for c, _ in _CLASS_RULES) + ("other",)

# VALU instructions the SIMD runs at a quarter of the full rate (transcendental
# unit, CDNA3 ISA section 6: "quarter-rate"), and the IEEE-divide helpers.
_TRANS = re.compile(r"^v_(exp|log|rcp|rsq|sqrt|sin|cos|rcp_iflag)_(f16|f32|legacy_f32)")
_DIV = re.compile(r"^v_div_(scale|fmas|fixup)_")

# Bytes per lane of a memory access, from the mnemonic's width suffix.
_WIDTH = (
    (re.compile(r"(dwordx4|_b128)"), 16),
    (re.compile(r"(dwordx3|_b96)"), 12),
    (re.compile(r"(dwordx2|_b64|_x2\b|read2_b32|write2_b32)"), 8),
    (re.compile(r"(_dword\b|_b32|_f32|_u32|_i32|pk_add_bf16|pk_add_f16|_pk_)"), 4),
    (re.compile(r"(short|_b16|_u16|_i16|_d16)"), 2),
    (re.compile(r"(byte|_b8|_u8|_i8)"), 1),
)
_READ2_64 = re.compile(r"(read2|write2)(st64)?_b64")
_SMEM_WIDTH = re.compile(r"dwordx(\d+)")


@dataclasses.dataclass(frozen=True)
class Instr:
    """One instruction: its position, mnemonic, operand text and class."""

    index: int
    line: int  # 1-based line in the assembly text
    op: str
    operands: str
    klass: str

    @property
    def to_lds(self) -> bool:
        """A ``buffer_load ... lds`` (global -> LDS without registers)."""
        return self.klass == "vmem_load" and re.search(r"(^|\s)lds(\s|$)", self.operands) is not None

    @property
    def trans(self) -> bool:
        return self.klass == "valu" and bool(_TRANS.match(self.op))

    @property
    def div(self) -> bool:
        return self.klass == "valu" and bool(_DIV.match(self.op))

    @property
    def bytes_per_wave(self) -> int:
        """Bytes a memory instruction moves for a full wave (0 for others)."""
        if self.klass == "smem":
            m = _SMEM_WIDTH.search(self.op)
            return 4 * int(m.group(1)) if m else 4
        if self.klass not in ("vmem_load", "vmem_store", "vmem_atomic", "lds"):
            return 0
        if _READ2_64.search(self.op):
            return 16 * WAVE
        for pat, nbytes in _WIDTH:
            if pat.search(self.op):
                return nbytes * WAVE
        return 4 * WAVE if self.klass != "lds" else 0  # ds_barrier-like ops move nothing

    @property
    def counter(self) -> str | None:
        """The wait counter the instruction increments: "vm", "lgkm" or None."""
        if self.klass in ("vmem_load", "vmem_store", "vmem_atomic"):
            return "vm"
        if self.klass in ("lds", "smem"):
            return "lgkm"
        return None

    @property
    def branch_target(self) -> str | None:
        if self.klass != "branch" or not self.op.startswith(("s_branch", "s_cbranch")):
            return None
        return self.operands.split(",")[0].strip() or None

    @property
    def conditional(self) -> bool:
        return self.op.startswith("s_cbranch")


def klass(op: str) -> str:
    """The class of a mnemonic (one of ``CLASSES``)."""
    for name, pat in _CLASS_RULES:
        if pat.match(op):
            return name
    return "other"


_WAIT_FIELD = re.compile(r"(vmcnt|lgkmcnt|expcnt)\((\d+)\)")


def wait_counts(ins: Instr) -> dict:
    """{"vm": N, "lgkm": N} of an ``s_waitcnt`` (only the counters it names)."""
    if ins.klass != "waitcnt":
        return {}
    out = {}
    for name, n in _WAIT_FIELD.findall(ins.operands):
        out[{"vmcnt": "vm", "lgkmcnt": "lgkm", "expcnt": "exp"}[name]] = int(n)
    if ins.op != "s_waitcnt" and not out:  # s_waitcnt_vmcnt null, 0x0 (gfx10+ forms)
        m = re.search(r"0x([0-9a-f]+)|\b(\d+)\b", ins.operands)
        if m:
            out["vm" if "vmcnt" in ins.op else "lgkm"] = int(m.group(1), 16) if m.group(1) else int(m.group(2))
    return out


# ------------------------------------------------------------------- parse
@dataclasses.dataclass(frozen=True)
class Program:
    """The instructions of one kernel and the instruction index of each label."""

    name: str
    instrs: tuple
    labels: dict

    def __len__(self):
        return len(self.instrs)

    def label_index(self, label: str) -> int | None:
        return self.labels.get(label)


_LABEL = re.compile(r"^([A-Za-z_.$][\w.$]*):")
_INSTR = re.compile(r"^\s+([a-z_][a-z0-9_]*)(\s+(.*))?$")


def parse(isa: str, kernel: str | None = None) -> Program:
    """The instructions of kernel ``kernel`` (default: the first) in an assembly dump."""
    lines = isa.splitlines()
    # Kernel symbols: "name:" lines announced by ".type name,@function".
    symbols = re.findall(r"\.type\s+([\w.$]+),\s*@function", isa)
    if not symbols:
        raise ValueError("isa: no kernel symbol (.type NAME,@function) in the assembly text")
    name = kernel or symbols[0]
    if name not in symbols:
        raise ValueError(f"kernel: {name!r} is not in the assembly text; it has {symbols}")
    start = None
    for i, ln in enumerate(lines):
        if ln.startswith(name + ":"):
            start = i + 1
            break
    if start is None:
        raise ValueError(f"kernel: no label line for {name!r}")
    instrs, labels = [], {}
    for i in range(start, len(lines)):
        ln = lines[i].split(";")[0].split("//")[0].rstrip()
        if not ln.strip():
            continue
        m = _LABEL.match(ln)
        if m:
            lab = m.group(1)
            if lab.startswith(".Lfunc_end") or lab in symbols:
                break
            labels[lab] = len(instrs)
            continue
        m = _INSTR.match(ln)
        if not m:
            continue  # directives (.p2align, ...) and anything else
        op, operands = m.group(1), (m.group(3) or "").strip()
        instrs.append(Instr(len(instrs), i + 1, op, operands, klass(op)))
        if op == "s_endpgm" and i + 1 < len(lines) and lines[i + 1].startswith(".Lfunc_end"):
            break
    return Program(name, tuple(instrs), labels)


# ------------------------------------------------------------------- loops
@dataclasses.dataclass(frozen=True)
class Loop:
    """Instructions [start, end] (inclusive): a backward branch at ``end`` jumps to ``start``."""

    start: int
    end: int

    def body(self, prog: Program) -> tuple:
        return prog.instrs[self.start : self.end + 1]

    def contains(self, other: "Loop") -> bool:
        return self.start <= other.start and other.end <= self.end


def loops(prog: Program) -> list[Loop]:
    """Every loop, outermost range per header label, in program order."""
    by_start: dict[int, int] = {}
    for ins in prog.instrs:
        tgt = ins.branch_target
        if tgt is None:
            continue
        t = prog.label_index(tgt)
        if t is not None and t <= ins.index:
            by_start[t] = max(by_start.get(t, -1), ins.index)
    return [Loop(s, e) for s, e in sorted(by_start.items())]


def count(instrs, klass_name: str) -> int:
    return sum(1 for i in instrs if i.klass == klass_name)


def k_loop(prog: Program) -> Loop | None:
    """The loop holding the most MFMAs (None when no loop holds one: K fully unrolled)."""
    best, best_n = None, 0
    for lp in loops(prog):
        n = count(lp.body(prog), "mfma")
        if n > best_n or (n == best_n and best is not None and lp.contains(best)):
            best, best_n = lp, n
    return best


def steady_region(prog: Program) -> tuple:
    """The instructions of the K loop's steady state.

    The K loop's body when there is one.  For a fully unrolled K loop, the
    instructions from the first MFMA to the last vector-memory load issued
    before the last MFMA: the stretch in which the K stream is still
    loading (the last K step, which can only drain, is its tail).  That
    stretch ends at the first branch after the first MFMA: a K-split kernel
    holds one unrolled copy of the K loop per split range, and the steady
    state is one copy, not the join of two."""
    lp = k_loop(prog)
    if lp is not None:
        return lp.body(prog)
    idx = [i.index for i in prog.instrs if i.klass == "mfma"]
    if not idx:
        return ()
    cut = next((j for j in range(idx[0], idx[-1]) if prog.instrs[j].klass == "branch"), None)
    if cut is not None:
        idx = [i for i in idx if i < cut]
    loads = [i.index for i in prog.instrs[idx[0] : idx[-1]] if i.klass == "vmem_load"]
    end = loads[-1] if loads else idx[-1]
    return prog.instrs[idx[0] : end + 1]


def exit_branch(prog: Program) -> Instr | None:
    """The first conditional branch to the program's end: the path of a workgroup with no work."""
    ends = {i.index for i in prog.instrs if i.klass == "endpgm"}
    for ins in prog.instrs:
        tgt = ins.branch_target
        if tgt is None or not ins.conditional:
            continue
        t = prog.label_index(tgt)
        if t is None or t <= ins.index:
            continue
        # the target block reaches s_endpgm without another branch
        j = t
        while j < len(prog.instrs) and prog.instrs[j].klass not in ("branch", "endpgm"):
            j += 1
        if j in ends and j - t <= 4:
            return ins
    return None


# -------------------------------------------------------------- properties
def class_counts(instrs) -> dict:
    """{class: count} over ``instrs`` (every class present, also at 0), plus "total"."""
    out = {c: 0 for c in CLASSES}
    for i in instrs:
        out[i.klass] += 1
    out["trans"] = sum(1 for i in instrs if i.trans)
    out["div"] = sum(1 for i in instrs if i.div)
    out["total"] = len(instrs)
    return out


def mfma_share(instrs) -> float:
    """MFMAs over all instructions (every line that issues, s_nop and s_waitcnt included)."""
    return count(instrs, "mfma") / len(instrs) if instrs else 0.0


def drain_waits(instrs, *, mid_stream_only: bool = False) -> dict:
    """Full-drain waits in ``instrs``: {"vmcnt0": n, "lgkmcnt0": n}.

    ``mid_stream_only``: count a wait only when another vector-memory load
    follows it in ``instrs`` (an unrolled K loop must drain once, at its end;
    a drain before later loads stalls the stream)."""
    out = {"vmcnt0": 0, "lgkmcnt0": 0}
    last_load = max((i.index for i in instrs if i.klass == "vmem_load"), default=-1)
    for ins in instrs:
        if ins.klass != "waitcnt":
            continue
        if mid_stream_only and ins.index > last_load:
            continue
        w = wait_counts(ins)
        if w.get("vm") == 0:
            out["vmcnt0"] += 1
        if w.get("lgkm") == 0:
            out["lgkmcnt0"] += 1
    return out


def _vm_walk(instrs, fifo=()):
    """Walk ``instrs`` keeping the FIFO of outstanding vmcnt instructions.

    The FIFO holds the bytes of each outstanding instruction (0 for stores and
    atomics).  Returns ([(instr, FIFO when it issues)], FIFO at the end)."""
    fifo = list(fifo)
    seen = []
    for ins in instrs:
        if ins.klass == "waitcnt":
            n = wait_counts(ins).get("vm")
            if n is not None and len(fifo) > n:
                fifo = fifo[len(fifo) - n :] if n else []
        seen.append((ins, tuple(fifo)))
        if ins.counter == "vm":
            fifo.append(ins.bytes_per_wave if ins.klass == "vmem_load" else 0)
    return seen, tuple(fifo)


def loads_in_flight(prog: Program) -> dict:
    """Vector-memory loads in flight at the steady region's MFMAs, per wave.

    A load counts from its issue until an ``s_waitcnt vmcnt`` forces it
    complete.  For a K loop the body is walked twice and the second pass is
    measured, so loads issued at the end of one iteration for the next count.
    Returns the minimum and mean over the MFMAs of the count and bytes
    (``min_loads``, ``mean_loads``, ``min_bytes``, ``mean_bytes``) and the
    largest byte count seen anywhere in the region (``max_bytes``)."""
    region = steady_region(prog)
    empty = dict(min_loads=0, mean_loads=0.0, min_bytes=0, mean_bytes=0.0, max_bytes=0)
    if not region:
        return empty
    _, fifo = _vm_walk(prog.instrs[: region[0].index])
    seen = []
    for _ in range(2 if k_loop(prog) is not None else 1):
        seen, fifo = _vm_walk(region, fifo)
    at_mfma = [(sum(1 for b in f if b), sum(f)) for ins, f in seen if ins.klass == "mfma"]
    peak = max(sum(f) for _, f in seen)
    if not at_mfma:
        return dict(empty, max_bytes=peak)
    return dict(
        min_loads=min(n for n, _ in at_mfma),
        mean_loads=sum(n for n, _ in at_mfma) / len(at_mfma),
        min_bytes=min(b for _, b in at_mfma),
        mean_bytes=sum(b for _, b in at_mfma) / len(at_mfma),
        max_bytes=peak,
    )


def mfma_clusters(instrs) -> list[int]:
    """Sizes of the runs of MFMAs not separated by a vector-memory load or a wait."""
    out, run = [], 0
    for ins in instrs:
        if ins.klass == "mfma":
            run += 1
        elif ins.klass in ("vmem_load", "waitcnt", "barrier"):
            if run:
                out.append(run)
            run = 0
    if run:
        out.append(run)
    return out


def epilogue(prog: Program) -> tuple:
    """The instructions after the last MFMA (a GEMM's epilogue)."""
    idx = [i.index for i in prog.instrs if i.klass == "mfma"]
    return prog.instrs[idx[-1] + 1 :] if idx else ()


def report(prog: Program) -> dict:
    """The static properties of a GEMM kernel's steady K loop and of its epilogue."""
    region = steady_region(prog)
    lp = k_loop(prog)
    counts = class_counts(region)
    epi = class_counts(epilogue(prog))
    return {
        "k_loop": "loop" if lp is not None else ("unrolled" if region else "none"),
        "steady_instrs": len(region),
        "steady_mfma": counts["mfma"],
        "mfma_share": mfma_share(region),
        "drain_waits": drain_waits(region, mid_stream_only=lp is None),
        "loads_in_flight": loads_in_flight(prog),
        "counts": counts,
        "mfma_total": count(prog.instrs, "mfma"),
        "epilogue": epi,
    }

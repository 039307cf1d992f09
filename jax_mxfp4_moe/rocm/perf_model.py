"""A performance model of the MoE layer on an MI355X, from its gfx950 code objects.

No AMD GPU is available to this project, so this model is how its gfx950
kernels are measured: each launch's time is estimated from the code object
itself (the ISA text and its AMDGPU metadata), the grid the backend launches
and the routing statistics of the batch.

Per launch:

1. **Workgroups.**  The grid's workgroup ids go round-robin to the 8 XCDs
   (``HW["xcds"]``); within an XCD to its 32 CUs as slots free up.  Which ids
   have work follows from the grid and the expected number of live sorted row
   blocks (``expected_row_blocks``: every expert's rows padded to BM, under
   uniform top-k routing); the others run only to their early exit.
2. **Occupancy.**  Workgroups per CU from VGPR+AGPR, LDS and wave limits
   (``occupancy``).
3. **One wave's time** (``simulate``): the instructions in order, one issue
   per 4 cycles per wave; an MFMA holds the SIMD's matrix pipe 16 cycles
   with both operands fp4/fp6 and 32 with an fp8 operand; each vector-memory
   load returns ``latency`` after its bytes leave the CU's load path
   (shared by the waves resident on the CU), in order; ``s_waitcnt``
   stalls until the counters allow.  A K loop runs its trip count (from the
   MFMAs it must issue), so waits that drain every step cost a full memory
   round trip every step, and loads issued ahead (bytes in flight) hide it
   (Little's law: a wave with B bytes outstanding moves at most B per
   latency).
4. **Co-resident waves** share their SIMD's issue and matrix pipe: a
   workgroup with n workgroups per CU takes max(one wave's time, n x its
   SIMD-busy cycles).
5. **Bandwidth**: the launch takes at least its HBM bytes (weights of the
   experts touched, once, plus activations and outputs) at the sustained
   HBM rate, its requested bytes at the cache (MALL) rate, and its atomics
   at the L2 atomic rate.

A layer is the sum of its launches plus one launch gap each.

Every hardware number is in ``HW`` with its source; the three constants
fitted to published MI355X times of FlyDSL's own kernels are in
``CALIBRATION`` with the fit's residuals (``python -m
jax_mxfp4_moe.rocm.perf_model --calibrate`` refits them).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
import re
from typing import Callable

from jax_mxfp4_moe import spec
from jax_mxfp4_moe.rocm import isa as isa_mod

# ------------------------------------------------------------- assumptions


@dataclasses.dataclass(frozen=True)
class Fact:
    value: float
    unit: str
    source: str


# MI355X (gfx950, CDNA4).  "verified" sources were read through the project's
# search tools; "assumed" ones are engineering estimates the calibration
# absorbs (their effect is bounded in the docstring of each use).
HW = {
    "cus": Fact(256, "CU", "ROCm docs, 'AMD GPU specifications': MI355X 256 CUs (32 per XCD)"),
    "xcds": Fact(8, "XCD", "ROCm docs, 'AMD GPU specifications': 8 XCDs (32 CUs, 4 MB L2 each)"),
    "clock_ghz": Fact(2.4, "GHz", "MI355X peak engine clock 2400 MHz (AMD, Hot Chips 2025 / datasheet)"),
    "hbm_tbps": Fact(8.0, "TB/s", "MI355X HBM3E peak bandwidth 8 TB/s (AMD datasheet; ROCm docs)"),
    "simds": Fact(4, "SIMD/CU", "CDNA3/CDNA4 ISA guides: 4 SIMDs per CU"),
    "wave": Fact(64, "lanes", "ROCm docs: wavefront size 64"),
    "vgprs": Fact(512, "VGPR/lane/SIMD", "ROCm docs: VGPR file 512 KiB per CU = 4 SIMD x 64 lanes x 512 x 4 B; "
                  "arch VGPRs and AGPRs share it, granule 8"),
    "max_waves": Fact(8, "waves/SIMD", "CDNA3/CDNA4 ISA guides: at most 8 waves per SIMD"),
    "lds": Fact(160 * 1024, "B/CU", "ROCm docs, 'AMD GPU specifications': MI355X LDS 160 KiB per CU"),
    "mfma_fp4_cycles": Fact(16, "cycles", "v_mfma_scale_f32_16x16x128_f8f6f4, both operands fp4/fp6: "
                            "2*16*16*128 FLOP x 4 SIMD x 256 CU x 2.4 GHz / 16 = 10.1 PFLOP/s, the MI355X "
                            "dense MXFP4 peak (AMD datasheet)"),
    "mfma_fp8_cycles": Fact(32, "cycles", "the same with an fp8 operand: 5.0 PFLOP/s, the MI355X dense FP8 "
                            "peak; ISSCC 2026 (AMD): 8192 FP8 FLOP/clk/CU"),
    "issue_cycles": Fact(4, "cycles", "CDNA ISA: a SIMD takes one instruction from a wave every 4 cycles "
                         "(wave64 VALU on 16 lanes: 4 cycles)"),
    "trans_cycles": Fact(16, "cycles", "CDNA ISA: transcendental VALU (exp, log, rcp, rsq, sqrt) quarter rate"),
    "load_path_bytes_per_clk": Fact(64, "B/clk/CU", "assumed: vector L1 / texture path 64 B per clock per "
                                    "CU (CDNA3 figure)"),
    "lds_bytes_per_clk": Fact(128, "B/clk/CU", "assumed: CDNA4 LDS read bandwidth 128 B per clock per CU"),
    "lds_latency_cycles": Fact(120, "cycles", "assumed: LDS access latency"),
    "smem_latency_cycles": Fact(200, "cycles", "assumed: scalar cache hit latency (kernel arguments)"),
    "cache_tbps": Fact(14.7, "TB/s", "assumed: Infinity Fabric / MALL (256 MB Infinity Cache) bandwidth "
                       "that serves weights re-read by several row blocks"),
    "l2_atomic_lanes_per_clk": Fact(128, "lane-atomics/clk", "assumed: 16 L2 channels per XCD x 8 XCDs, one "
                                    "lane's atomic per channel per clock"),
    "dispatch_cycles": Fact(4, "cycles/WG/XCD", "assumed: workgroup dispatch rate per XCD"),
    "launch_ramp_us": Fact(1.0, "us", "assumed: kernel start to first wave and last wave to completion "
                           "signal, inside a launch"),
}

# Constants fitted to published MI355X times of FlyDSL's own kernels
# (``CALIBRATION_POINTS``: whole a4w4 MoE calls; ``GEMM1_CHECK``: gemm1
# alone) by ``calibrate``: least squares of the log errors over the 11 points.
CALIBRATION = {
    "latency_ns": 700.0,  # vector-memory round trip a wave sees (HBM, loaded)
    "hbm_efficiency": 0.74,  # sustained fraction of the 8 TB/s in a streaming kernel (5.9 TB/s)
    "launch_gap_us": 1.0,  # between back-to-back launches of one layer (graph replay)
    # Only in the calibration: aiter's fused sort at up to 128 tokens (a HIP
    # kernel the model cannot read), beyond the 1 us launch ramp and gap.
    "aux_sort_us": 0.0,
}
# The fit's residuals, modeled / published - 1 (FlyDSL snapshot 11c4174d,
# flydsl 0.5.0): the five published calls, then gemm1 alone by M.
CALIBRATION_RESIDUALS = {
    "kimi_k2.5 M=4": +0.001, "kimi_k2.5 M=64": +0.052, "kimi_k2.5 M=1024": -0.138,
    "dsv3_c M=4": +0.096, "dsv3_c M=1024": -0.142,
    "gemm1 M=4": -0.07, "gemm1 M=8": -0.01, "gemm1 M=16": -0.05, "gemm1 M=32": 0.00, "gemm1 M=64": +0.06,
    "gemm1 M=128": +0.11,
}


def clock_hz() -> float:
    return HW["clock_ghz"].value * 1e9


def us(cycles: float) -> float:
    return cycles / clock_hz() * 1e6


def cycles(us_: float) -> float:
    return us_ * 1e-6 * clock_hz()


# ---------------------------------------------------------------- occupancy
def _limits() -> dict:
    return dict(vgprs=int(HW["vgprs"].value), granule=8, max_waves=int(HW["max_waves"].value),
                simds=int(HW["simds"].value), lds=int(HW["lds"].value), wave=int(HW["wave"].value))


def vgpr_alloc(vgpr: int, agpr: int, granule: int = 8) -> int:
    """Registers a wave allocates per lane: arch VGPRs rounded to 4, then AGPRs, in granules of 8."""
    regs = (-(-vgpr // 4) * 4 + agpr) if agpr else vgpr  # AGPRs start at a multiple of 4
    return max(granule, -(-regs // granule) * granule)


def waves_per_simd(vgpr: int, agpr: int, lds: int, block_threads: int, *, limits: dict | None = None) -> int:
    """Waves of one kernel a SIMD holds, limited by registers, LDS and the wave slots (MI355X by default)."""
    lim = limits or _limits()
    w = min(lim["max_waves"], lim["vgprs"] // vgpr_alloc(vgpr, agpr, lim["granule"]))
    if lds:
        block_waves = -(-block_threads // lim["wave"])
        w = min(w, (lim["lds"] // lds) * block_waves // lim["simds"])
    return w


def occupancy(md: dict, block_threads: int) -> int:
    """Workgroups of a kernel resident on one CU (metadata keys as in the AMDGPU note)."""
    wave = int(HW["wave"].value)
    simds = int(HW["simds"].value)
    block_waves = -(-block_threads // wave)
    w = waves_per_simd(int(md[".vgpr_count"]), int(md.get(".agpr_count", 0)),
                       int(md[".group_segment_fixed_size"]), block_threads)
    per_cu = w * simds // block_waves
    lds = int(md[".group_segment_fixed_size"])
    if lds:
        per_cu = min(per_cu, int(HW["lds"].value) // lds)
    return max(1, per_cu)


# ------------------------------------------------------------------ routing
def _binom_pmf(n: int, p: float) -> list[float]:
    if p >= 1.0:
        return [0.0] * n + [1.0]
    if p <= 0.0:
        return [1.0] + [0.0] * n
    lp, lq = math.log(p), math.log1p(-p)
    out = []
    for i in range(n + 1):
        out.append(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp
                            + (n - i) * lq))
    return out


@dataclasses.dataclass(frozen=True)
class Routing:
    """Per-token selection probability of each expert (``probs``, summing to top_k)."""

    probs: tuple

    @staticmethod
    def uniform(num_experts: int, top_k: int) -> "Routing":
        return Routing((top_k / num_experts,) * num_experts)


@functools.lru_cache(maxsize=None)
def _expected_blocks(tokens: int, p: float, bm: int) -> tuple[float, float, float]:
    """(E[ceil(n/bm)], P(n>0), E[n]) for n ~ Binomial(tokens, p)."""
    pmf = _binom_pmf(tokens, p)
    blocks = sum(q * -(-i // bm) for i, q in enumerate(pmf))
    return blocks, 1.0 - pmf[0], tokens * p


def expected_row_blocks(tokens: int, routing: Routing, bm: int) -> tuple[float, float]:
    """(expected live row blocks of BM rows, expected experts touched).

    Each expert's count of routed rows is Binomial(tokens, p_e) (independent
    tokens; an expert is picked at most once per token); its rows are padded
    to a multiple of BM, as the sort contract pads them."""
    blocks = touched = 0.0
    for p in routing.probs:
        b, t, _ = _expected_blocks(int(tokens), float(p), int(bm))
        blocks += b
        touched += t
    return blocks, touched


# --------------------------------------------------------------- simulation
_REG = re.compile(r"\b([va])\[(\d+):(\d+)\]|\b([va])(\d+)\b")
_FMT = re.compile(r"cbsz:(\d)|blgp:(\d)")


def _regs(text: str) -> list[tuple[str, int, int]]:
    out = []
    for m in _REG.finditer(text):
        if m.group(1):
            out.append((m.group(1), int(m.group(2)), int(m.group(3))))
        else:
            out.append((m.group(4), int(m.group(5)), int(m.group(5))))
    return out


def mfma_cycles(ins: isa_mod.Instr) -> float:
    """Matrix-pipe cycles of an MFMA (16 with both operands fp4/fp6, 32 with fp8)."""
    fp4 = HW["mfma_fp4_cycles"].value
    fp8 = HW["mfma_fp8_cycles"].value
    if "f8f6f4" in ins.op:
        fmts = {"cbsz": 0, "blgp": 0}
        for m in _FMT.finditer(ins.operands):
            if m.group(1) is not None:
                fmts["cbsz"] = int(m.group(1))
            else:
                fmts["blgp"] = int(m.group(2))
        small = fmts["cbsz"] >= 2 and fmts["blgp"] >= 2  # 2, 3: fp6; 4: fp4
        base = fp4 if small else fp8
        return base * (2 if "32x32x64" in ins.op else 1)
    return fp8  # other MFMAs of these kernels: none; a conservative default


@dataclasses.dataclass
class WaveState:
    t: float = 0.0  # cycle at which the wave may issue its next instruction
    vm: list = dataclasses.field(default_factory=list)  # completion cycles, issue order
    lgkm: list = dataclasses.field(default_factory=list)
    load_path_free: float = 0.0  # the CU load path, as seen by this wave
    mfma_free: float = 0.0
    mfma_ready: dict = dataclasses.field(default_factory=dict)  # (file, reg) -> cycle its MFMA result is ready
    # resource use, for co-residency and bandwidth
    mfma_busy: float = 0.0
    valu_busy: float = 0.0
    instrs: int = 0
    load_bytes: float = 0.0
    store_bytes: float = 0.0
    atomic_lanes: float = 0.0
    lds_bytes: float = 0.0

    def shift(self, dt: float):
        self.t += dt
        self.vm = [c + dt for c in self.vm]
        self.lgkm = [c + dt for c in self.lgkm]
        self.load_path_free += dt
        self.mfma_free += dt
        self.mfma_ready = {k: v + dt for k, v in self.mfma_ready.items()}

    def usage(self) -> tuple:
        return (self.mfma_busy, self.valu_busy, self.instrs, self.load_bytes, self.store_bytes,
                self.atomic_lanes, self.lds_bytes)

    def add_usage(self, delta: tuple, times: float):
        (self.mfma_busy, self.valu_busy, self.instrs, self.load_bytes, self.store_bytes, self.atomic_lanes,
         self.lds_bytes) = (a + b * times for a, b in zip(self.usage(), delta))


@dataclasses.dataclass(frozen=True)
class Timing:
    """Cycle costs of the memory system as one wave sees it."""

    latency: float  # vector-memory round trip, cycles
    load_path_share: float = 1.0  # waves sharing the CU load path

    @staticmethod
    def calibrated(load_path_share: float = 1.0) -> "Timing":
        return Timing(CALIBRATION["latency_ns"] * 1e-9 * clock_hz(), load_path_share)


def _wait(queue: list, n: int, t: float) -> tuple[list, float]:
    queue = [c for c in queue if c > t]
    if len(queue) > n:
        t = max(t, queue[len(queue) - n - 1])
        queue = queue[len(queue) - n :] if n else []
    return queue, t


def _step(ins: isa_mod.Instr, s: WaveState, tm: Timing):
    issue = HW["issue_cycles"].value
    k = ins.klass
    # an instruction reading a register an MFMA is still writing waits for it
    if s.mfma_ready and k != "waitcnt":
        for f, lo, hi in _regs(ins.operands):
            for r in range(lo, hi + 1):
                ready = s.mfma_ready.get((f, r))
                if ready is not None and ready > s.t:
                    s.t = ready
    if k == "waitcnt":
        w = isa_mod.wait_counts(ins)
        if "vm" in w:
            s.vm, s.t = _wait(s.vm, w["vm"], s.t)
        if "lgkm" in w:
            s.lgkm, s.t = _wait(s.lgkm, w["lgkm"], s.t)
        s.t += 1
        return
    s.instrs += 1
    if k == "mfma":
        cyc = mfma_cycles(ins)
        start = max(s.t, s.mfma_free)
        s.mfma_free = start + cyc
        s.mfma_busy += cyc
        regs = _regs(ins.operands)
        if regs:
            f, lo, hi = regs[0]  # the destination
            for r in range(lo, hi + 1):
                s.mfma_ready[(f, r)] = start + cyc
        s.t = start + issue
        return
    if k in ("vmem_load", "vmem_store", "vmem_atomic"):
        nbytes = ins.bytes_per_wave
        start = max(s.t, s.load_path_free)
        s.load_path_free = start + nbytes * tm.load_path_share / HW["load_path_bytes_per_clk"].value
        done = s.load_path_free + tm.latency
        if s.vm:
            done = max(done, s.vm[-1])
        s.vm.append(done)
        if k == "vmem_load":
            s.load_bytes += nbytes
        elif k == "vmem_store":
            s.store_bytes += nbytes
        else:
            s.atomic_lanes += HW["wave"].value
        s.t += issue
        return
    if k == "lds":
        nbytes = ins.bytes_per_wave
        s.lds_bytes += nbytes
        done = s.t + HW["lds_latency_cycles"].value + nbytes * tm.load_path_share / HW["lds_bytes_per_clk"].value
        if s.lgkm:
            done = max(done, s.lgkm[-1])
        s.lgkm.append(done)
        s.t += issue
        return
    if k == "smem":
        s.lgkm.append(max(s.t + HW["smem_latency_cycles"].value, s.lgkm[-1] if s.lgkm else 0.0))
        s.t += issue
        return
    if k == "nop":
        m = re.match(r"\s*(\d+)", ins.operands)
        s.t += max(issue, 1 + (int(m.group(1)) if m else 0))
        return
    if k == "valu":
        c = HW["trans_cycles"].value if ins.trans else issue
        s.valu_busy += c
        s.t += c
        return
    s.t += issue  # salu, branch, barrier, other


def simulate(prog: isa_mod.Program, tm: Timing, *, trips: Callable[[isa_mod.Loop], float],
             stop: int | None = None, exact_iterations: int = 24) -> WaveState:
    """One wave running ``prog`` (up to instruction ``stop``), each loop ``trips(loop)`` times.

    Forward branches fall through (every block runs).  A loop runs its first
    ``exact_iterations`` instruction by instruction; the rest repeat the mean
    time and resource use of the last half of those (a pipelined loop settles
    into a pattern several iterations long: with its loads issued d steps
    ahead, one memory round trip per d + 1 steps)."""
    starts = {lp.start: lp for lp in isa_mod.loops(prog)}
    state = WaveState()

    def run(lo: int, hi: int, current=None):
        i = lo
        while i < hi:
            lp = starts.get(i)
            if lp is not None and lp is not current and lp.end < hi:
                run_loop(lp)
                i = lp.end + 1
            else:
                _step(prog.instrs[i], state, tm)
                i += 1

    def run_loop(lp):
        n = max(0.0, float(trips(lp)))
        whole = int(n)
        exact = min(whole, exact_iterations)
        marks = [(state.t, state.usage())]
        for _ in range(exact):
            run(lp.start, lp.end + 1, current=lp)
            marks.append((state.t, state.usage()))
        rest = n - exact
        if rest <= 0:
            return
        if exact == 0:  # less than one iteration: time one and scale it down
            run(lp.start, lp.end + 1, current=lp)
            marks.append((state.t, state.usage()))
            rest -= 1.0
        k = max(1, (len(marks) - 1) // 2)
        (t0, u0), (t1, u1) = marks[-1 - k], marks[-1]
        state.shift((t1 - t0) / k * rest)
        state.add_usage(tuple((b - a) / k for a, b in zip(u0, u1)), rest)

    run(0, len(prog.instrs) if stop is None else stop)
    # the wave ends when its last memory operation and MFMA have completed
    state.t = max([state.t, state.mfma_free] + state.vm + state.lgkm)
    return state


# ------------------------------------------------------------------ kernels
@dataclasses.dataclass(frozen=True, eq=False)
class KernelCode:
    """What the model reads of a compiled kernel: its ISA and AMDGPU metadata."""

    name: str
    isa: str
    metadata: dict  # .vgpr_count, .agpr_count, .sgpr_count, .group_segment_fixed_size, ...
    block_threads: int

    @functools.cached_property
    def program(self) -> isa_mod.Program:
        return isa_mod.parse(self.isa, self.name if f"{self.name}:" in self.isa else None)

    @property
    def lds(self) -> int:
        return int(self.metadata[".group_segment_fixed_size"])

    @property
    def scratch(self) -> int:
        return int(self.metadata.get(".private_segment_fixed_size", 0))

    @property
    def waves(self) -> int:
        return -(-self.block_threads // int(HW["wave"].value))

    @staticmethod
    def from_code_object(co) -> "KernelCode":
        """From a ``rocm.compile.CodeObject``."""
        return KernelCode(co.name, co.isa, dict(co.metadata), co.block[0] * co.block[1] * co.block[2])


# A loop's trip count, given the loop and the program.
TripFn = Callable[[isa_mod.Loop, isa_mod.Program], float]


def k_loop_trips(mfma_per_wave: float) -> TripFn:
    """Trips of the K loop so that the wave issues ``mfma_per_wave`` MFMAs in all (other loops: once)."""

    def trips(lp, prog):
        kl = isa_mod.k_loop(prog)
        if kl is None or lp != kl:
            return 1.0
        inside = isa_mod.count(lp.body(prog), "mfma")
        outside = isa_mod.count(prog.instrs, "mfma") - inside
        return max(0.0, (mfma_per_wave - outside) / inside)

    return trips


@dataclasses.dataclass(frozen=True)
class Launch:
    """One launch of a layer, as the model sees it.

    ``kernel`` None: a launch the model does not see the code of (XLA glue,
    a memset, another library's kernel); it costs ``fixed_us`` plus its HBM
    bytes at the sustained rate."""

    stage: str
    kernel: KernelCode | None
    grid: tuple = (1, 1, 1)
    live_ids: Callable[[], list] | None = None  # ids of the workgroups with work (None: all)
    trips: TripFn | None = None
    hbm_bytes: float = 0.0
    atomic_lanes: float = 0.0
    fixed_us: float = 0.0
    fixed_key: str | None = None  # a CALIBRATION constant added to fixed_us
    note: str = ""

    @property
    def num_wgs(self) -> int:
        return int(self.grid[0] * self.grid[1] * self.grid[2])


@dataclasses.dataclass(frozen=True)
class LaunchTime:
    stage: str
    name: str
    us: float
    bound: str  # what set the time: "latency", "issue", "hbm", "cache", "atomics", "fixed"
    live_wgs: int
    wgs: int
    per_cu: int  # resident workgroups per CU
    wg_us: float  # one live workgroup alone
    hbm_bytes: float
    xcd_live: tuple  # live workgroups per XCD
    note: str = ""
    inflight_kb_per_cu: float = 0.0  # K-loop load bytes in flight on a live CU (resident waves x mean at MFMAs)
    needed_kb_per_cu: float = 0.0  # bytes in flight per live CU that the sustained HBM rate needs (Little's law)


def _trips_key(launch: Launch) -> tuple:
    """The trip count of each loop of the launch's kernel, in program order."""
    prog = launch.kernel.program
    if launch.trips is None:
        return tuple(1.0 for _ in isa_mod.loops(prog))
    return tuple(float(launch.trips(lp, prog)) for lp in isa_mod.loops(prog))


@functools.lru_cache(maxsize=4096)
def _wave_time(kernel: KernelCode, trips_key: tuple, share: float, dead: bool, latency_ns: float):
    prog = kernel.program
    tm = Timing(latency_ns * 1e-9 * clock_hz(), share)
    if dead:
        eb = isa_mod.exit_branch(prog)
        if eb is None:
            return None
        return simulate(prog, tm, trips=lambda lp: 1.0, stop=eb.index + 1)
    by_loop = dict(zip(isa_mod.loops(prog), trips_key))
    return simulate(prog, tm, trips=lambda lp: by_loop.get(lp, 1.0))


def xcd_of(wg_id: int) -> int:
    """The XCD a workgroup id is dispatched to: ids go round-robin over the XCDs."""
    return int(wg_id) % int(HW["xcds"].value)


def live_per_xcd(ids) -> tuple:
    """Workgroups per XCD of a list of workgroup ids."""
    out = [0] * int(HW["xcds"].value)
    for i in ids:
        out[xcd_of(i)] += 1
    return tuple(out)


def _schedule(xcd_jobs: list[list[float]], per_cu: int) -> float:
    """Makespan (cycles) of one XCD's workgroups, dispatched in id order to the first free slot."""
    n_cu = int(HW["cus"].value // HW["xcds"].value)
    disp = HW["dispatch_cycles"].value
    worst = 0.0
    for jobs in xcd_jobs:
        slots = [(0.0, c, s) for s in range(per_cu) for c in range(n_cu)]
        heapq.heapify(slots)
        t_disp = 0.0
        for dur in jobs:
            free, c, s = heapq.heappop(slots)
            start = max(free, t_disp)
            t_disp += disp
            heapq.heappush(slots, (start + dur, c, s))
            worst = max(worst, start + dur)
    return worst


@dataclasses.dataclass(frozen=True)
class _Schedule:
    us: float  # makespan of the workgroups, latency- and issue-bound
    single: WaveState  # one live wave, alone on its CU
    single_us: float
    live: int
    per_cu: int
    xcd_live: tuple


@functools.lru_cache(maxsize=1024)
def _schedule_launch(launch: Launch, latency_ns: float) -> _Schedule:
    k = launch.kernel
    nx = int(HW["xcds"].value)
    n_cu_xcd = int(HW["cus"].value) // nx
    wgs = launch.num_wgs
    live = sorted(set(launch.live_ids())) if launch.live_ids is not None else list(range(wgs))
    live_set = set(live)
    per_cu = occupancy(k.metadata, k.block_threads)
    xcd_live = live_per_xcd(live)
    trips_key = _trips_key(launch)

    def live_time(n_res: int) -> tuple[float, WaveState]:
        st = _wave_time(k, trips_key, float(k.waves * n_res), False, latency_ns)
        return max(st.t, n_res * max(st.mfma_busy, st.valu_busy)), st

    dead_t = 0.0
    if len(live) < wgs:
        dead = _wave_time(k, trips_key, float(k.waves), True, latency_ns)
        dead_t = dead.t if dead is not None else live_time(1)[0]
    single_t, single = live_time(1)
    dur = [live_time(max(1, min(per_cu, -(-xcd_live[x] // n_cu_xcd))))[0] for x in range(nx)]
    jobs = [[] for _ in range(nx)]
    for i in range(wgs):
        jobs[xcd_of(i)].append(dur[xcd_of(i)] if i in live_set else dead_t)
    return _Schedule(us(_schedule(jobs, per_cu)), single, us(single_t), len(live), per_cu, tuple(xcd_live))


def model_launch(launch: Launch, *, calibration: dict | None = None) -> LaunchTime:
    """Estimated time of one launch."""
    cal = dict(CALIBRATION, **(calibration or {}))
    eff_bw = HW["hbm_tbps"].value * 1e12 * cal["hbm_efficiency"]
    hbm_us = launch.hbm_bytes / eff_bw * 1e6
    k = launch.kernel
    if k is None:
        t = launch.fixed_us + (cal[launch.fixed_key] if launch.fixed_key else 0.0) + hbm_us
        return LaunchTime(launch.stage, launch.note or launch.stage, t, "fixed" if launch.fixed_us >= hbm_us
                          else "hbm", 0, 0, 0, 0.0, launch.hbm_bytes, (), launch.note)
    sc = _schedule_launch(launch, float(cal["latency_ns"]))
    single = sc.single
    req = sc.live * k.waves * single.load_bytes
    cands = {
        "latency": sc.us,
        "hbm": hbm_us,
        "cache": req / (HW["cache_tbps"].value * 1e12) * 1e6,
        "atomics": us(launch.atomic_lanes / HW["l2_atomic_lanes_per_clk"].value),
    }
    bound = max(cands, key=cands.get)
    t = cands[bound] + HW["launch_ramp_us"].value
    if bound == "latency":
        # latency-bound, unless the waves' own issue or matrix pipe fills the time
        busy = us(max(single.mfma_busy, single.valu_busy, single.instrs * HW["issue_cycles"].value))
        if busy > 0.6 * sc.single_us:
            bound = "issue"
    n_cu_xcd = int(HW["cus"].value // HW["xcds"].value)
    live_cus = sum(min(n_cu_xcd, n) for n in sc.xcd_live)
    resident = max(1, min(sc.per_cu, -(-sc.live // max(1, live_cus))))
    flight = isa_mod.loads_in_flight(k.program)["mean_bytes"] * k.waves * resident / 1024
    needed = eff_bw * cal["latency_ns"] * 1e-9 / max(1, live_cus) / 1024
    return LaunchTime(launch.stage, k.name, t, bound, sc.live, launch.num_wgs, sc.per_cu, sc.single_us,
                      launch.hbm_bytes, sc.xcd_live, launch.note, flight, needed)


def layer_time(times: list[LaunchTime], *, calibration: dict | None = None) -> float:
    cal = dict(CALIBRATION, **(calibration or {}))
    return sum(t.us for t in times) + cal["launch_gap_us"] * len(times)


# ---------------------------------------------------------------- pipelines
TOKENS = (1, 8, 64, 512, 4096)
QUANTS = ("a4w4", "a8w4")
BYTES_PER_WEIGHT = 0.5 + 1 / 32  # MXFP4: a nibble per element and an E8M0 byte per 32


def sort_trips(entries_per_wg: float, experts: int, block_m: int) -> TripFn:
    """Trip counts of the sort kernels' loops, from what each loop's body does.

    The sort's loops run over routed entries or chunk counts (a body that
    loads them: one 64-lane step per load; LLVM unrolls such a loop by U and
    follows it with a remainder loop of fewer loads, which runs the steps
    left over), over experts one at a time (a body of LDS work only: one
    expert per trip; no sort kernel has such a loop since phase 2 became a
    scan over the lanes, and the serial loop it stood for was unrolled 4x by
    LLVM, so it overcounted that loop 4x) and over padding fills (stores only: about E*BM
    padding slots, two stores each, shared among those loops by their store
    counts).  A heuristic: the trip counts of loops over
    data-dependent counts are not in the code object."""
    steps = max(1, math.ceil(entries_per_wg / 64))

    def trips(lp, prog):
        all_loops = isa_mod.loops(prog)
        counts = {other: isa_mod.class_counts(other.body(prog)) for other in all_loops}
        c = counts[lp]
        if c["vmem_load"]:
            if c["lds"]:
                return float(steps)
            # a remainder loop right after a loop with more loads per trip
            prev = [o for o in all_loops if o.end < lp.start and counts[o]["vmem_load"] and not counts[o]["lds"]]
            if prev and lp.start - prev[-1].end <= 24 and counts[prev[-1]]["vmem_load"] > c["vmem_load"]:
                return float((steps % counts[prev[-1]]["vmem_load"]) // c["vmem_load"])
            return float(steps // c["vmem_load"]) if c["vmem_load"] > 1 else float(steps)
        if c["lds"]:
            return float(experts)
        if c["vmem_store"]:
            total = sum(counts[o]["vmem_store"] for o in all_loops
                        if not counts[o]["vmem_load"] and not counts[o]["lds"])
            return max(1.0, (2 * experts * block_m / 64) / max(1, total))
        return 1.0

    return trips


def _ours_code(module: str, config: dict) -> KernelCode:
    from . import compile as rocm_compile

    return KernelCode.from_code_object(rocm_compile.compile_kernel(module, **config))


def glue(stage: str, nbytes: float, note: str) -> Launch:
    """A launch whose code the model does not read (XLA op, memset): ramp + bytes at the HBM rate."""
    return Launch(stage, None, fixed_us=HW["launch_ramp_us"].value, hbm_bytes=nbytes, note=note)


def sort_launches(tokens: int, top_k: int, experts: int, bm: int) -> list[Launch]:
    """This project's sort kernel(s) for a call with blocks of ``bm`` rows
    (one launch, or three past SORT_ONESHOT_MAX_ENTRIES)."""
    from . import config as rocm_config
    from . import geometry as ix

    n = tokens * top_k
    cfg = lambda st: rocm_config.sort_config(num_experts=experts, top_k=top_k, has_mask=False,  # noqa: E731
                                             block_m=bm, stage=st)
    small = 4 * n * 2 + (n + experts * bm) * 8
    if n <= ix.SORT_ONESHOT_MAX_ENTRIES:
        return [Launch("sort", _ours_code("sort", cfg("oneshot")), ix.sort_grid(),
                       trips=sort_trips(n, experts, bm), hbm_bytes=small)]
    nch = ix.sort_chunks(tokens, top_k)
    chunk = ix.SORT_CHUNK
    return [
        Launch("sort", _ours_code("sort", cfg("count")), ix.sort_chunk_grid(tokens, top_k),
               trips=sort_trips(chunk, experts, bm), hbm_bytes=4 * n + 4 * nch * experts),
        Launch("sort", _ours_code("sort", cfg("offsets")), ix.sort_grid(),
               trips=sort_trips(nch * 64, experts, bm), hbm_bytes=8 * nch * experts + (n + experts * bm) * 8),
        Launch("sort", _ours_code("sort", cfg("scatter")), ix.sort_chunk_grid(tokens, top_k),
               trips=sort_trips(chunk, experts, bm), hbm_bytes=small),
    ]


def _live_3d(rows_live: int, n_live: int, grid):
    """Ids of an (N tile, row block, K split) grid's live workgroups: row
    block y < rows_live, N tile x < n_live (the tiles past N, padding the
    tile count to a multiple of the XCDs, exit at once), every split (x
    fastest)."""
    gx, gy, gz = grid
    return lambda: [x + gx * (y + gy * z) for z in range(gz) for y in range(min(rows_live, gy))
                    for x in range(min(n_live, gx))]


def ours_launches(preset: str, tokens: int, quant: str, *, routing: Routing | None = None) -> list[Launch]:
    """The launches of this project's gfx950 layer for one call (as ``rocm.backend.moe`` issues them)."""
    from ..numerics import sorting
    from . import config as rocm_config
    from . import geometry as ix

    p = spec.PRESETS[preset]
    E, k, H, I = p.num_experts, p.top_k, p.hidden, p.intermediate
    T = int(tokens)
    Hp, Ip = ix.padded_dims(H, I)
    layer = p.replace(quant=quant)
    tiles = rocm_config.tiles_for(layer, T)
    bm = tiles.bm
    variants = rocm_config.variants(layer, tiles=tiles, in_dtype="bf16")
    a_bytes = 1.0 if quant == "a8w4" else 0.5
    routing = routing or Routing.uniform(E, k)
    rows, touched = expected_row_blocks(T, routing, bm)
    live_rows = math.ceil(rows - 1e-9)
    P = sorting.sorted_size(T, k, E, bm)
    blocks = min(-(-P // bm), ix.max_row_blocks(T * k, E, bm))  # the grid's row blocks (rocm.backend)
    kst1, kst2 = Hp // ix.MFMA_K, Ip // ix.MFMA_K
    w1_bytes = 2 * Ip * Hp * BYTES_PER_WEIGHT
    w2_bytes = Hp * Ip * BYTES_PER_WEIGHT
    out = []
    if Hp != H:
        out.append(glue("glue", T * (H + Hp) * 2, "XLA pad of x to the kernels' H"))
    out += sort_launches(T, k, E, bm)
    mod, cfg = variants["quant"]
    out.append(Launch("quant", _ours_code(mod, cfg), ix.quant_grid(T, Hp),
                      hbm_bytes=T * Hp * (2 + a_bytes + 1 / 32)))
    t1 = tiles.gemm1
    grid1 = ix.gemm_grid(2 * Ip, blocks, t1.tiles, t1.waves)
    mod, cfg = variants["gemm1"]
    out.append(Launch(
        "gemm1", _ours_code(mod, cfg), grid1,
        live_ids=_live_3d(live_rows, -(-2 * Ip // ix.block_rows(t1.tiles, t1.waves)), grid1),
        trips=k_loop_trips(bm // ix.MFMA_M * t1.tiles * kst1),
        hbm_bytes=touched * w1_bytes + T * Hp * (a_bytes + 1 / 32) + live_rows * bm * Ip * (a_bytes + 1 / 32)))
    out.append(glue("glue", T * Hp * 2, "memset of y before gemm2's atomics"))
    t2 = tiles.gemm2
    splits = ix.k_splits_used(kst2, t2.k_splits)
    grid2 = ix.gemm_grid(Hp, blocks, t2.tiles, t2.waves, splits)
    mod, cfg = variants["gemm2"]
    out.append(Launch(
        "gemm2", _ours_code(mod, cfg), grid2,
        live_ids=_live_3d(live_rows, -(-Hp // ix.block_rows(t2.tiles, t2.waves)), grid2),
        trips=k_loop_trips(bm // ix.MFMA_M * t2.tiles * ix.k_split_steps(kst2, t2.k_splits)),
        hbm_bytes=touched * w2_bytes + live_rows * bm * Ip * (a_bytes + 1 / 32) + 2 * T * Hp * 2,
        atomic_lanes=splits * T * k * Hp / 2))
    out.append(glue("glue", T * (Hp + H) * 2, "XLA slice and cast of y"))
    return out


def flydsl_gemm_variants(preset: str, tokens: int, quant: str):
    """(Gemm1, Gemm2) variants of FlyDSL's kernels for one of this project's presets."""
    from . import flydsl_upstream as fu

    p = spec.PRESETS[preset]
    g1, g2 = fu.tile_policy(tokens)
    H, I = fu.padded(p.hidden), fu.padded(p.intermediate)
    return (fu.Gemm1(hidden=H, inter=I, experts=p.num_experts, top_k=p.top_k,
                     interleave=p.gate_up == "interleaved", a_dtype="fp8" if quant == "a8w4" else "fp4", **g1),
            fu.Gemm2(hidden=H, inter=I, experts=p.num_experts, **g2))


def flydsl_gemm_launches(g1v, g2v, code1: KernelCode, code2: KernelCode, tokens: int, top_k: int,
                         routing: Routing, *, quant: str) -> list[Launch]:
    """FlyDSL's gemm1 and gemm2 launches (and the top-k reduce its non-atomic gemm2 needs)."""
    from . import flydsl_upstream as fu

    T = int(tokens)
    H, I, E = g1v.hidden, g1v.inter, g1v.experts
    a_bytes = 1.0 if quant == "a8w4" else 0.5
    out = []
    rows1, touched = expected_row_blocks(T, routing, g1v.bm)
    live1 = math.ceil(rows1 - 1e-9)
    nnb1 = 2 * I // fu.BN
    grid1 = fu.gemm1_grid(T, g1v.bm, E, top_k, I)
    mchunks1 = max(1, g1v.bm // 16)
    in_bytes = T * H * 2 if g1v.inline_quant else T * H * (a_bytes + 1 / 32)
    out.append(Launch(
        "gemm1", code1, (grid1, 1, 1), live_ids=lambda: list(range(min(grid1, live1 * nnb1))),
        trips=k_loop_trips(mchunks1 * 4 * (H // 128)),
        hbm_bytes=touched * 2 * I * H * BYTES_PER_WEIGHT + in_bytes + live1 * g1v.bm * I * (0.5 + 1 / 32)))
    if g2v is None:
        return out
    rows2, _ = expected_row_blocks(T, routing, g2v.bm)
    live2 = math.ceil(rows2 - 1e-9)
    nnb2 = H // fu.BN
    grid2 = fu.gemm2_grid(T, g2v.bm, E, top_k, H)
    mchunks2 = max(1, g2v.bm // 16)
    atomic = g2v.epilog == "atomic"
    out.append(Launch(
        "gemm2", code2, (grid2, 1, 1), live_ids=lambda: list(range(min(grid2, live2 * nnb2))),
        trips=k_loop_trips(mchunks2 * 4 * (I // 128)),
        hbm_bytes=touched * H * I * BYTES_PER_WEIGHT + live2 * g2v.bm * I * (0.5 + 1 / 32)
        + (2 * T * H * 2 if atomic else live2 * g2v.bm * H * 2),
        atomic_lanes=T * top_k * H / 2 if atomic else 0.0))
    if not atomic:
        out.append(glue("reduce", T * top_k * H * 2 + T * H * 2, "top-k reduce of gemm2's flat rows"))
    return out


def flydsl_launches(preset: str, tokens: int, quant: str, codes: dict, *,
                    routing: Routing | None = None) -> list[Launch]:
    """FlyDSL's layer on a preset: its gemm1/gemm2 with this project's sort, quant and glue.

    The comparison is of the GEMMs: both columns get the same sort, memset
    and XLA glue; FlyDSL's inline-quant gemm1 (up to 128 tokens) needs no
    quant launch."""
    p = spec.PRESETS[preset]
    E, k = p.num_experts, p.top_k
    routing = routing or Routing.uniform(E, k)
    g1v, g2v = flydsl_gemm_variants(preset, tokens, quant)
    ours = ours_launches(preset, tokens, quant, routing=routing)
    keep = [x for x in ours if x.stage not in ("gemm1", "gemm2") and (x.stage != "quant" or not g1v.inline_quant)]
    gem = flydsl_gemm_launches(g1v, g2v, codes[g1v], codes[g2v], tokens, k, routing, quant=quant)
    return keep[:-2] + gem + keep[-2:] if len(keep) >= 2 else keep + gem


# ------------------------------------------------------------------ roofline
def roofline_us(preset: str, tokens: int, quant: str, routing: Routing | None = None) -> tuple[float, float, float]:
    """(roofline us, HBM-bound us, MFMA-bound us) of one layer call.

    HBM: the bytes of the experts touched (0.53 byte per weight element incl.
    scales, true H and I) at 8 TB/s; MFMA: 2*T*k*3*H*I FLOPs at the dense
    MXFP4 (a4w4) or FP8 (a8w4) peak."""
    p = spec.PRESETS[preset]
    E, k, H, I = p.num_experts, p.top_k, p.hidden, p.intermediate
    routing = routing or Routing.uniform(E, k)
    _, touched = expected_row_blocks(int(tokens), routing, 1)
    hbm = touched * 3 * H * I * BYTES_PER_WEIGHT / (HW["hbm_tbps"].value * 1e12) * 1e6
    cyc = HW["mfma_fp8_cycles" if quant == "a8w4" else "mfma_fp4_cycles"].value
    peak = 2 * 16 * 16 * 128 / cyc * HW["simds"].value * HW["cus"].value * clock_hz()
    mfma = 2 * tokens * k * 3 * H * I / peak * 1e6
    return max(hbm, mfma), hbm, mfma


# -------------------------------------------------------------- calibration
@dataclasses.dataclass(frozen=True)
class CalibrationPoint:
    model: str
    experts: int
    hidden: int
    inter: int
    top_k: int
    tokens: int
    us: float


# Published MI355X times of FlyDSL's own a4w4 MoE: aiter's "a4w4-port" (the
# FlyDSL kernels that FlyDSL upstream's kernels/moe/mxfp_moe were ported back
# from), ROCm/aiter PR #3832, perf table of 2026-06-23 (columns "model
# (NE/H/INTER/TOPK)", M = tokens; each entry one whole fused_moe call: sort,
# gemm1 (quantising the tokens inline up to 128), gemm2, timed in a graph).
CALIBRATION_POINTS = (
    CalibrationPoint("kimi_k2.5", 385, 7168, 512, 9, 4, 41.3),
    CalibrationPoint("kimi_k2.5", 385, 7168, 512, 9, 64, 201.0),
    CalibrationPoint("kimi_k2.5", 385, 7168, 512, 9, 1024, 480.3),
    CalibrationPoint("dsv3_c", 257, 7168, 256, 9, 4, 33.4),
    CalibrationPoint("dsv3_c", 257, 7168, 256, 9, 1024, 265.1),
)
# A check, not fitted: gemm1 alone, Kimi-K2.5 shape, the HIP kernel the port
# mirrors instruction for instruction (aiter's gemm1_a4w4.cuh; per-call device
# time by M, from the RadeonFlow analysis notes of the same bench).
GEMM1_CHECK = {4: 29.4, 8: 36.9, 16: 64.5, 32: 95.9, 64: 130.5, 128: 163.3}
# Experts the bench's routing touches (1 shared + 8 of 384 routed per token,
# scores randn + bias, seed 1), by M: the same notes' measurement.
BENCH_ACTIVE_EXPERTS = {4: 33, 8: 58, 16: 97, 32: 147, 64: 207, 128: 254, 256: 297, 4096: 383,
                        8192: 384, 16384: 385}
# aiter's HIP kernels around the a4w4-port GEMMs past 128 tokens, traced on
# an MI355X at M=16384, Kimi-K2.5 shape (torch profiler, us per call; the
# RadeonFlow "Kimi FP4 MoE 16384 Opt Notes"): (name, us, scales with M).
AITER_AUX_16384 = (("sort count", 6.4, False), ("sort cumsum", 10.7, False), ("sort place/pad", 33.1, True),
                   ("token quant", 52.4, True), ("scale sort", 59.5, True))


def bench_routing(experts: int, top_k: int, skew: float) -> Routing:
    """One shared expert (every token) and top_k - 1 of the others, with log-normal popularity ``skew``."""
    from statistics import NormalDist

    n = experts - 1
    z = [NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)]
    w = [math.exp(skew * zi) for zi in z]
    s = sum(w)
    picks = top_k - 1
    return Routing(tuple(min(1.0, picks * wi / s) for wi in w) + (1.0,))


@functools.lru_cache(maxsize=None)
def bench_skew() -> float:
    """The popularity skew that reproduces ``BENCH_ACTIVE_EXPERTS`` (least squares on log counts)."""

    def err(sig):
        r = bench_routing(385, 9, sig)
        e = 0.0
        for m, a in BENCH_ACTIVE_EXPERTS.items():
            active = sum(1 - (1 - p) ** m for p in r.probs)
            e += math.log(active / a) ** 2
        return e

    return min((err(s / 100), s / 100) for s in range(0, 301, 5))[1]


def calibration_launches(pt: CalibrationPoint, codes: dict) -> list[Launch]:
    """The a4w4-port pipeline of one calibration point: sort, [quant], gemm1, gemm2, [reduce]."""
    from . import flydsl_upstream as fu

    g1, g2 = fu.tile_policy(pt.tokens)
    v1 = fu.Gemm1(hidden=pt.hidden, inter=pt.inter, experts=pt.experts, top_k=pt.top_k, interleave=False,
                  a_dtype="fp4", **g1)
    v2 = fu.Gemm2(hidden=pt.hidden, inter=pt.inter, experts=pt.experts, **g2)
    routing = bench_routing(pt.experts, pt.top_k, bench_skew())
    if v1.inline_quant:
        out = [Launch("sort", None, fixed_key="aux_sort_us", note="aiter's fused sort (time fitted)")]
    else:
        ramp = HW["launch_ramp_us"].value
        out = [Launch("sort" if "sort" in name else "quant", None,
                      fixed_us=max(ramp, us_ * pt.tokens / 16384) if scales else us_, note=f"aiter {name} (traced)")
               for name, us_, scales in AITER_AUX_16384]
    out += flydsl_gemm_launches(v1, v2, codes[v1], codes[v2], pt.tokens, pt.top_k, routing, quant="a4w4")
    return out


def calibration_variants():
    from . import flydsl_upstream as fu

    vs = []
    for pt in CALIBRATION_POINTS:
        g1, g2 = fu.tile_policy(pt.tokens)
        vs.append(fu.Gemm1(hidden=pt.hidden, inter=pt.inter, experts=pt.experts, top_k=pt.top_k,
                           interleave=False, a_dtype="fp4", **g1))
        vs.append(fu.Gemm2(hidden=pt.hidden, inter=pt.inter, experts=pt.experts, **g2))
    for m in GEMM1_CHECK:
        g1, _ = fu.tile_policy(m)
        vs.append(fu.Gemm1(hidden=7168, inter=512, experts=385, top_k=9, interleave=False, a_dtype="fp4", **g1))
    return list(dict.fromkeys(vs))


def predict_calibration(codes: dict, calibration: dict | None = None, launches: dict | None = None):
    """[(point, modeled us)] of ``CALIBRATION_POINTS``."""
    launches = launches or {pt: calibration_launches(pt, codes) for pt in CALIBRATION_POINTS}
    out = []
    for pt in CALIBRATION_POINTS:
        times = [model_launch(x, calibration=calibration) for x in launches[pt]]
        out.append((pt, layer_time(times, calibration=calibration)))
    return out


_GEMM1_CHECK_LAUNCHES: dict = {}


def predict_gemm1_check(codes: dict, calibration: dict | None = None) -> dict:
    """{M: modeled us} of FlyDSL's gemm1 alone at the ``GEMM1_CHECK`` points."""
    from . import flydsl_upstream as fu

    out = {}
    routing = bench_routing(385, 9, bench_skew())
    for m in GEMM1_CHECK:
        g1, _ = fu.tile_policy(m)
        v1 = fu.Gemm1(hidden=7168, inter=512, experts=385, top_k=9, interleave=False, a_dtype="fp4", **g1)
        key = (m, id(codes[v1]))
        if key not in _GEMM1_CHECK_LAUNCHES:
            _GEMM1_CHECK_LAUNCHES[key] = flydsl_gemm_launches(v1, None, codes[v1], None, m, 9, routing,
                                                              quant="a4w4")[0]
        out[m] = model_launch(_GEMM1_CHECK_LAUNCHES[key], calibration=calibration).us
    return out


def calibrate(codes: dict) -> tuple[dict, list, dict]:
    """Fit latency, HBM efficiency, launch gap and aiter's sort time to the published times.

    Least squares of the log errors over ``CALIBRATION_POINTS`` (whole
    calls) and ``GEMM1_CHECK`` (gemm1 alone), by grid search: latency
    400..2000 ns by 25, efficiency 0.50..1.00 by 0.02, gap 0..4 us by 0.25,
    sort 0..16 us by 0.5.  Returns (constants, [(point, modeled us)],
    {M: modeled gemm1 us})."""
    launches = {pt: calibration_launches(pt, codes) for pt in CALIBRATION_POINTS}
    best = None
    for lat in range(400, 2001, 25):
        for eff in [x / 100 for x in range(50, 101, 2)]:
            base = {"latency_ns": float(lat), "hbm_efficiency": eff, "launch_gap_us": 0.0, "aux_sort_us": 0.0}
            g1 = predict_gemm1_check(codes, base)
            e1 = sum(math.log(g1[m] / GEMM1_CHECK[m]) ** 2 for m in GEMM1_CHECK)
            raw = predict_calibration(codes, base, launches)
            fused = {pt: any(x.fixed_key == "aux_sort_us" for x in launches[pt]) for pt in launches}
            for g in range(0, 17):
                for a2 in range(0, 33):
                    gap, aux = g / 4, a2 / 2
                    err = e1 + sum(math.log((t + gap * len(launches[pt]) + aux * fused[pt]) / pt.us) ** 2
                                   for pt, t in raw)
                    if best is None or err < best[0]:
                        best = (err, dict(base, launch_gap_us=gap, aux_sort_us=aux))
    cal = best[1]
    return cal, predict_calibration(codes, cal, launches), predict_gemm1_check(codes, cal)


# ------------------------------------------------------------------- report
def stage_roofline_us(stage: str, preset: str, tokens: int, quant: str) -> float:
    """Roofline of one GEMM stage (its weights' bytes, or its FLOPs at the MFMA peak); 0 for other stages."""
    share = {"gemm1": 2 / 3, "gemm2": 1 / 3}.get(stage)
    if share is None:
        return 0.0
    _, hbm, mfma = roofline_us(preset, tokens, quant)
    return max(hbm * share, mfma * share)


@dataclasses.dataclass
class LayerRow:
    preset: str
    quant: str
    tokens: int
    roofline: tuple
    ours: list
    ours_us: float
    flydsl: list | None = None
    flydsl_us: float | None = None


def model_layers(presets, tokens, quants, *, flydsl_codes: dict | None = None) -> list[LayerRow]:
    rows = []
    for preset in presets:
        for q in quants:
            for T in tokens:
                ours = [model_launch(x) for x in ours_launches(preset, T, q)]
                row = LayerRow(preset, q, T, roofline_us(preset, T, q), ours, layer_time(ours))
                if flydsl_codes is not None:
                    fl = [model_launch(x) for x in flydsl_launches(preset, T, q, flydsl_codes)]
                    row.flydsl, row.flydsl_us = fl, layer_time(fl)
                rows.append(row)
    return rows


def flydsl_variants_for(presets, tokens, quants) -> list:
    out = []
    for preset in presets:
        for q in quants:
            for T in tokens:
                out += list(flydsl_gemm_variants(preset, T, q))
    return list(dict.fromkeys(out))


def isa_properties(kernel: KernelCode) -> dict:
    """The static properties of a GEMM kernel issue #16 asks of the ISA, plus its resources."""
    md = kernel.metadata
    r = isa_mod.report(kernel.program)
    return {
        "name": kernel.name,
        "vgpr": int(md[".vgpr_count"]),
        "agpr": int(md.get(".agpr_count", 0)),
        "lds": kernel.lds,
        "scratch": kernel.scratch,
        "waves_per_simd": waves_per_simd(int(md[".vgpr_count"]), int(md.get(".agpr_count", 0)), kernel.lds,
                                         kernel.block_threads),
        "k_loop": r["k_loop"],
        "mfma_share": r["mfma_share"],
        "vmcnt0": r["drain_waits"]["vmcnt0"],
        "lgkmcnt0": r["drain_waits"]["lgkmcnt0"],
        "min_loads_at_mfma": r["loads_in_flight"]["min_loads"],
        "mean_bytes_at_mfma": r["loads_in_flight"]["mean_bytes"],
        "epilogue_valu": r["epilogue"]["valu"],
        "epilogue_trans": r["epilogue"]["trans"],
        "epilogue_div": r["epilogue"]["div"],
        "epilogue_vmem": r["epilogue"]["vmem_load"] + r["epilogue"]["vmem_store"] + r["epilogue"]["vmem_atomic"],
        "epilogue_waits": r["epilogue"]["waitcnt"],
    }


def _pct(roof: float, t: float) -> str:
    return f"{100 * roof / t:3.0f}%" if t > 0 and roof > 0 else "   -"


def print_report(rows: list[LayerRow], *, flydsl_note: str, file=None, isa_kernels: list | None = None,
                 calibration_rows: list | None = None) -> None:
    import sys

    f = file or sys.stdout
    p = lambda *a: print(*a, file=f)  # noqa: E731
    p("Performance model of the gfx950 layer on an MI355X (no GPU: estimated from the code objects).")
    p("Times in us; % = roofline / time (roofline: the touched experts' weights at 8 TB/s, or the FLOPs at the")
    p("dense MXFP4 (a4w4) / FP8 (a8w4) MFMA peak, whichever is larger).  Bound: what sets each launch's time.")
    p("KB/CU: K-loop load bytes in flight on a live CU / bytes in flight the sustained HBM rate needs per live")
    p("CU at the calibrated latency (Little's law).")
    p(f"FlyDSL: {flydsl_note}")
    for r in rows:
        roof, hbm, mfma = r.roofline
        p("")
        p(f"{r.preset} {r.quant} T={r.tokens}: roofline {roof:.1f} us ({'HBM' if hbm >= mfma else 'MFMA'})")
        p(f"  {'stage':6} {'ours: kernel':44} {'us':>8} {'%roof':>5} {'bound':8} {'live/grid':>13} {'WG/CU':>5}"
          f" {'KB/CU':>11}" + ("  | FlyDSL us  %roof bound    KB/CU" if r.flydsl is not None else ""))
        fl_by_stage = {}
        for t in r.flydsl or []:
            fl_by_stage.setdefault(t.stage, []).append(t)
        for t in r.ours:
            sr = stage_roofline_us(t.stage, r.preset, r.tokens, r.quant)
            live = f"{t.live_wgs}/{t.wgs}" if t.wgs else ""
            fl = f"{t.inflight_kb_per_cu:4.0f}/{t.needed_kb_per_cu:<4.0f}" if t.stage.startswith("gemm") else ""
            line = (f"  {t.stage:6} {t.name[:44]:44} {t.us:8.1f} {_pct(sr, t.us):>5} {t.bound:8} {live:>13} "
                    f"{t.per_cu or '':>5} {fl:>11}")
            if r.flydsl is not None and t.stage in ("gemm1", "gemm2"):
                ft = fl_by_stage.get(t.stage, [None])[0]
                if ft is not None:
                    line += (f"  | {ft.us:9.1f} {_pct(sr, ft.us):>5} {ft.bound:8} "
                             f"{ft.inflight_kb_per_cu:4.0f}/{ft.needed_kb_per_cu:<4.0f}")
            p(line)
        if r.flydsl is not None:
            extra = [t for t in r.flydsl if t.stage not in ("gemm1", "gemm2") and t not in r.ours
                     and t.stage == "reduce"]
            for t in extra:
                p(f"  {t.stage:6} {'(FlyDSL only) ' + t.name[:30]:44} {'':>8} {'':>5} {'':8} {'':>13} {'':>5}"
                  f"  | {t.us:9.1f}       {t.bound}")
        line = f"  {'layer':6} {'':44} {r.ours_us:8.1f} {_pct(roof, r.ours_us):>5}"
        if r.flydsl_us is not None:
            line += f" {'':8} {'':>13} {'':>5}  | {r.flydsl_us:9.1f} {_pct(roof, r.flydsl_us):>5}"
        p(line)
    p("")
    p("Layer summary (us, % of roofline):")
    head = f"  {'preset':14} {'quant':5} {'T':>5} {'roofline':>9} {'ours':>16}"
    if any(r.flydsl_us is not None for r in rows):
        head += f" {'FlyDSL':>16} {'ours<=FlyDSL':>12}"
    p(head)
    for r in rows:
        roof = r.roofline[0]
        line = f"  {r.preset:14} {r.quant:5} {r.tokens:5d} {roof:9.1f} {r.ours_us:9.1f} ({_pct(roof, r.ours_us)})"
        if r.flydsl_us is not None:
            line += f" {r.flydsl_us:9.1f} ({_pct(roof, r.flydsl_us)}) {'yes' if r.ours_us <= r.flydsl_us else 'no':>12}"
        p(line)
    if isa_kernels:
        p("")
        p("GEMM ISA (steady K loop; for a fully unrolled loop, from the first MFMA to the last K load):")
        p("  (loads@MFMA: vector-memory loads a wave has in flight at an MFMA of that stretch, the fewest;")
        p("   B@MFMA: their bytes, the mean; epilogue: VALU / transcendental / IEEE-divide helper / memory")
        p("   instructions / waits after the last MFMA)")
        p(f"  {'kernel':58} {'VGPR':>4} {'AGPR':>4} {'LDS':>6} {'scr':>3} {'w/SIMD':>6} {'K loop':8} "
          f"{'MFMA%':>5} {'vmcnt0':>6} {'lgkm0':>5} {'loads@MFMA':>10} {'B@MFMA':>7} {'epilogue':>22}")
        for k in isa_kernels:
            d = isa_properties(k)
            epi = (f"{d['epilogue_valu']}/{d['epilogue_trans']}/{d['epilogue_div']}/{d['epilogue_vmem']}/"
                   f"{d['epilogue_waits']}")
            p(f"  {d['name'][:58]:58} {d['vgpr']:4d} {d['agpr']:4d} {d['lds']:6d} {d['scratch']:3d} "
              f"{d['waves_per_simd']:6d} {d['k_loop']:8} {100 * d['mfma_share']:5.1f} {d['vmcnt0']:6d} "
              f"{d['lgkmcnt0']:5d} {d['min_loads_at_mfma']:10d} {d['mean_bytes_at_mfma']:7.0f} {epi:>22}")
    p("")
    p("Assumptions (MI355X):")
    for key, fact in HW.items():
        p(f"  {key:24} {fact.value:>10g} {fact.unit:18} {fact.source}")
    p("Calibrated (fitted to published MI355X times of FlyDSL's a4w4 MoE):")
    for key, v in CALIBRATION.items():
        p(f"  {key:24} {v:>10g}")
    if calibration_rows:
        p("Calibration points (published -> modeled):")
        for name, pub, mod in calibration_rows:
            p(f"  {name:40} {pub:8.1f} {mod:8.1f} {100 * (mod / pub - 1):+6.1f}%")

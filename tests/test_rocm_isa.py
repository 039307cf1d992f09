"""The gfx950 ISA analysis (``rocm/isa.py``) on small hand-written kernels with known answers."""

import pytest

from jax_mxfp4_moe.rocm import isa

HEADER = """\t.amdgcn_target "amdgcn-amd-amdhsa-unknown-gfx950"
\t.text
\t.globl\tk
\t.type\tk,@function
k:
"""
FOOTER = """\ts_endpgm
.Lfunc_end0:
\t.size\tk, .Lfunc_end0-k
\t.amdgpu_metadata
---
amdhsa.kernels:
  - .name: k
    .vgpr_count: 64
...
"""
MFMA4 = "v_mfma_scale_f32_16x16x128_f8f6f4 v[0:3], v[4:7], v[8:11], v[0:3], v12, v13 op_sel_hi:[0,0,0] cbsz:4 blgp:4"


def kernel(body: str) -> isa.Program:
    text = HEADER
    for ln in body.strip().splitlines():
        ln = ln.strip()
        text += (ln + "\n") if ln.endswith(":") else ("\t" + ln + "\n")
    return isa.parse(text + FOOTER)


# A K loop that drains: loads, vmcnt(0), then its MFMAs.
DRAINED = f"""
s_load_dwordx4 s[4:7], s[0:1], 0x0
s_waitcnt lgkmcnt(0)
.LBB0_1:
buffer_load_dwordx4 v[4:7], v1, s[4:7], 0 offen
buffer_load_dwordx4 v[8:11], v2, s[4:7], 0 offen
buffer_load_ubyte v13, v3, s[4:7], 0 offen
s_waitcnt vmcnt(0)
{MFMA4}
{MFMA4}
s_add_i32 s8, s8, 1
s_cmp_lg_u32 s8, s9
s_cbranch_scc1 .LBB0_1
ds_write_b128 v20, v[0:3]
s_waitcnt lgkmcnt(0)
"""

# The same loop pipelined: the next step's loads are issued before the wait,
# which leaves them (3 loads, 2 x 1 KiB + 64 B per wave) in flight at the MFMAs.
PIPELINED = f"""
buffer_load_dwordx4 v[4:7], v1, s[4:7], 0 offen
buffer_load_dwordx4 v[8:11], v2, s[4:7], 0 offen
buffer_load_ubyte v13, v3, s[4:7], 0 offen
.LBB0_1:
buffer_load_dwordx4 v[24:27], v1, s[4:7], 0 offen
buffer_load_dwordx4 v[28:31], v2, s[4:7], 0 offen
buffer_load_ubyte v33, v3, s[4:7], 0 offen
s_waitcnt vmcnt(3)
{MFMA4}
{MFMA4}
s_cmp_lg_u32 s8, s9
s_cbranch_scc1 .LBB0_1
"""


def test_parse_classes_bytes_and_counters():
    p = kernel(DRAINED)
    assert p.name == "k" and p.labels == {".LBB0_1": 2}
    ops = [(i.op, i.klass) for i in p.instrs]
    assert ops[0] == ("s_load_dwordx4", "smem") and ops[-1] == ("s_endpgm", "endpgm")
    by_op = {i.op: i for i in p.instrs}
    assert by_op["buffer_load_dwordx4"].bytes_per_wave == 16 * 64
    assert by_op["buffer_load_ubyte"].bytes_per_wave == 64
    assert by_op["ds_write_b128"].bytes_per_wave == 1024 and by_op["ds_write_b128"].counter == "lgkm"
    assert by_op["s_load_dwordx4"].bytes_per_wave == 16
    assert by_op["v_mfma_scale_f32_16x16x128_f8f6f4"].klass == "mfma"
    assert by_op["s_cbranch_scc1"].branch_target == ".LBB0_1"
    # metadata after the kernel is not parsed as instructions
    assert all(not i.op.startswith(".") for i in p.instrs)


@pytest.mark.parametrize("line, klass, nbytes, lds", [
    ("global_atomic_pk_add_bf16 v[0:1], v2, off", "vmem_atomic", 256, False),
    ("buffer_load_dword v1, s[0:3], 0 offen lds", "vmem_load", 256, True),
    ("buffer_store_short v1, v2, s[0:3], 0 offen", "vmem_store", 128, False),
    ("ds_read2_b32 v[0:1], v2 offset1:1", "lds", 512, False),
    ("ds_read_b64 v[0:1], v2", "lds", 512, False),
    ("v_exp_f32_e32 v1, v2", "valu", 0, False),
    ("s_nop 3", "nop", 0, False),
])
def test_memory_widths(line, klass, nbytes, lds):
    (ins,) = [i for i in kernel(line).instrs if i.klass != "endpgm"]
    assert ins.klass == klass and ins.bytes_per_wave == nbytes and ins.to_lds == lds


def test_trans_and_divide_flags():
    p = kernel("v_exp_f32_e32 v1, v2\nv_rcp_f32_e32 v1, v2\nv_div_fmas_f32 v1, v2, v3, v4\nv_add_f32_e32 v1, v2, v3")
    c = isa.class_counts(p.instrs)
    assert (c["valu"], c["trans"], c["div"]) == (4, 2, 1)


def test_wait_counts():
    p = kernel("s_waitcnt vmcnt(3) lgkmcnt(1)\ns_waitcnt lgkmcnt(0)\ns_waitcnt vmcnt(0)")
    w = [isa.wait_counts(i) for i in p.instrs if i.klass == "waitcnt"]
    assert w == [{"vm": 3, "lgkm": 1}, {"lgkm": 0}, {"vm": 0}]


def test_k_loop_steady_region_and_share():
    p = kernel(DRAINED)
    (lp,) = isa.loops(p)
    assert isa.k_loop(p) == lp and (lp.start, lp.end) == (2, 10)
    region = isa.steady_region(p)
    assert len(region) == 9 and isa.count(region, "mfma") == 2
    assert isa.mfma_share(region) == pytest.approx(2 / 9)
    assert isa.drain_waits(region) == {"vmcnt0": 1, "lgkmcnt0": 0}
    r = isa.report(p)
    assert r["k_loop"] == "loop" and r["mfma_total"] == 2


def test_rotated_loop_with_two_back_edges_is_one_loop():
    # LLVM's unroll-by-2 with a mid exit: a conditional back edge and an unconditional one to the same header
    body = f"""
.LBB0_2:
s_cmp_lg_u32 s8, s9
s_cbranch_scc0 .LBB0_5
.LBB0_3:
buffer_load_dwordx4 v[4:7], v1, s[4:7], 0 offen
s_waitcnt vmcnt(0)
{MFMA4}
s_cbranch_scc1 .LBB0_2
buffer_load_dwordx4 v[4:7], v1, s[4:7], 0 offen
s_waitcnt vmcnt(0)
{MFMA4}
s_branch .LBB0_2
.LBB0_5:
ds_write_b128 v20, v[0:3]
"""
    p = kernel(body)
    loops = isa.loops(p)
    assert len(loops) == 1 and loops[0].start == 0 and p.instrs[loops[0].end].op == "s_branch"
    assert isa.count(isa.steady_region(p), "mfma") == 2


def test_loads_in_flight_drained_vs_pipelined():
    drained = isa.loads_in_flight(kernel(DRAINED))
    assert drained["min_loads"] == 0 and drained["min_bytes"] == 0
    piped = isa.loads_in_flight(kernel(PIPELINED))
    # the next step's 3 loads are outstanding at every MFMA of the steady loop
    assert piped["min_loads"] == 3 and piped["min_bytes"] == 2 * 1024 + 64
    assert piped["mean_bytes"] == 2 * 1024 + 64
    assert isa.drain_waits(isa.steady_region(kernel(PIPELINED))) == {"vmcnt0": 0, "lgkmcnt0": 0}


def test_unrolled_k_region_stops_at_the_last_stream_load():
    body = f"""
buffer_load_dwordx4 v[4:7], v1, s[4:7], 0 offen
s_waitcnt vmcnt(0)
{MFMA4}
buffer_load_dwordx4 v[8:11], v1, s[4:7], 0 offen
s_waitcnt vmcnt(0)
{MFMA4}
s_waitcnt vmcnt(0)
{MFMA4}
buffer_load_dword v30, v1, s[4:7], 0 offen
"""
    p = kernel(body)
    assert isa.k_loop(p) is None
    region = isa.steady_region(p)
    assert region[0].klass == "mfma" and region[-1].op == "buffer_load_dwordx4" and len(region) == 2
    # the wait after the last K load is the tail's drain, not a mid-stream one
    assert isa.report(p)["drain_waits"] == {"vmcnt0": 0, "lgkmcnt0": 0}
    assert isa.report(p)["k_loop"] == "unrolled"


def test_exit_branch_of_a_workgroup_without_work():
    body = f"""
s_load_dword s3, s[0:1], 0x0
s_waitcnt lgkmcnt(0)
s_cmp_ge_i32 s2, s3
s_cbranch_scc1 .LBB0_3
{MFMA4}
.LBB0_3:
"""
    p = kernel(body)
    eb = isa.exit_branch(p)
    assert eb is not None and eb.index == 3


def test_mfma_clusters():
    p = kernel(PIPELINED)
    assert isa.mfma_clusters(isa.steady_region(p)) == [2]


def test_unknown_kernel_name_is_an_error():
    with pytest.raises(ValueError, match="kernel"):
        isa.parse(HEADER + FOOTER, "nope")
    with pytest.raises(ValueError, match="no kernel symbol"):
        isa.parse("\ts_endpgm\n")

"""Kernels that measure the device's ceilings for the bench (tools/bench.py):
a streaming read of HBM and a dense bf16 matmul on the tensor cores."""

import triton
import triton.language as tl


@triton.jit
def stream_read(x_ptr, out_ptr, n, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """Each program sums its share of x [n] f32 (BLOCK * UNROLL elements per
    step, 16-byte loads, cached in L2 only) into out[program]; the sum keeps
    the loads live."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * (BLOCK * UNROLL)
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(pid * (BLOCK * UNROLL), n, step):
        for u in tl.static_range(UNROLL):
            offs = start + u * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0, cache_modifier=".cg")
    tl.store(out_ptr + pid, tl.sum(acc, 0))


@triton.jit
def matmul_bf16(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, GROUP_M: tl.constexpr):
    """c [M, N] bf16 = a [M, K] @ b [K, N] (bf16, f32 accumulation), row-major,
    M, N, K multiples of the tile; program ids grouped GROUP_M row tiles at a
    time for L2 reuse."""
    pid = tl.program_id(0)
    tiles_m = M // BM
    tiles_n = N // BN
    per_group = GROUP_M * tiles_n
    first = pid // per_group * GROUP_M
    size = tl.minimum(tiles_m - first, GROUP_M)
    pm = first + pid % per_group % size
    pn = pid % per_group // size
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = a_ptr + rm[:, None] * K + rk[None, :]
    b = b_ptr + rk[:, None] * N + rn[None, :]
    acc = tl.zeros((BM, BN), tl.float32)
    for _ in range(0, K, BK):
        acc = tl.dot(tl.load(a), tl.load(b), acc)
        a += BK
        b += BK * N
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16))

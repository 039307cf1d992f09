"""Runs kernels/triton/moe_gemm.py's _direct_rows in triton's interpreter
(CPU) for the routings given as JSON on stdin; prints each program's rows as
JSON. A separate process: TRITON_INTERPRET must be set before the kernel
module is imported, and the other tests import it compiled."""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jax_mxfp4_moe.backends.cuda_kernels import kernel_modules  # noqa: E402

moe_gemm = __import__(f"{kernel_modules().__name__}.moe_gemm", fromlist=["_direct_rows"])


@triton.jit
def _probe(ids_ptr, tw_ptr, out_ptr, w_ptr, T, K, E, BM: tl.constexpr, NMAX: tl.constexpr):
    rows, tok, slot, row_ok, expert, wgt, live = moe_gemm._direct_rows(ids_ptr, tw_ptr, T, K, E,
                                                                       BM, NMAX)
    r = tl.arange(0, BM)
    base = out_ptr + tl.program_id(1) * (4 * BM + 2)
    tl.store(base + r, rows)
    tl.store(base + BM + r, tok)
    tl.store(base + 2 * BM + r, slot)
    tl.store(base + 3 * BM + r, row_ok.to(tl.int32))
    tl.store(base + 4 * BM, expert)
    tl.store(base + 4 * BM + 1, live)
    tl.store(w_ptr + tl.program_id(1) * BM + r, wgt)


def main():
    results = []
    for case in json.load(sys.stdin):
        ids = torch.tensor(np.asarray(case["ids"], np.int32))
        tw = torch.tensor(np.asarray(case["tw"], np.float32))
        T, K = ids.shape
        BM, E, programs = case["BM"], case["E"], case["programs"]
        nmax = max(16, 1 << (T * K - 1).bit_length())
        out = torch.zeros(programs * (4 * BM + 2), dtype=torch.int32)
        w = torch.zeros(programs * BM, dtype=torch.float32)
        _probe[(1, programs, 1)](ids, tw, out, w, T, K, E, BM=BM, NMAX=nmax)
        out = out.reshape(programs, 4 * BM + 2).tolist()
        w = w.reshape(programs, BM).tolist()
        results.append([dict(rows=o[:BM], tok=o[BM:2 * BM], slot=o[2 * BM:3 * BM],
                             ok=o[3 * BM:4 * BM], expert=o[4 * BM], live=o[4 * BM + 1], w=wr)
                        for o, wr in zip(out, w)])
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()

"""Triton kernel sources of the CUDA backend (compiled by cuda.compile)."""

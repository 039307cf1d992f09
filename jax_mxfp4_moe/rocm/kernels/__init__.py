"""FlyDSL kernel sources of the ROCm backend (compiled by rocm.compile)."""

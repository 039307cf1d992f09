"""NVIDIA Hopper (sm_90a) backend: Triton kernels, their tile table, compilation
to cubins and the sm90 weight layout."""

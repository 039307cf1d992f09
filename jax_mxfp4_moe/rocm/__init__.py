"""AMD gfx950 backend: FlyDSL kernels, their geometry and configs, compilation to
code objects, the gfx950 weight layout and a NumPy functional model."""

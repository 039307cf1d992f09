"""Mixture-of-Experts FFN layers with MXFP4 expert weights under jax.jit."""

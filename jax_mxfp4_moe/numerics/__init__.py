"""Numerics: MX formats, the sort contract, the float64 reference (the oracle)
and the whole layer in jnp (the CPU path)."""

"""The public layer: the `moe` primitive and its spec, expert weights and their
layouts, routing helpers, expert and tensor parallelism."""

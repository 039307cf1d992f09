"""Platform backends: each exposes available(), supports(...) and moe(...)."""

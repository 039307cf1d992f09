"""Test markers: `gpu` needs a CUDA GPU, `rocm` a ROCm GPU; elsewhere those
tests are skipped (with the reason), never counted as passes."""

import functools

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA CUDA GPU visible to jax")
    config.addinivalue_line("markers", "rocm: needs an AMD ROCm GPU visible to jax")


@functools.lru_cache(maxsize=None)
def _has_platform(platform: str) -> bool:
    import jax

    try:
        return len(jax.devices(platform)) > 0
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("gpu") and not _has_platform("cuda"):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (jax.devices('cuda') is empty)"))
        if item.get_closest_marker("rocm") and not _has_platform("rocm"):
            item.add_marker(pytest.mark.skip(reason="needs a ROCm GPU (jax.devices('rocm') is empty)"))

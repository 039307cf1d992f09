"""The on-disk code-object cache: folder choice, miss/hit, rebuild of damaged
entries, atomic writes, logging, and hand-off to the launcher's store."""

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from jax_mxfp4_moe.runtime import codecache, ffi

L = pytest.importorskip("jax_mxfp4_moe._launcher", reason="launcher extension not built")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(codecache.ENV_VAR, str(tmp_path / "cache"))
    return tmp_path / "cache"


class Builder:
    """A build() that counts its calls and returns fresh random bytes."""

    def __init__(self, meta=None):
        self.calls = 0
        self.data = os.urandom(777)
        self.meta = meta if meta is not None else {"name": "toy_kernel", "params": ["ptr", "i32"]}

    def __call__(self):
        self.calls += 1
        return self.data, self.meta


KEY = {"kernel": "toy", "source": "abc123", "arch": "sm_90a", "params": {"BM": 64}}


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv(codecache.ENV_VAR, str(tmp_path))
    assert codecache.cache_dir() == tmp_path
    monkeypatch.delenv(codecache.ENV_VAR)
    assert codecache.cache_dir() == Path.home() / ".cache" / "jax_mxfp4_moe"


def test_miss_builds_once_then_hits(cache):
    build = Builder()
    h1, meta1 = codecache.cached_compile(KEY, build)
    assert build.calls == 1
    assert h1 == hashlib.sha256(build.data).hexdigest()
    assert (cache / f"{h1}.bin").read_bytes() == build.data
    entry = json.loads((cache / f"{codecache.key_digest(KEY)}.json").read_text())
    assert entry["code_hash"] == h1 and entry["key_parts"] == KEY
    h2, meta2 = codecache.cached_compile(dict(reversed(list(KEY.items()))), build)
    assert build.calls == 1  # key order does not matter; the hit does not build
    assert (h2, meta2) == (h1, meta1) == (h1, build.meta)
    # ffi.cached_compile also hands the bytes to the launcher's store
    assert ffi.cached_compile(KEY, build) == (h1, meta1) and L.has_code_object(h1)
    assert build.calls == 1


def test_different_keys_are_different_variants(cache):
    a, b = Builder(), Builder()
    ha, _ = codecache.cached_compile(KEY, a)
    hb, _ = codecache.cached_compile(dict(KEY, arch="gfx950"), b)
    assert a.calls == b.calls == 1 and ha != hb


def test_hit_registers_bytes_in_the_launcher_store(cache, monkeypatch):
    build = Builder()
    h, _ = ffi.cached_compile(KEY, build)
    seen = []
    monkeypatch.setattr(ffi, "register_code_object",
                        lambda code_hash, data: seen.append((code_hash, data)))
    ffi.cached_compile(KEY, build)
    assert seen == [(h, build.data)]  # the hit hands the verified bytes over


@pytest.mark.parametrize("damage", ["corrupt_object", "missing_object", "corrupt_entry",
                                    "missing_entry"])
def test_damaged_entries_rebuild(cache, damage):
    build = Builder()
    h, _ = codecache.cached_compile(KEY, build)
    obj = cache / f"{h}.bin"
    entry = cache / f"{codecache.key_digest(KEY)}.json"
    if damage == "corrupt_object":
        obj.write_bytes(b"\0" + build.data[1:])
    elif damage == "missing_object":
        obj.unlink()
    elif damage == "corrupt_entry":
        entry.write_text("{not json")
    else:
        entry.unlink()
    h2, _ = codecache.cached_compile(KEY, build)
    assert build.calls == 2
    assert h2 == h and obj.read_bytes() == build.data
    assert json.loads(entry.read_text())["code_hash"] == h


def test_compile_is_logged_once_per_variant(cache, caplog):
    build = Builder()
    with caplog.at_level(logging.INFO, logger="jax_mxfp4_moe"):
        codecache.cached_compile(KEY, build)
        codecache.cached_compile(KEY, build)
    compiled = [r for r in caplog.records
                if r.levelno == logging.INFO and r.getMessage().startswith("compiled ")]
    assert len(compiled) == 1
    assert compiled[0].getMessage().startswith("compiled toy in ")


def test_writes_leave_no_temporary_files(cache):
    codecache.cached_compile(KEY, Builder())
    codecache.cached_compile(dict(KEY, arch="x"), Builder())
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 4
    assert all(n.endswith((".bin", ".json")) and not n.startswith(".") for n in names)


def test_unwritable_cache_still_compiles_and_registers(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv(codecache.ENV_VAR, str(blocker))
    build = Builder()
    with caplog.at_level(logging.WARNING, logger="jax_mxfp4_moe"):
        h, meta = ffi.cached_compile(KEY, build)
    assert build.calls == 1 and meta == build.meta
    assert L.has_code_object(h)
    assert any("cannot write" in r.getMessage() for r in caplog.records)


def test_metadata_round_trips_through_json(cache):
    build = Builder(meta={"name": "k", "block": (128, 1, 1), "params": ("ptr",)})
    _, miss = codecache.cached_compile(KEY, build)
    _, hit = codecache.cached_compile(KEY, build)
    assert miss == hit == {"name": "k", "block": [128, 1, 1], "params": ["ptr"]}


def test_load_code_object(cache):
    build = Builder()
    h, _ = codecache.cached_compile(KEY, build)
    assert codecache.load_code_object(h) == build.data
    with pytest.raises(FileNotFoundError, match="code_hash"):
        codecache.load_code_object(hashlib.sha256(b"none").hexdigest())


@pytest.mark.parametrize("key, build, error, match", [
    ({"f": object()}, Builder(), TypeError, "key_parts"),
    ({"x": float("nan")}, Builder(), TypeError, "key_parts"),
    ([1, 2], Builder(), TypeError, "key_parts"),
    (KEY, lambda: b"bytes", TypeError, "build"),
    (KEY, lambda: (b"", {}), TypeError, "build"),
    (KEY, lambda: ("text", {}), TypeError, "build"),
    (KEY, lambda: (b"x", {"f": object()}), TypeError, "build"),
    (KEY, lambda: (b"x", [1]), TypeError, "build"),
])
def test_bad_inputs_raise(cache, key, build, error, match):
    with pytest.raises(error, match=match):
        codecache.cached_compile(key, build)

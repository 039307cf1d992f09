"""On-disk cache of compiled GPU code objects and their metadata.

Layout of :func:`cache_dir` (``$JAX_MXFP4_MOE_CACHE_DIR``, else
``~/.cache/jax_mxfp4_moe``):

- ``<sha256 of the bytes>.bin``: a code object, named by its content (the
  name the FFI launcher resolves, see ``ffi.py``);
- ``<sha256 of the key>.json``: one compiled variant: the key parts, the
  code object's hash and the compiler's metadata.

Every write goes to a temporary file in the same folder and is renamed into
place, so concurrent processes never see a partial file. A variant whose
object is missing or does not match its hash is rebuilt. Where the folder is
not writable, objects built in this process are kept in memory instead.

This module only stores bytes; ``runtime.ffi.cached_compile`` also hands them
to the launcher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("jax_mxfp4_moe")

ENV_VAR = "JAX_MXFP4_MOE_CACHE_DIR"


def cache_dir() -> Path:
    """The cache folder (not created here)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "jax_mxfp4_moe"


def key_digest(key_parts: dict) -> str:
    """SHA-256 of the canonical JSON of ``key_parts``."""
    if not isinstance(key_parts, dict):
        raise TypeError(f"key_parts: expected a dict, got {type(key_parts).__name__}")
    try:
        text = json.dumps(key_parts, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"key_parts: must be JSON-serialisable: {e}") from None
    return hashlib.sha256(text.encode()).hexdigest()


def sources_digest(paths) -> str:
    """SHA-256 over the ``*.py`` sources at ``paths`` (files, or folders read
    non-recursively), by name and content: a kernel family's source key."""
    files = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.py")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def object_path(code_hash: str) -> Path:
    return cache_dir() / f"{code_hash}.bin"


# Objects built in this process that could not be written to the cache folder.
_UNWRITTEN: dict[str, bytes] = {}


def write_code_object(code_hash: str, data: bytes) -> bool:
    """Stores ``data`` as ``<code_hash>.bin``; False (logged) if the folder is
    not writable, so compiling still works with a read-only cache (the bytes
    stay in memory for this process)."""
    path = object_path(code_hash)
    try:
        if not path.exists() or _read_verified(path, code_hash) is None:
            _atomic_write(path, data)
        return True
    except OSError as e:
        log.warning("cannot write code object %s to %s: %s", code_hash, path, e)
        _UNWRITTEN[code_hash] = bytes(data)
        return False


def _read_verified(path: Path, code_hash: str) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == code_hash else None


def load_code_object(code_hash: str) -> bytes:
    """The bytes of a cached code object (checked against their hash)."""
    if code_hash in _UNWRITTEN:
        return _UNWRITTEN[code_hash]
    data = _read_verified(object_path(code_hash), code_hash)
    if data is None:
        raise FileNotFoundError(f"code_hash: no valid code object {code_hash} in {cache_dir()}")
    return data


def _lookup(key: str) -> tuple[str, dict, bytes] | None:
    """A cached variant whose object is intact, else None."""
    try:
        entry = json.loads((cache_dir() / f"{key}.json").read_text())
        code_hash, meta = entry["code_hash"], entry["meta"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    data = _read_verified(object_path(code_hash), code_hash)
    if data is None:
        return None
    return code_hash, meta, data


def cached_compile(key_parts: dict, build: Callable[[], tuple[bytes, dict]]) -> tuple[str, dict]:
    """The code object of one compiled variant: (its SHA-256, its metadata).

    ``key_parts`` names the variant (callers include the kernel source hash,
    parameters, target arch and compiler version); ``build()`` compiles it and
    returns ``(bytes, metadata)`` with JSON-serialisable metadata. On a hit
    ``build`` is not called. :func:`load_code_object` then has the bytes.
    """
    key = key_digest(key_parts)
    hit = _lookup(key)
    if hit is not None:
        code_hash, meta, data = hit
        log.debug("code cache hit %s (%s)", _label(key_parts, meta), code_hash[:12])
        return code_hash, meta

    t0 = time.perf_counter()
    result = build()
    seconds = time.perf_counter() - t0
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError("build: must return (code object bytes, metadata dict)")
    data, meta = result
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise TypeError("build: the code object must be non-empty bytes")
    if not isinstance(meta, dict):
        raise TypeError(f"build: metadata must be a dict, got {type(meta).__name__}")
    data = bytes(data)
    try:
        meta_text = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"build: metadata must be JSON-serialisable: {e}") from None
    meta = json.loads(meta_text)  # hits and misses return the same structure
    code_hash = hashlib.sha256(data).hexdigest()
    log.info("compiled %s in %.2f s", _label(key_parts, meta), seconds)

    if write_code_object(code_hash, data):
        entry = {"key_parts": key_parts, "code_hash": code_hash, "meta": meta}
        try:
            _atomic_write(cache_dir() / f"{key}.json",
                          json.dumps(entry, sort_keys=True, indent=1).encode())
        except OSError as e:
            log.warning("cannot write code cache entry to %s: %s", cache_dir(), e)
    return code_hash, meta


def _label(key_parts: dict, meta: dict) -> str:
    for source in (key_parts, meta):
        for field in ("name", "kernel"):
            if isinstance(source.get(field), str):
                return source[field]
    return "kernel"

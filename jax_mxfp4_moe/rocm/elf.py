"""Read an AMDGPU code object's kernel metadata (ELF note, MessagePack).

A gfx950 code object (code object v5/v6) carries its kernel descriptors'
metadata in an ``NT_AMDGPU_METADATA`` note named "AMDGPU": a MessagePack
map with ``amdhsa.kernels``, one map per kernel (``.name``, ``.args`` with
``.offset``/``.size``/``.value_kind``, ``.kernarg_segment_size``,
``.vgpr_count``, ``.agpr_count``, ``.sgpr_count``,
``.group_segment_fixed_size`` (LDS), ``.private_segment_fixed_size``
(scratch), ...).  Pure Python, so the runtime path needs no LLVM tool.
"""

from __future__ import annotations

import struct

NT_AMDGPU_METADATA = 32
_SHT_NOTE = 7
_EM_AMDGPU = 224


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("msgpack: truncated data")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(">" + fmt, self.take(struct.calcsize(">" + fmt)))[0]


def _msgpack(r: _Reader):
    b = r.take(1)[0]
    if b <= 0x7F:
        return b
    if b >= 0xE0:
        return b - 0x100
    if 0x80 <= b <= 0x8F:
        return _map(r, b & 0x0F)
    if 0x90 <= b <= 0x9F:
        return [_msgpack(r) for _ in range(b & 0x0F)]
    if 0xA0 <= b <= 0xBF:
        return r.take(b & 0x1F).decode()
    simple = {0xC0: None, 0xC2: False, 0xC3: True}
    if b in simple:
        return simple[b]
    sized = {
        0xCC: "B", 0xCD: "H", 0xCE: "I", 0xCF: "Q",
        0xD0: "b", 0xD1: "h", 0xD2: "i", 0xD3: "q",
        0xCA: "f", 0xCB: "d",
    }
    if b in sized:
        return r.unpack(sized[b])
    if b in (0xD9, 0xDA, 0xDB):
        n = r.unpack({0xD9: "B", 0xDA: "H", 0xDB: "I"}[b])
        return r.take(n).decode()
    if b in (0xC4, 0xC5, 0xC6):
        n = r.unpack({0xC4: "B", 0xC5: "H", 0xC6: "I"}[b])
        return r.take(n)
    if b in (0xDC, 0xDD):
        n = r.unpack("H" if b == 0xDC else "I")
        return [_msgpack(r) for _ in range(n)]
    if b in (0xDE, 0xDF):
        return _map(r, r.unpack("H" if b == 0xDE else "I"))
    raise ValueError(f"msgpack: unsupported type byte 0x{b:02x}")


def _map(r: _Reader, n: int) -> dict:
    out = {}
    for _ in range(n):
        k = _msgpack(r)
        out[k] = _msgpack(r)
    return out


def msgpack_loads(data: bytes):
    r = _Reader(data)
    out = _msgpack(r)
    if r.pos != len(data):
        raise ValueError("msgpack: trailing bytes")
    return out


def _notes(blob: bytes):
    """Yield (name, type, desc) of every note in an ELF64 little-endian file."""
    if blob[:4] != b"\x7fELF" or blob[4] != 2 or blob[5] != 1:
        raise ValueError("code object: not an ELF64 little-endian file")
    (machine,) = struct.unpack_from("<H", blob, 18)
    if machine != _EM_AMDGPU:
        raise ValueError(f"code object: e_machine {machine}, expected EM_AMDGPU ({_EM_AMDGPU})")
    shoff, = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", blob, 0x3A)
    for i in range(shnum):
        sh = shoff + i * shentsize
        sh_type, = struct.unpack_from("<I", blob, sh + 4)
        if sh_type != _SHT_NOTE:
            continue
        off, size = struct.unpack_from("<QQ", blob, sh + 0x18)
        pos, end = off, off + size
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
            pos += 12
            name = blob[pos : pos + namesz].rstrip(b"\0").decode()
            pos += (namesz + 3) & ~3
            desc = blob[pos : pos + descsz]
            pos += (descsz + 3) & ~3
            yield name, ntype, desc


def code_object_metadata(blob: bytes) -> dict:
    """The decoded AMDGPU metadata map of a code object."""
    for name, ntype, desc in _notes(blob):
        if name == "AMDGPU" and ntype == NT_AMDGPU_METADATA:
            return msgpack_loads(desc)
    raise ValueError("code object: no AMDGPU metadata note")


def kernel_metadata(blob: bytes) -> dict:
    """{kernel name: its metadata map} of a code object."""
    return {k[".name"]: k for k in code_object_metadata(blob)["amdhsa.kernels"]}


def kernarg_offsets(kernel_md: dict) -> tuple[list[int], list[int], int]:
    """(offsets, sizes, segment size) of a kernel's explicit arguments."""
    args = kernel_md.get(".args", [])
    hidden = [a for a in args if str(a.get(".value_kind", "")).startswith("hidden_")]
    if hidden:
        raise ValueError(f"kernel {kernel_md.get('.name')}: unexpected hidden arguments {hidden}")
    return [a[".offset"] for a in args], [a[".size"] for a in args], kernel_md[".kernarg_segment_size"]

"""The on-disk compile cache: object code and its layout, keyed by graph + target +
dlc version. Entries are written atomically and checked on read; a damaged entry is
rebuilt, never loaded."""
from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from pathlib import Path

MAGIC = b"DLCOBJ2\0"


def default_dir() -> Path:
    env = os.environ.get("DLC_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dlc"


class Cache:
    def __init__(self, directory: Path | None = None):
        self.dir = Path(directory) if directory else default_dir()

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.obj"

    def get(self, key: str):
        """(object files, layout json) or None when absent or damaged."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            return unpack(data)
        except ValueError:
            try:
                path.unlink()  # damaged: rebuild it
            except OSError:
                pass
            return None

    def put(self, key: str, obj: list[bytes], layout_json: str) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(pack(obj, layout_json))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only or full cache never stops a run


def pack(objects: list[bytes], layout_json: str) -> bytes:
    """magic, sha256 of the body, then the body: counts and sizes, layout, object files."""
    meta = layout_json.encode()
    head = struct.pack("<QQ", len(meta), len(objects)) + b"".join(struct.pack("<Q", len(o)) for o in objects)
    body = head + meta + b"".join(objects)
    return MAGIC + hashlib.sha256(body).digest() + body


def unpack(data: bytes) -> tuple[list[bytes], str]:
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 48:
        raise ValueError("not a dlc object file")
    digest, body = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("checksum mismatch")
    n_meta, n_obj = struct.unpack("<QQ", body[:16])
    sizes = struct.unpack(f"<{n_obj}Q", body[16:16 + 8 * n_obj])
    at = 16 + 8 * n_obj
    meta = body[at:at + n_meta].decode()
    at += n_meta
    objects = []
    for size in sizes:
        objects.append(body[at:at + size])
        at += size
    if at != len(body):
        raise ValueError("truncated")
    return objects, meta

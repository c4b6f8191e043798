"""The on-disk compile cache: a backend's compiled code and its layout, keyed by what
produced them (the program, the batch size, the backend and its target, the compiler's
own source). Entries are written atomically, carry their full key and a checksum, and are
checked on read; a damaged or mismatched entry is rebuilt, never loaded."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

MAGIC = b"DLCOBJ3\0"


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

    def get(self, key: str) -> tuple[list[bytes], str] | None:
        """(blobs, layout json), or None when absent, damaged or stored under another key."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            stored_key, blobs, layout = unpack(data)
            if stored_key != key:
                raise ValueError("the entry belongs to another key")
            return blobs, layout
        except ValueError:
            try:
                path.unlink()  # damaged: rebuild it
            except OSError:
                pass
            return None

    def put(self, key: str, blobs: list[bytes], layout_json: str) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(pack(key, blobs, layout_json))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only or full cache never stops a run


def pack(key: str, blobs: list[bytes], layout_json: str) -> bytes:
    """magic, sha256 of the body, then the body: the header's length, the header (key,
    layout, blob sizes) as JSON, the blobs."""
    head = json.dumps({"key": key, "layout": layout_json, "sizes": [len(b) for b in blobs]}).encode()
    body = struct.pack("<Q", len(head)) + head + b"".join(blobs)
    return MAGIC + hashlib.sha256(body).digest() + body


def unpack(data: bytes) -> tuple[str, list[bytes], str]:
    """(key, blobs, layout json); ValueError when the data is not an intact entry."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 40:
        raise ValueError("not a dlc cache entry")
    digest, body = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("checksum mismatch")
    (n_head,) = struct.unpack("<Q", body[:8])
    try:
        head = json.loads(body[8:8 + n_head])
        key, layout, sizes = head["key"], head["layout"], [int(s) for s in head["sizes"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"bad header: {e}") from None
    at, blobs = 8 + n_head, []
    for size in sizes:
        blobs.append(body[at:at + size])
        at += size
    if at != len(body) or not isinstance(key, str) or not isinstance(layout, str):
        raise ValueError("truncated")
    return key, blobs, layout

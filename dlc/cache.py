"""The on-disk compile cache: a backend's compiled code and its layout, keyed by what
produced them (the program, the batch size, the backend and its target, the compiler's
own source). Entries are written atomically, carry their full key and a checksum, and are
checked on read; a damaged or mismatched entry is rebuilt, never loaded.

Loading an entry runs the native code inside it, so the directory must be private: it is
created with mode 0700, and one that other users can write to is not used at all. The
cache holds at most `DLC_CACHE_MAX_BYTES` (default 1 GiB); the least recently used
entries go first. Several processes may share one directory: writes replace files
atomically and eviction tolerates files that another process removed first.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dlc.core.diagnostics import UsageError
from dlc.core.userdir import cache_dir as default_dir, insecure

MAGIC = b"DLCOBJ3\0"
DEFAULT_MAX_BYTES = 1 << 30
_ENTRY = re.compile(r"[0-9a-f]{64}\.obj")   # an entry's file name (its key)
_TEMP_PREFIX = ".dlc-"                      # a write in progress (or one a crash left behind)
_warned: set = set()                        # directories already warned about in this process


def max_bytes() -> int:
    """The size bound: DLC_CACHE_MAX_BYTES in bytes, with an optional K, M or G suffix."""
    text = os.environ.get("DLC_CACHE_MAX_BYTES", "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) == 0:
        raise UsageError(f"DLC_CACHE_MAX_BYTES={text!r} is not a size",
                         hint="give a positive number of bytes, e.g. 500M or 2G")
    return int(digits) * scale


@dataclass
class Usage:
    entries: int
    bytes: int


class Cache:
    def __init__(self, directory: Path | None = None):
        self.dir = Path(directory) if directory else default_dir()
        self.max_bytes = max_bytes()
        self._refused: str | None = None
        self._checked = False

    def usable(self) -> bool:
        """Whether this directory may be used. One that other users can write to is
        refused: a run never fails because of its cache (compiling takes only longer), but
        the user is told once why, and how to fix it -- silently using it would load code
        someone else may have put there, silently ignoring it would leave every run slow."""
        if not self._checked:
            self._checked = True
            reason = insecure(self.dir)
            if reason:
                self._refused = reason
                if str(self.dir) not in _warned:
                    _warned.add(str(self.dir))
                    print(f"dlc: warning: not using the compile cache {self.dir}: {reason}; compiling without it\n"
                          f"hint: `chmod 700 {self.dir}` if it is yours, or set DLC_CACHE_DIR to a private "
                          "directory", file=sys.stderr)
        return self._refused is None

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.obj"

    def lookup(self, key: str) -> tuple[tuple[list[bytes], str] | None, str | None]:
        """((blobs, layout json) or None, why the entry found was damaged or None). A
        damaged entry is removed."""
        if not self.usable():
            return None, None
        path = self._path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None, None
        try:
            stored_key, blobs, layout = unpack(data)
            if stored_key != key:
                raise ValueError("the entry belongs to another key")
        except ValueError as e:
            self.discard(key)
            return None, str(e)
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        return (blobs, layout), None

    def get(self, key: str) -> tuple[list[bytes], str] | None:
        """(blobs, layout json), or None when absent, damaged or stored under another key."""
        return self.lookup(key)[0]

    def discard(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except OSError:
            pass

    def put(self, key: str, blobs: list[bytes], layout_json: str) -> None:
        if not self.usable():
            return
        path = self._path(key)
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self._checked_again():
                return
            path.parent.mkdir(mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(pack(key, blobs, layout_json))
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)  # still there only when the write failed
            self.evict(keep=path)
        except OSError:
            pass  # a read-only or full cache never stops a run

    def _checked_again(self) -> bool:
        """The directory may have just been created by someone else: check it again."""
        self._checked = False
        return self.usable()

    def files(self) -> list[Path]:
        """dlc's own files here: entries, and temporaries of writes in progress."""
        out = []
        for sub in _subdirs(self.dir):
            try:
                out += [f for f in sub.iterdir()
                        if _ENTRY.fullmatch(f.name) or (f.name.startswith(_TEMP_PREFIX) and f.suffix == ".tmp")]
            except OSError:
                continue
        return out

    def usage(self) -> Usage:
        entries, size = 0, 0
        for f in self.files():
            if f.suffix == ".obj":
                try:
                    size += f.stat().st_size
                    entries += 1
                except OSError:
                    pass  # removed meanwhile
        return Usage(entries, size)

    def evict(self, keep: Path | None = None) -> None:
        """Removes the least recently used entries until the cache fits its bound."""
        entries = []
        for f in self.files():
            if f.suffix == ".obj":
                try:
                    st = f.stat()
                except OSError:
                    continue
                entries.append((st.st_mtime, st.st_size, f))
        total = sum(size for _, size, _ in entries)
        for _, size, f in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if f == keep:
                continue  # the entry just written stays, even when it alone is over the bound
            try:
                f.unlink()
            except OSError:
                pass  # another process evicted it first
            total -= size

    def clear(self) -> Usage:
        """Removes every entry (and leftover temporary), nothing else; returns what was removed."""
        removed = Usage(0, 0)
        for f in self.files():
            try:
                size = f.stat().st_size
                f.unlink()
            except OSError:
                continue
            if f.suffix == ".obj":
                removed.entries += 1
                removed.bytes += size
        for sub in _subdirs(self.dir):
            with contextlib.suppress(OSError):
                sub.rmdir()  # only when empty: nothing but dlc's own files is removed
        return removed


def _subdirs(directory: Path) -> list[Path]:
    try:
        return [d for d in directory.iterdir()
                if re.fullmatch(r"[0-9a-f]{2}", d.name) and d.is_dir() and not d.is_symlink()]
    except OSError:
        return []


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
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"bad header: {e}") from None
    at, blobs = 8 + n_head, []
    for size in sizes:
        if size < 0:
            raise ValueError("bad header: a negative size")
        blobs.append(body[at:at + size])
        at += size
    if at != len(body) or not isinstance(key, str) or not isinstance(layout, str):
        raise ValueError("truncated")
    return key, blobs, layout

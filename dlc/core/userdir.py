"""dlc's per-user cache directory (`~/.cache/dlc`, `$XDG_CACHE_HOME/dlc` or
`DLC_CACHE_DIR`): the compile cache (dlc.cache) and the parser's tables live there. What
is read from it runs (native code) or is unpickled (the tables), so it must be private:
created with mode 0700, and not used at all where other users could write to it."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    env = os.environ.get("DLC_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dlc"


def insecure(directory: Path) -> str | None:
    """Why other users could put code into `directory` (None: they cannot, or it does not
    exist yet and will be created private)."""
    try:
        st = directory.stat()
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"it cannot be inspected ({e.strerror or e})"
    if not hasattr(os, "getuid"):
        return None  # Windows: permissions are ACLs; the user's profile is private by default
    if st.st_uid != os.getuid():
        return "it is owned by another user"
    if st.st_mode & 0o022:
        return f"other users can write to it (mode {st.st_mode & 0o777:o})"
    return None


def private_file(name: str) -> Path | None:
    """A path for `name` in the cache directory (created private if need be); None where
    that directory is not private or cannot be created (the caller goes without)."""
    directory = cache_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return None
    return None if insecure(directory) else directory / name

"""Files written atomically: a run killed at any moment leaves either the old file or the new one.

The new content goes to a temporary file next to the target, is flushed to disk (fsync), and then
replaces the target in one rename (os.replace is atomic on POSIX file systems).
"""
import contextlib
import json
import os


def replace(tmp, path):
    """fsync tmp, then rename it over path."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path, suffix=".tmp"):
    """with atomic_path(p) as tmp: write tmp in any way; on success it replaces p. The suffix keeps
    the extension when a writer picks the format from it (e.g. ".tmp.png")."""
    tmp = f"{path}{suffix}"
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    replace(tmp, path)


def save_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)


def save_bytes(path, data):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)

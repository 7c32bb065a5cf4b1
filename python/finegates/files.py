"""Writing files the way every output of this package is written: to a temporary name, then renamed
(a crash never leaves a half-written file), with the permissions the user's umask gives (writers
such as safetensors and mkstemp create 0600 files, unreadable to colleagues on a shared run)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["umask_mode", "follow_umask", "atomic_write_bytes", "write_json"]


def umask_mode(mode: int) -> int:
    """``mode`` as the user's umask leaves it (0o666 -> 0o644 under umask 022): what a plain
    ``open`` would give; mkstemp/mkdtemp create 0600/0700, unreadable to colleagues on a shared run."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def follow_umask(root: Path) -> None:
    """Gives every file and directory under ``root`` the umask's permissions: writers such as
    safetensors create their files 0600, unreadable to colleagues on a shared run."""
    for d, dirs, files in os.walk(root):
        for names, mode in ((files, 0o666), (dirs, 0o777)):
            for name in names:
                if not os.path.islink(os.path.join(d, name)):
                    os.chmod(os.path.join(d, name), umask_mode(mode))
    os.chmod(root, umask_mode(0o777))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        os.chmod(tmp, umask_mode(0o666))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n").encode())


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")

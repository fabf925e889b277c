"""Writing outputs so that a crash, a full disk or a kill never leaves a half-written file behind.

Every output goes to a temporary name in the same folder and is renamed over the target in one
step (``os.replace`` is atomic on POSIX filesystems). Folders (``final/``, ``best/``) are built
beside the target and swapped in, so the previous one stays until the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path`` (when
    ``write`` wrote nothing, ``path`` is left as it was)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a folder, not a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    try:
        write(tmp)
        if tmp.exists():
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda t: t.write_text(text))


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_parquet(table, path: str | Path, **kwargs) -> Path:
    import pyarrow.parquet as pq

    return atomic_write(path, lambda t: pq.write_table(table, t, **kwargs))


def replace_folder(dst: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder with ``fill(tmp)`` beside ``dst``, then swap it in.

    The old ``dst`` is renamed aside and removed only after the new one is in place, so at every
    moment either the old or the new complete folder exists at ``dst`` (but for the instant
    between two renames).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(dst)
    try:
        fill(tmp)
        old = None
        if dst.exists():
            old = _tmp_beside(dst).with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(dst, old)
        os.replace(tmp, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when ``a`` and ``b`` name the same file (resolving links and relative paths)."""
    a, b = Path(a), Path(b)
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()

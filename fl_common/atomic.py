"""One way to write a file that must never be seen, or left, half written."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def safe_name(text: str) -> str:
    """``text`` usable inside a file name: anything but letters, digits and ``._=+-``
    becomes ``_`` (run tags key the clients' state files)."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(handle)`` into a temporary file in the same folder,
    flush and fsync it, rename it over ``path`` and fsync the folder: a reader, or a
    process killed at any moment, finds the previous file or the new one, never a mix.
    A write that fails removes its temporary file (a killed one leaves a ``*.tmp``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)

"""Atomic file writes: a reader sees the old file or the complete new one, never a partial write."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

__all__ = ['atomic_path', 'write_bytes_atomic', 'write_json_atomic', 'write_text_atomic']


class atomic_path:
    """Context manager giving a temporary path beside ``path``; renamed onto ``path`` on success.

    A reader never sees a half-written file: either the old one or the complete new one.

    Args:
        path: the final file path.

    Examples:
        >>> with atomic_path('out/curves.png') as tmp:
        ...     figure.savefig(tmp, format='png')
    """

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> str:
        folder, name = os.path.split(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=folder)
        os.close(fd)
        # mkstemp makes the file private (0600); give it the permissions open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename.

    Args:
        path: destination file.
        text: its new content.
    """
    with atomic_path(path) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    Args:
        path: destination file (its folder is created when missing).
        data: its new content.
    """
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            f.write(data)


def write_json_atomic(path: str, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON (sorted keys, a final newline) to ``path`` through a temporary file and a rename.

    Args:
        path: destination file.
        obj: anything :func:`json.dumps` takes.
        indent: JSON indentation.
    """
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True) + '\n')

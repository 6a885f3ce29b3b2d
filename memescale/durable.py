"""Durable file changes on a local disk: fsync a file's contents, fsync a directory's names.

A write is durable once the file is fsync'd and, for a created, renamed or removed name, its
directory too; every "write temp, rename into place" commit in memescale does both.
"""

from __future__ import annotations

import os

__all__ = ["fsync_dir", "fsync_file", "fsync_tree"]


def fsync_file(path: str | os.PathLike) -> None:
    """fsync the file at `path` (its data and size reach the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so that the names created, renamed or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file directly in the folder `path`, then the folder (a written index)."""
    with os.scandir(os.fspath(path)) as entries:
        for e in entries:
            if e.is_file(follow_symlinks=False):
                fsync_file(e.path)
    fsync_dir(path)

"""Files that someone else may have prepared: read only when regular and not too large, written atomically and never
through a link (no torch import).

Run directories, checkpoints, zoo folders and state files get copied and shared, so any name in them may be a
symlink to a file of the user's, a FIFO or a device. Reads go through `read_regular` (a FIFO neither hangs nor a
device fills memory); writes through `write_atomic`, whose temporary file is a fresh, unique, exclusive name in the
target's own folder (a planted link at that name is never opened).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from sglr_zoo.errors import UserError

MiB, GiB = 1 << 20, 1 << 30
TEXT_LIMIT = 16 * MiB  # a recipe, JSON state, CSV, card or config: far above any we write


class WriteFailed(UserError):
    """A file could not be written; the message names it, and says so when the disk is full."""

    def __init__(self, path: Path, error: OSError):
        reasons = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                   errno.ELOOP: "it is a symbolic link, which is never written through"}
        reason = reasons.get(error.errno, error.strerror or str(error))
        super().__init__(f"could not write {path}: {reason}")
        self.path = path


def open_regular(path: str | Path, limit: int, what: str = "file") -> int:
    """An open, blocking file descriptor of `path` when it is a regular file of at most `limit` bytes; raises
    UserError naming the file otherwise (FileNotFoundError stays as it is, for callers that treat absence).

    Opened non-blocking first, so that a FIFO is refused instead of waiting for a writer.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{path}: not a regular file ({_kind(info.st_mode)}); a {what} must be a plain file")
        if info.st_size > limit:
            raise UserError(f"{path}: {info.st_size:,} bytes, more than a {what} can be ({limit:,}); is it the "
                            "right file?")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | Path, limit: int = TEXT_LIMIT, what: str = "file") -> bytes:
    """The bytes of `path` when it is a regular file of at most `limit` bytes (it may not grow past it while read);
    UserError naming the file otherwise, FileNotFoundError when it is absent, OSError when it cannot be read."""
    with os.fdopen(open_regular(path, limit, what), "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{path}: grew past {limit:,} bytes while it was read; a {what} cannot be that large")
    return data


def check_regular(path: str | Path, limit: int, what: str = "file") -> None:
    """`open_regular`'s checks alone, for a file that another library opens by name."""
    os.close(open_regular(path, limit, what))


def _kind(mode: int) -> str:
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
    return next((name for test, name in kinds.items() if test(mode)), "not a file")


def refuse_link(path: Path) -> None:
    """Raises UserError when `path` is a symbolic link: folders we write into (checkpoints/, best/, last/) must be
    the run's own, or a prepared link would send our writes and deletions elsewhere."""
    if path.is_symlink():
        raise UserError(f"{path} is a symbolic link (to {os.readlink(path)}); a run writes only into its own "
                        "folders. Replace the link by a folder, or copy the run")


def fsync_dir(folder: Path) -> None:
    """Makes the entries of `folder` durable: a rename is only kept over a crash once its directory is synced."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):  # some network filesystems cannot sync a directory
            raise
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Writes `data` to a fresh temporary name beside `path`, fsyncs it, renames it to `path` and fsyncs the folder:
    a crash leaves the old file or the new one, never part of one. The temporary name is unique and created
    exclusively (O_EXCL refuses any existing name, a link included), so concurrent writers never share it and a
    planted link is never written through; the rename replaces a link at `path` itself, never its target.
    Raises WriteFailed naming `path`."""
    partial, created = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial"), False
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        created = True
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, path)
        fsync_dir(path.parent)
    except OSError as error:
        if created:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
        raise WriteFailed(path, error) from error

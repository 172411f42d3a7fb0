"""Files tunectl writes and reads where others can reach: never through a link, moved into place whole.

Every file tunectl writes goes through here: content goes to a new temp file beside the target, created with
O_EXCL|O_NOFOLLOW under an unpredictable name, and os.replace puts it in place. Whatever was at the target's name,
a symlink included, is replaced as a directory entry: a link's target is never written, and a reader never sees
half a file. Reads of files a user's directory may hold (a pull destination) do not follow links either.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import EnvironmentProblem

_CHUNK = 1 << 20
# Opening never follows a link in the last component, and never blocks on a FIFO planted under a file's name.
_SAFE_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _named(e: OSError, path: Path) -> OSError:
    """Errors from write/fsync carry no path; the one-line error should say which file (see cli.py)."""
    if e.filename is None:
        e.filename = str(path)
    return e


def _temp_beside(target: Path) -> tuple[int, Path]:
    for _ in range(16):
        tmp = target.with_name(f".{target.name[:200]}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _SAFE_OPEN, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target))


def _into_place(target: Path, fill: Callable[[int], None], durable: bool) -> None:
    """A temp file beside `target`, filled by `fill(fd)`, then renamed over `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(target)
    try:
        try:
            fill(fd)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            _named(e, target)
        raise


def write_atomic(target: Path, data: bytes | str, durable: bool = True) -> None:
    """Replace `target` with `data`; `durable` fsyncs first (records that later steps rely on)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    _into_place(target, lambda fd: _write_all(fd, raw), durable)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def copy_atomic(src: Path, target: Path, link: bool = False) -> None:
    """Replace `target` with a copy of `src`, or with a hard link to it where `link` and the file system allow.
    No fsync: pulled and published files are verified against their sha256 whenever they are used again."""
    if link:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name[:200]}.{secrets.token_hex(6)}.tmp")
        try:
            os.link(src, tmp)  # the new name is never followed; EEXIST if it exists
        except OSError:
            pass  # another file system, or links not allowed: copy below
        else:
            try:
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return

    def fill(fd: int) -> None:
        with open(src, "rb") as f:
            size, offset = os.fstat(f.fileno()).st_size, 0
            try:
                while offset < size and (n := os.sendfile(fd, f.fileno(), offset, min(size - offset, 1 << 30))):
                    offset += n
                return
            except OSError as e:
                if offset or e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
            while chunk := f.read(_CHUNK):  # no sendfile between these two files
                _write_all(fd, chunk)

    _into_place(target, fill, durable=False)


def open_regular(path: Path, mode: str = "rb", follow: bool = False) -> IO[bytes] | None:
    """`path` opened if it is a regular file, without following a link unless `follow`; None where there is
    none (or a link, a FIFO, a directory: nothing tunectl wrote)."""
    flags = {"rb": os.O_RDONLY, "r+b": os.O_RDWR}[mode] | _SAFE_OPEN
    if follow:
        flags &= ~os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR):
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode)


def create_fresh(path: Path) -> IO[bytes]:
    """A new empty file at `path` for reading and writing; what was there (a link, a stale file) is removed
    first, never opened."""
    try:
        path.unlink()  # a symlink is removed itself
    except FileNotFoundError:
        pass
    return os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _SAFE_OPEN, 0o666), "r+b")


def refuse_linked_dirs(base: Path, rel: str) -> None:
    """Refuse a symlinked directory between `base` and the file `rel` under it: files written there would land
    (and replace their namesakes) wherever the link points. `base` itself may be a link: the user named it."""
    p = base
    for part in Path(rel).parts[:-1]:
        p = p / part
        if p.is_symlink():
            raise EnvironmentProblem(
                f"{p} is a symbolic link: tunectl writes only into real directories under {base}; remove it"
            )


def read_regular(path: Path) -> bytes | None:
    """The content of the regular file at `path`, not following a link (None: no such regular file)."""
    f = open_regular(path)
    if f is None:
        return None
    with f:
        return f.read()

"""Reading JSON that anyone may have written (a run folder's files, an uploaded file's metadata)
so that no content stops the reader: bounded in size and in nesting depth, any encoding error or
non-object a plain "unreadable". Writing whole-or-nothing, so a full disk leaves the previous
file or none, never half of one.

The standard library's parser is used; only the bounds are added here (json has none: a line of
100,000 brackets raises RecursionError, and a file of gigabytes is read whole).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

MAX_DEPTH = 32  # what the studio writes nests 4 deep at most (an info event's recipe)
MAX_FILE_BYTES = 1 << 20  # job.json, config.json, process.json: a few kB when the studio writes them


class Unreadable(ValueError):
    """Content that is not a bounded JSON value; the message says which bound it broke."""


def depth(value) -> int:
    """Nesting depth of a parsed value (a scalar is 0), walked without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            level += 1
            deepest = max(deepest, level)
            if level > MAX_DEPTH:
                return level
            stack.extend((v, level) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def loads(data: bytes | str, *, max_bytes: int = MAX_FILE_BYTES, max_depth: int = MAX_DEPTH):
    """The JSON value of `data`, or Unreadable: over `max_bytes`, not UTF-8, not JSON, nested
    deeper than `max_depth`."""
    if len(data) > max_bytes:
        raise Unreadable(f"{len(data):,} bytes, more than the {max_bytes:,} allowed")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text)
    except UnicodeDecodeError:
        raise Unreadable("not UTF-8 text") from None
    except RecursionError:
        raise Unreadable("nested too deeply") from None
    except ValueError as exc:
        raise Unreadable(f"not JSON ({exc})") from None
    if depth(value) > max_depth:
        raise Unreadable(f"nested more than {max_depth} levels deep")
    return value


def read_bytes(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """At most max_bytes + 1 bytes of the file (so an oversized one is seen, not read whole)."""
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def read_object(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> dict:
    """The file's JSON object; Unreadable for anything else, FileNotFoundError when it is missing."""
    value = loads(read_bytes(path, max_bytes), max_bytes=max_bytes)
    if not isinstance(value, dict):
        raise Unreadable(f"a JSON {type(value).__name__}, not an object")
    return value


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` under a temporary name and rename it into place: a reader (or a full disk)
    sees the old file or the new one, and a failed write leaves no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line whole or not at all: a write cut short by a full disk is truncated away,
    so the next append does not glue itself onto half a line."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)  # raises when nothing was written; returns short when the disk filled midway
        if written != len(data):
            try:  # O_APPEND put the partial line at the end: cut it off again
                os.ftruncate(fd, os.fstat(fd).st_size - written)
            except OSError:
                pass
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a line of {path} was cut short and removed)")
    finally:
        os.close(fd)

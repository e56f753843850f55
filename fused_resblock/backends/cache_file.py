"""The JSON files that remember measurements between processes (tile configs, backend choices).

Each file is ``{"format": ..., "version": ..., "entries": {key: value}}`` in
one directory: ``$FUSED_RESBLOCK_CACHE_DIR``, else
``${XDG_CACHE_HOME:-~/.cache}/fused_resblock``. Writes are atomic (temporary
file + ``os.replace``); a missing file reads as empty, an unreadable or
foreign one as empty with one warning (and is rewritten on the next save).
Adding an entry reads, merges and writes under an exclusive lock on the
directory, so processes tuning at once (one per GPU) keep each other's entries.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import warnings
from pathlib import Path
from typing import Any, Callable, Dict

from .._warnings import warn_once

AUTOTUNE_ENV = "FUSED_RESBLOCK_AUTOTUNE"
_OFF = ("0", "false", "off", "no")


def measurements_enabled() -> bool:
    """FUSED_RESBLOCK_AUTOTUNE: 0/false/off/no (any case, spaces ignored) turn tile tuning and auto's
    backend measurement off; anything else, or unset, leaves them on."""
    return os.environ.get(AUTOTUNE_ENV, "").strip().lower() not in _OFF


def cache_dir() -> Path:
    """The directory of every cache file (see the module docstring)."""
    root = os.environ.get("FUSED_RESBLOCK_CACHE_DIR")
    if root:
        return Path(root).expanduser()  # "~/x" from a config file, where no shell expanded it
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "fused_resblock"


def read_entries(path: Path, fmt: str, version: int, parse: Callable[[Any], Any],
                 warn: bool = True, what: str = "cache") -> Dict[str, Any]:
    """{key: parse(value)} from the file; {} when it is missing, and (with a warning naming ``what``)
    when unusable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        if warn:
            warnings.warn(f"fused_resblock: cannot read {what} {path} ({e}); ignoring it")
        return {}
    try:
        data = json.loads(raw.decode("utf-8"))  # a UnicodeDecodeError is a ValueError
        if not isinstance(data, dict) or data.get("format") != fmt or data.get("version") != version:
            raise ValueError(f"not a {fmt} v{version} file")
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise ValueError("'entries' is not an object")
        return {str(k): parse(v) for k, v in entries.items()}
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: JSON nested too deep
        if warn:
            warnings.warn(f"fused_resblock: ignoring {what} {path}: {type(e).__name__}: {str(e)[:200]}")
        return {}


def describe(path: Path, fmt: str, version: int, parse: Callable[[Any], Any]) -> str:
    """One line for ``doctor``: what the file holds, or why it is ignored, and whether it can be written."""
    if path.is_dir():
        state = "a directory, not a file: measurements are not kept"
    elif not path.exists():
        state = "not written yet"
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            entries = read_entries(path, fmt, version, parse)
        state = (f"unusable, ignored (rewritten on the next save): {caught[0].message}" if caught
                 else f"{len(entries)} entries")
    directory = path.parent
    probe = directory if directory.exists() else next((p for p in directory.parents if p.exists()), directory)
    if not os.access(probe, os.W_OK):
        state += f"; {probe} is not writable: new measurements are not kept"
    return state


def _create_temp(directory: Path, stem: str):
    """(fd, path) of a new file beside the cache, with the umask's permissions (tempfile.mkstemp's
    0600 would lock other users of a shared cache directory out of the file it replaces)."""
    while True:
        tmp = directory / f".{stem}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue


def write_entries(path: Path, fmt: str, version: int, entries: Dict[str, Any]) -> None:
    """Write ``entries`` (JSON values) atomically: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": fmt, "version": version, "entries": dict(sorted(entries.items()))}
    fd, tmp = _create_temp(path.parent, path.stem)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@contextlib.contextmanager
def _directory_locked(directory: Path):
    """An exclusive flock on the directory itself (no lock file beside the caches); a no-op
    where flock is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX: unlocked, as before
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(directory), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def merge_entry(path: Path, fmt: str, version: int, key: str, value: Any,
                validate: Callable[[Any], Any], what: str = "cache") -> None:
    """Add one entry to what is on disk now (other processes may have added theirs); warn if unwritable.

    ``validate`` raises on a bad value: a file holding one is replaced, not kept.
    """
    try:
        with _directory_locked(path.parent):
            entries = read_entries(path, fmt, version, lambda v: (validate(v), v)[1], warn=False)
            entries[key] = value
            write_entries(path, fmt, version, entries)
    except OSError as e:  # once per file and reason, not per new shape (the message names no temp file)
        reason = e.strerror or type(e).__name__
        warn_once(("cache write", str(path), reason),
                  f"fused_resblock: cannot write {what} {path} ({reason}); measurements are kept in this "
                  "process only", stacklevel=2)

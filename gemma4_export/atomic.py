"""Atomic outputs: an artifact is written under a temporary name beside its final one and renamed at the end, so an
interrupted, failed or out-of-space export never leaves a half-written file under the final name."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import Gemma4ExportError


class OutputError(Gemma4ExportError):
    pass


class Staging:
    """Temporary paths in the output directory; every one is removed at the end unless it was published. What an
    earlier process killed outright left beside the same final name is cleared first (clear_stale)."""

    def __init__(self, final: Path):
        self.final = final
        self.paths: list[Path] = []
        clear_stale(final)
        self.path = self.temp("partial")

    def temp(self, tag: str) -> Path:
        p = self.final.parent / f".{self.final.name}.{os.getpid()}.{tag}"
        self.paths.append(p)
        return p


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, or no way to ask: assume it runs, and leave its files alone
        return True
    return True


def clear_stale(final: Path) -> list[Path]:
    """Removes the staging paths (`.NAME.PID.TAG`) beside `final` whose process no longer runs: what an export killed
    outright (SIGKILL, the machine going down) left behind, since Ctrl-C, SIGTERM and errors clear their own. An
    artifact that atomic_dir had moved aside (`old`) while nothing is under the final name is put back instead: the
    process died between its two renames. Returns the paths it removed or put back."""
    prefix = f".{final.name}."
    done: list[Path] = []
    try:
        entries = sorted(final.parent.iterdir())
    except OSError:
        return done
    for p in entries:
        pid, _, tag = p.name[len(prefix):].partition(".")
        if not p.name.startswith(prefix) or not pid.isdigit() or tag not in ("partial", "old"):
            continue
        if int(pid) == os.getpid() or _running(int(pid)):
            continue
        try:
            if tag == "old" and not final.exists():
                p.rename(final)
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            continue
        done.append(p)
    return done


def free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def prepare_output(final: str | Path, force: bool, need_bytes: int) -> Path:
    """The output directory exists, the final name is free (or --force), and the disk has room."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not force:
        raise OutputError(f"{final} exists; pass --force to replace it")
    have = free_bytes(final.parent)
    if need_bytes and have < need_bytes:
        raise OutputError(f"not enough disk space in {final.parent}: the export needs about "
                          f"{need_bytes / 1e9:.2f} GB, {have / 1e9:.2f} GB are free")
    return final


@contextmanager
def atomic_file(final: str | Path, force: bool = False, need_bytes: int = 0) -> Iterator[Staging]:
    """Yields a Staging whose `.path` the caller writes; on success it is fsynced and renamed to `final`."""
    final = prepare_output(final, force, need_bytes)
    st = Staging(final)
    try:
        with _disk_full_is_an_error(final):
            yield st
            with open(st.path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(st.path, final)
            _fsync_dir(final.parent)
    finally:
        for p in st.paths:
            if p.exists():
                p.unlink()


@contextmanager
def _disk_full_is_an_error(final: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputError(f"disk full while writing {final.name}; nothing was written under {final}") from None
        raise


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: str | Path, force: bool = False, need_bytes: int = 0) -> Iterator[Staging]:
    """Yields a Staging whose `.path` is a hidden temporary directory beside `final`; on success it replaces `final`
    (kept until then: an existing artifact is only removed once the new one is complete)."""
    final = prepare_output(final, force, need_bytes)
    st = Staging(final)
    tmp, old = st.path, st.temp("old")
    try:
        with _disk_full_is_an_error(final):
            tmp.mkdir()
            yield st
            for f in sorted(tmp.rglob("*")):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
                _fsync_dir(d)
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            _fsync_dir(final.parent)
    finally:
        for p in st.paths:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def write_text(path: str | Path, text: str) -> None:
    """A small text file, atomically: a temporary file beside it, fsynced, renamed over it."""
    with atomic_file(path, force=True) as st:
        st.path.write_text(text, encoding="utf-8")

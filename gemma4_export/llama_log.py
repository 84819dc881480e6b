"""llama.cpp's log, captured: it logs every tensor it touches, so gemma4-export keeps the last lines in memory and
shows them only when something fails (or always, with GEMMA4_EXPORT_VERBOSE=1)."""

from __future__ import annotations

import ctypes
import os
import sys
from collections import deque

_lines: deque[str] = deque(maxlen=200)
_callback = None  # the ctypes callback must stay referenced for as long as llama.cpp may call it


def capture() -> None:
    global _callback
    import llama_cpp

    if _callback is not None:
        return
    verbose = bool(os.environ.get("GEMMA4_EXPORT_VERBOSE"))

    @llama_cpp.llama_log_callback
    def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        s = text.decode("utf-8", errors="replace")
        _lines.append(s)
        if verbose:
            sys.stderr.write(s)

    _callback = _log
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def capture_mtmd() -> None:
    """The same capture for llama.cpp's multimodal library, which has a log of its own (and its helpers another)."""
    capture()
    from llama_cpp import mtmd_cpp

    mtmd_cpp.mtmd_log_set(_callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_callback, ctypes.c_void_p(0))


def recent(n: int = 40) -> str:
    return "".join(list(_lines)[-n:])


def clear() -> None:
    _lines.clear()

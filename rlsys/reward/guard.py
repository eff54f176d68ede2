"""A second line of defence while a worker checks untrusted text: no processes, sockets or writes.

The checker never evaluates answer text as Python (the LaTeX only reaches the ANTLR parser), but
it runs on large libraries that could grow such a path in a later version. While
``no_side_effects()`` is active, a Python audit hook refuses with ``PermissionError`` what a
payload would need to do harm outside the worker: starting processes, opening sockets, and
opening files for writing, removing or renaming them. Reading stays allowed, so lazy imports
still work; a ``.pyc`` that an import cannot write is skipped by importlib, which expects an
``OSError`` there. Compiling source is not refused: ``dataclass`` and ``namedtuple`` compile
strings, and a module that sympy imports lazily in the middle of a check may use them.

This is not a sandbox: code already running can bypass audit hooks. It turns the side effect
of an unexpected evaluation into a failed check (scored wrong). The hook is installed once per
process and does nothing outside the block, so extra reward terms, which are trusted code named
in the config, are not restricted.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_REFUSED_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen", "pty.spawn",
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "os.remove", "os.rename", "os.rmdir",
    "os.mkdir", "os.symlink", "os.link", "os.truncate", "os.chmod", "os.chown", "os.kill", "os.killpg",
    "shutil.rmtree", "shutil.copyfile", "shutil.move", "webbrowser.open",
})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_active = False
_installed = False


def _audit(event: str, args: tuple) -> None:
    if not _active:
        return
    if event in _REFUSED_EVENTS:
        raise PermissionError(f"{event} refused while checking an answer")
    if event == "open":
        _, mode, flags = args
        if (isinstance(mode, str) and any(char in mode for char in "wax+")) or (isinstance(flags, int) and flags & _WRITE_FLAGS):
            raise PermissionError("opening a file for writing refused while checking an answer")


@contextmanager
def no_side_effects() -> Iterator[None]:
    """Refuse new processes, sockets and file writes inside the block."""
    global _active, _installed
    if not _installed:
        sys.addaudithook(_audit)
        _installed = True
    previous, _active = _active, True
    try:
        yield
    finally:
        _active = previous

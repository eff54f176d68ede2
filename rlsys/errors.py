"""One line for an error that crossed processes, for messages that name what failed.

Ray re-raises a worker's exception in the caller as a task error whose ``cause`` is the original
(itself a task error when it crossed two processes); its text is the remote traceback. The line
is the innermost cause's first line, prefixed with its type unless it is rlsys's own (whose
messages start with what failed). Duck-typed, so that code without Ray can use it."""

from __future__ import annotations


def innermost_cause(error: BaseException) -> BaseException:
    seen = {id(error)}
    while isinstance(cause := getattr(error, "cause", None), BaseException) and id(cause) not in seen:
        seen.add(id(cause))
        error = cause
    return error


def one_line(error: BaseException) -> str:
    error = innermost_cause(error)
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if type(error).__module__.startswith("rlsys"):
        return first
    return f"{type(error).__name__}: {first}".rstrip(": ")

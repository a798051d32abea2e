"""Signals as exceptions. SIGTERM (what kill, timeout and job schedulers send), SIGHUP and
Ctrl-C raise ``Interrupted`` where the program is, so the same clean-up runs for all three.

An exception raised inside a finalizer (a ``__del__`` the garbage collector happened to run) is
printed as "Exception ignored" and lost, and the program goes on: the signal is therefore also
recorded, and ``checkpoint()``, called between stages and between the items of a long loop,
raises it again."""
from __future__ import annotations

import signal
import sys
from contextlib import contextmanager

_received: list[int] = []


class Interrupted(KeyboardInterrupt):
    """A signal that ends the run; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_holding: list[bool] = []


def _raise(signum, frame):
    _received.append(signum)
    if not _holding:
        raise Interrupted(signum)


def _quiet_when_interrupted(unraisable, default=sys.unraisablehook):
    """A swallowed ``Interrupted`` is not a fault to print (``checkpoint`` raises it again)."""
    if not isinstance(unraisable.exc_value, Interrupted):
        default(unraisable)


def catch_signals() -> None:
    """From now on SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` (the console script calls this)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise)
    sys.unraisablehook = _quiet_when_interrupted


def signal_behind(exc: BaseException) -> int | None:
    """The signal that caused ``exc``, if one did: an ``Interrupted`` in its chain of causes (Python
    wraps one raised where it cannot pass, e.g. in a class body's ``__set_name__`` while torch is
    importing, as a RuntimeError), or a signal received earlier; None otherwise."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Interrupted):
            return exc.signum
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return _received[0] if _received else None


def forget_signals() -> None:
    """Forget the signals received so far (a process that handled one and goes on)."""
    _received.clear()


def checkpoint() -> None:
    """Raise a signal received earlier whose exception was swallowed; nothing otherwise."""
    if _received:
        raise Interrupted(_received[0])


@contextmanager
def signals_held():
    """A signal received inside is recorded, and raised when the block ends. For torch's import:
    its C++ initialisation calls back into Python, and an exception raised there cannot pass through
    the C++ frames: the process aborts (SIGABRT, "terminate called after throwing ...") instead."""
    _holding.append(True)
    try:
        yield
    finally:
        _holding.pop()
    checkpoint()

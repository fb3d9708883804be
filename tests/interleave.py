"""Deterministic interleavings: stop one thread at a chosen call, let
another run, then let the first go on.

    with Pause(dd.timeline, "get", thread="reader") as p:   # after the real call returns
        reader.start()
        p.reached()              # the reader has read, and not yet used what it read
        writer.start(); ...      # the change that races it
    # leaving the block releases the paused thread and puts the method back

A `Pause` replaces one attribute of one object (an instance or a module)
for the block. It stops the first call that matches (made by the named
thread, and accepted by `when`), before or after the real call; every
other call goes straight through, so the thread that races it is never
stopped by it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Pause:
    def __init__(self, obj: Any, attr: str, *, thread: str | None = None,
                 when: Callable[..., bool] | None = None, before: bool = False, timeout: float = 30.0) -> None:
        self.obj, self.attr = obj, attr
        self.thread, self.when, self.before, self.timeout = thread, when, before, timeout
        self._reached = threading.Event()
        self._go = threading.Event()
        self._taken = False
        self._mu = threading.Lock()
        self._had_own = attr in getattr(obj, "__dict__", {})
        self._real = getattr(obj, attr)
        self.result: Any = None

    def _mine(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if self.thread is not None and threading.current_thread().name != self.thread:
            return False
        if self.when is not None and not self.when(*args, **kwargs):
            return False
        with self._mu:
            if self._taken:
                return False
            self._taken = True
            return True

    def __enter__(self) -> Pause:
        real = self._real

        def paused(*args: Any, **kwargs: Any) -> Any:
            if not self._mine(args, kwargs):
                return real(*args, **kwargs)
            if self.before:
                self._stop()
                return real(*args, **kwargs)
            out = real(*args, **kwargs)
            self.result = out
            self._stop()
            return out

        setattr(self.obj, self.attr, paused)
        return self

    def _stop(self) -> None:
        self._reached.set()
        if not self._go.wait(self.timeout):
            raise AssertionError(f"{self.attr} was paused for {self.timeout} s and never released")

    def reached(self, timeout: float = 30.0) -> None:
        """Wait until the chosen call is paused."""
        assert self._reached.wait(timeout), f"no matching call of {self.attr} within {timeout} s"

    def release(self) -> None:
        self._go.set()

    def __exit__(self, *exc: object) -> None:
        self.release()
        if self._had_own:
            setattr(self.obj, self.attr, self._real)
        else:
            delattr(self.obj, self.attr)


def run(target: Callable[[], Any], name: str) -> tuple[threading.Thread, dict[str, Any]]:
    """Start `target` in a thread named `name`; the dict gets its
    "result" or its "error" when it ends."""
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["result"] = target()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    return t, out


def finished(t: threading.Thread, within: float) -> bool:
    t.join(within)
    return not t.is_alive()

"""A blocking face for :func:`~secure_ci.device.open_device`, for code without an event loop.

::

    with open_device_sync(edges, package=package, identity=identity, policy=policy,
                          collateral=collateral) as device:
        y = device.infer(x)
        ys = device.infer_many(frames)

The fleet device lives on an event loop in a background thread; each call waits for its
coroutine there. Exceptions arrive as the library raises them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

from secure_ci.device._fleet import Device
from secure_ci.device._open import open_device
from secure_ci.device._outcome import TaskOutcome
from secure_ci.device._session import Input, Output

__all__ = ["SyncDevice", "open_device_sync"]

T = TypeVar("T")


class SyncDevice:
    """The blocking methods of a :class:`~secure_ci.device.Device`."""

    def __init__(self, device: Device, loop: asyncio.AbstractEventLoop) -> None:
        self.device = device
        self._loop = loop

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def infer(self, x: Input, *, deadline_ms: float | None = None) -> Output:
        return self._call(self.device.infer(x, deadline_ms=deadline_ms))

    def run(self, x: Input, *, deadline_ms: float | None = None) -> TaskOutcome:
        return self._call(self.device.run(x, deadline_ms=deadline_ms))

    def infer_many(self, xs: Iterable[Input], *, max_in_flight: int = 8) -> list[Output]:
        return self._call(self.device.infer_many(list(xs), max_in_flight=max_in_flight))

    def resume(self) -> list[TaskOutcome]:
        return self._call(self.device.resume())

    def wait_ready(self, timeout: float = 30.0) -> None:
        self._call(self.device.wait_ready(timeout))


@contextlib.contextmanager
def open_device_sync(*args: Any, **kwargs: Any) -> Iterator[SyncDevice]:
    """:func:`~secure_ci.device.open_device` (same arguments) on a background loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="secure-ci-device", daemon=True)
    thread.start()
    opened: Future[SyncDevice] = Future()
    release = asyncio.Event()  # bound to ``loop`` when first awaited there (Python >= 3.10)

    async def hold() -> None:
        try:
            async with open_device(*args, **kwargs) as device:
                opened.set_result(SyncDevice(device, loop))
                await release.wait()
        except BaseException as exc:
            if not opened.done():
                opened.set_exception(exc)
            else:
                raise

    held = asyncio.run_coroutine_threadsafe(hold(), loop)
    try:
        yield opened.result()
    finally:
        loop.call_soon_threadsafe(release.set)
        with contextlib.suppress(Exception):
            held.result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

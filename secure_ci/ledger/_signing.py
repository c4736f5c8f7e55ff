"""SigningPool: the enclave key signs record digests in worker processes, off the hot loop.

An edge signs every result (libsecp256k1, ~31 us each: a third of its per-record budget).
coincurve's cffi calls do release the GIL, yet a signing *thread* gains little beside a busy
event loop: after each call it waits up to the switch interval (5 ms) for the GIL, so it
signs about one digest per 5 ms while the loop runs Python (measured: 75 signatures in 0.4 s,
1 % of a core). A worker process signs a whole group per round trip instead (32-byte digests
out, 65-byte signatures back, raw bytes on a pipe) on the other core. Ledger benchmark,
20,000 records, same run, signing inline / in a thread / in a process: in-process chain
12.4-12.5k / 13.1-13.6k / 17.9-18.2k records/s, anvil 13.6-13.7k / 13.4-13.6k / 21.6-21.7k.
``workers=0`` signs inline in the caller, through the same interface.

A worker is ``python -c`` importing this module (not ``multiprocessing``, which would re-run
the caller's ``__main__``); it reads the key once from its stdin, then answers requests in
order until stdin closes. Frames: request ``count:u32 || digests``, reply ``signatures ||
cpu_seconds:f64``, so the CPU the worker spent can be charged to the records. A call blocks
while the worker's input pipe is full (64 KiB on Linux: ~2,000 queued digests).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import BinaryIO

from secure_ci.exceptions import LedgerError, RecordError
from secure_ci.ledger._records import Signer

__all__ = ["MAX_DIGESTS", "MAX_WORKERS", "SigningPool"]

MAX_DIGESTS = 1 << 16
"""Most digests one call may carry (bounds one frame to or from a worker)."""
MAX_WORKERS = 16
_COUNT = struct.Struct(">I")
_CPU = struct.Struct(">d")
_SIG = 65
_ROOT = str(Path(__file__).resolve().parents[2])  # holds the secure_ci package
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); from secure_ci.ledger._signing import serve; "
    "serve(sys.stdin.buffer, sys.stdout.buffer)"
)


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    """``n`` bytes, or None at a clean end of stream before the first byte."""
    data = stream.read(n)
    if not data and n:
        return None
    if len(data) != n:
        raise LedgerError("signing worker: truncated frame")
    return data


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """The worker loop: key, then requests answered in order until stdin ends."""
    key = _read_exact(stdin, 32)
    if key is None:
        return
    signer = Signer(key)
    while (head := _read_exact(stdin, _COUNT.size)) is not None:
        (count,) = _COUNT.unpack(head)
        if count > MAX_DIGESTS:
            raise LedgerError("signing worker: oversized request")
        digests = _read_exact(stdin, 32 * count) or b""
        start = time.process_time()
        out = b"".join(signer.sign(digests[i : i + 32]) for i in range(0, len(digests), 32))
        stdout.write(out + _CPU.pack(time.process_time() - start))
        stdout.flush()


def _checked(digests: Sequence[bytes]) -> bytes:
    if len(digests) > MAX_DIGESTS:
        raise RecordError(f"{len(digests)} digests in one call, at most {MAX_DIGESTS}")
    for d in digests:
        if not isinstance(d, bytes) or len(d) != 32:
            raise RecordError("a digest to sign must be 32 bytes")
    return b"".join(digests)


class _Worker:
    """One signing process, its in-order queue of calls and the thread reading its replies."""

    def __init__(self, key: bytes, pool: SigningPool, index: int) -> None:
        self._pool = pool
        self._calls: deque[tuple[int, Future[list[bytes]]]] = deque()
        # _ready guards the queue only and is never held while blocking on a pipe: a writer
        # blocked on a full stdin must not keep the reader from draining stdout (deadlock)
        self._ready = threading.Condition()
        self._write_order = threading.Lock()  # frames are written in queue order
        self._closing = False
        try:
            self.process = subprocess.Popen(  # noqa: S603  (our interpreter, fixed argv)
                [sys.executable, "-c", _BOOT, _ROOT],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        except (OSError, ValueError) as exc:
            raise LedgerError(f"cannot start a signing worker: {exc}") from exc
        self._stdin: BinaryIO = self.process.stdin  # type: ignore[assignment]
        self._stdout: BinaryIO = self.process.stdout  # type: ignore[assignment]
        self._reader = threading.Thread(
            target=self._read_replies, name=f"secure-ci-signing-{index}", daemon=True
        )
        self._reader.start()
        try:
            self._write(key)
        except LedgerError:
            self.close(grace=1.0)
            raise

    def _write(self, data: bytes) -> None:
        try:
            self._stdin.write(data)
            self._stdin.flush()
        except (OSError, ValueError) as exc:
            raise LedgerError(f"signing worker is gone: {exc}") from exc

    def send(self, count: int, digests: bytes, out: Future[list[bytes]]) -> None:
        call = (count, out)
        with self._write_order:  # frames and their futures stay in the same order
            with self._ready:
                if self._closing:
                    raise LedgerError("the signing worker is closed or gone")
                self._calls.append(call)
                self._ready.notify()
            try:
                self._write(_COUNT.pack(count) + digests)
            except LedgerError:
                with self._ready:
                    queued = call in self._calls
                    if queued:
                        self._calls.remove(call)
                if queued:
                    raise
                # else the reader found the worker gone and already failed this call

    def _read_replies(self) -> None:
        error = LedgerError("signing worker exited")
        try:
            while True:
                with self._ready:
                    while not self._calls and not self._closing:
                        self._ready.wait()
                    if not self._calls:
                        return
                    count, out = self._calls[0]
                reply = _read_exact(self._stdout, count * _SIG + _CPU.size)
                if reply is None:
                    break
                with self._ready:
                    self._calls.popleft()
                signatures = [reply[i : i + _SIG] for i in range(0, count * _SIG, _SIG)]
                self._pool._done(out, signatures, _CPU.unpack(reply[-_CPU.size :])[0])
        except (OSError, ValueError, LedgerError) as exc:
            error = LedgerError(f"signing worker failed: {exc}")
        with self._ready:
            self._closing = True  # refuse new calls: nobody would answer them
            calls, self._calls = list(self._calls), deque()
        for _, out in calls:
            self._pool._done(out, error, 0.0)

    def close(self, grace: float) -> None:
        with self._ready:
            self._closing = True
            self._ready.notify()
        if not self._write_order.acquire(timeout=grace):  # a writer blocked on a hung worker
            self.process.kill()
            self._write_order.acquire()
        try:
            if not self._stdin.closed:
                with contextlib.suppress(OSError):
                    self._stdin.close()  # the worker answers what it has read, then exits
        finally:
            self._write_order.release()
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:  # a hung worker: its pending calls fail
            self.process.kill()
            self.process.wait(timeout=10)
        self._reader.join()
        self._stdout.close()


class SigningPool:
    """Sign 32-byte digests with one secp256k1 key in ``workers`` processes (0: inline).

    Signatures are ``r || s || v`` exactly as :meth:`Signer.sign` makes them. Calls go to the
    workers in turn and may complete out of order across workers; the caller bounds how many
    it keeps in flight. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, key: bytes, *, workers: int = 1) -> None:
        if not 0 <= workers <= MAX_WORKERS:
            raise LedgerError(f"a signing pool has 0 to {MAX_WORKERS} workers")
        self._signer = Signer(key)  # validates the key here, in the caller
        self.address = self._signer.address
        self.workers = workers
        self._lock = threading.Lock()
        self._cpu = 0.0
        self._pending = 0
        self._closed = False
        self._workers: list[_Worker] = []
        try:
            for i in range(workers):
                self._workers.append(_Worker(bytes(key), self, i))
        except LedgerError:
            self.close()
            raise
        self._turn = itertools.cycle(self._workers)

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds the worker processes spent signing (inline signing is the caller's own
        CPU time, so it does not count here)."""
        return self._cpu

    @property
    def pending(self) -> int:
        """Calls submitted and not yet completed."""
        return self._pending

    def start(self) -> None:
        """Wait until every worker answers (a worker imports the package first: ~1-2 s)."""
        for worker in self._workers:
            out: Future[list[bytes]] = Future()
            self._begin(out)
            worker.send(0, b"", out)
            out.result()

    def submit(self, digests: Sequence[bytes]) -> Future[list[bytes]]:
        """Sign ``digests``; the future's result lists the signatures in order.

        Raises RecordError for a digest that is not 32 bytes, LedgerError once closed or
        when a worker is gone; the future fails with LedgerError if a worker dies.
        """
        data = _checked(digests)
        out: Future[list[bytes]] = Future()
        self._begin(out)
        if not self._workers:
            self._done(out, [self._signer.sign(d) for d in digests], 0.0)
            return out
        try:
            next(self._turn).send(len(digests), data, out)
        except LedgerError:
            self._done(out, None, 0.0)
            raise
        return out

    async def sign(self, digests: Sequence[bytes]) -> list[bytes]:
        """:meth:`submit` and await the signatures."""
        return await asyncio.wrap_future(self.submit(digests))

    def _begin(self, out: Future[list[bytes]]) -> None:
        out.set_running_or_notify_cancel()  # the work cannot be withdrawn once sent
        with self._lock:
            if self._closed:
                raise LedgerError("the signing pool is closed")
            self._pending += 1

    def _done(
        self, out: Future[list[bytes]], result: list[bytes] | Exception | None, cpu: float
    ) -> None:
        with self._lock:
            self._pending -= 1
            self._cpu += cpu
        if isinstance(result, Exception):
            out.set_exception(result)
        elif result is not None:
            out.set_result(result)

    def close(self, *, grace_seconds: float = 10.0) -> None:
        """Let the workers answer what was sent, then stop them (idempotent). A worker still
        running ``grace_seconds`` later is killed and its unanswered calls fail."""
        with self._lock:
            self._closed = True
        for worker in self._workers:
            worker.close(grace_seconds)

    def __enter__(self) -> SigningPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

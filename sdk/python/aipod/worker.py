"""Serve a Python model to ``aipod-runtime`` as an ``exec:`` worker.

Write an ordinary class whose public methods take ``(self, ctx, path,
**kwargs)``; load weights in ``__init__``; end the script with
``serve(Model())``::

    from aipod.worker import Error, Result, serve

    class Model:
        def __init__(self):
            self.weights = load("weights.bin")      # once per worker

        def predict(self, ctx, path, threshold=0.5):
            ctx.progress(0.0, "reading")
            ...
            return {"label": "spam"}                 # the JSON result

    if __name__ == "__main__":
        serve(Model())

and run it with ``aipod-runtime --model v1=exec:python3 model.py --workers 2``.

``serve`` speaks the worker protocol (``docs/worker-protocol.md``) on the
process's original stdin and stdout, and points file descriptors 0 and 1 at
``/dev/null`` and stderr first, so ``print()`` -- from Python or from C
extensions -- can never corrupt it: prints land in the runtime's log.

Standard library only.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import pathlib
import sys
import threading
import time
import traceback
from typing import Any, BinaryIO, Iterable

__all__ = ["Context", "Error", "Result", "Worker", "serve", "PROTOCOL"]

#: The worker protocol version this SDK speaks.
PROTOCOL = 1

#: gRPC status code names a model may fail with.
CODES = frozenset(
    """CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND ALREADY_EXISTS
    PERMISSION_DENIED RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED OUT_OF_RANGE
    UNIMPLEMENTED INTERNAL UNAVAILABLE DATA_LOSS UNAUTHENTICATED""".split()
)

#: Methods never served as functions.
LIFECYCLE = frozenset({"close"})

#: Progress updates sent at most this often (the runtime's heartbeats carry
#: only the latest anyway).
PROGRESS_INTERVAL = 0.05
# The largest result JSON the runtime sends (one reply message: 8 MiB less
# 64 KiB); larger results are refused here, before the line is written.
MAX_RESULT_JSON = (8 << 20) - (64 << 10)


class Error(Exception):
    """Fail the call with a gRPC status code of your choosing.

    ``raise Error("FAILED_PRECONDITION", "train first")``. Any other
    exception fails the call with INTERNAL and the exception's message.
    """

    def __init__(self, code: str, message: str):
        code = code.strip().upper().replace("-", "_")
        if code not in CODES:
            raise ValueError(f"{code!r} is not a gRPC status code name (e.g. FAILED_PRECONDITION)")
        super().__init__(message)
        self.code = code
        self.message = message


class Result:
    """A JSON result together with a result file sent back to the client.

    ``file`` must lie inside ``ctx.output_dir``; the runtime streams it back
    (zstd-compressed) and removes it after the call.
    """

    def __init__(self, value: Any = None, file: str | os.PathLike[str] | None = None):
        self.value = value
        self.file = file


class Context:
    """What a function gets besides its payload and kwargs."""

    def __init__(self, worker: "Worker", call: dict[str, Any]):
        self._worker = worker
        self._cancel = threading.Event()
        self._last_progress = 0.0
        #: The call id (for your own logs).
        self.call_id: str = call["id"]
        #: The function being run.
        self.function: str = call["function"]
        #: The payload's size in bytes.
        self.input_size: int = int(call.get("input_size", 0))
        #: Where to write a result file (see :class:`Result`).
        self.output_dir = pathlib.Path(call["output_dir"])
        #: The W3C ``traceparent`` of the call's ``aipod.run`` span (or the
        #: caller's own when the runtime does not trace), to continue the
        #: trace in the model — e.g. with OpenTelemetry's
        #: ``TraceContextTextMapPropagator().extract({"traceparent": ctx.traceparent})``.
        #: ``None`` when the call is not traced.
        self.traceparent: str | None = call.get("traceparent")

    @property
    def cancelled(self) -> bool:
        """True once the client went away; stop early (raise or return)."""
        return self._cancel.is_set()

    def progress(self, fraction: float | None = None, message: str | None = None) -> None:
        """Report progress (0..1 and/or a short message) to the client's heartbeats."""
        now = time.monotonic()
        if now - self._last_progress < PROGRESS_INTERVAL and not (fraction is not None and fraction >= 1.0):
            return
        self._last_progress = now
        msg: dict[str, Any] = {"type": "progress", "id": self.call_id}
        if fraction is not None:
            msg["fraction"] = max(0.0, min(1.0, float(fraction)))
        if message is not None:
            msg["message"] = str(message)
        self._worker._send(msg)

    def log(self, message: str, level: str = "info") -> None:
        """Write a line to the runtime's log, tagged with this call."""
        self._worker._send({"type": "log", "id": self.call_id, "level": level, "message": str(message)})


class Worker:
    """Runs the worker protocol for one model over a reader and a writer.

    :func:`serve` is the usual entry point; use ``Worker`` directly to drive
    a model over pipes of your own (tests do).
    """

    def __init__(self, model: Any, functions: Iterable[str] | None = None):
        self.model = model
        self.functions = _functions(model, functions)
        self._out: BinaryIO | None = None
        self._send_lock = threading.Lock()
        self._running: tuple[Context, threading.Thread] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Future[Any] | None = None

    # -- the protocol loop -------------------------------------------------

    def run(self, reader: BinaryIO, writer: BinaryIO) -> int:
        """Sends ``ready``, then serves until ``shutdown`` or end of input.

        Returns the process exit status to use.
        """
        self._out = writer
        self._send({"type": "ready", "protocol": PROTOCOL, "functions": self.functions})
        for raw in iter(reader.readline, b""):
            line = raw.strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
                kind = msg["type"]
            except (ValueError, KeyError, TypeError) as e:
                _stderr(f"aipod worker: ignoring a line that is not a protocol message ({e}): {line[:200]!r}")
                continue
            if kind == "call":
                self._start_call(msg)
            elif kind == "cancel":
                self._cancel(msg.get("id"))
            elif kind == "shutdown":
                self._wait_for_call()
                self._close_model()
                return 0
            else:
                _stderr(f"aipod worker: ignoring unknown message type {kind!r}")
        # The runtime is gone: nobody will read a result. Stop what runs.
        if self._running:
            self._cancel(self._running[0].call_id)
        return 0

    def _start_call(self, msg: dict[str, Any]) -> None:
        self._wait_for_call()  # the runtime sends one call at a time
        try:
            ctx = Context(self, msg)
        except (KeyError, TypeError, ValueError) as e:
            self._send({"type": "error", "id": str(msg.get("id", "")), "code": "INTERNAL",
                        "message": f"malformed call message: {e}"})
            return
        thread = threading.Thread(target=self._run_call, args=(ctx, msg), name=f"aipod-call-{ctx.call_id}",
                                  daemon=True)
        self._running = (ctx, thread)
        thread.start()

    def _wait_for_call(self) -> None:
        if self._running:
            self._running[1].join()
            self._running = None

    def _cancel(self, call_id: Any) -> None:
        running = self._running
        if not running or running[0].call_id != call_id:
            return
        running[0]._cancel.set()
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            loop.call_soon_threadsafe(task.cancel)

    # -- one call ----------------------------------------------------------

    def _run_call(self, ctx: Context, msg: dict[str, Any]) -> None:
        try:
            reply = self._reply(ctx, self._invoke(ctx, msg))
        except Error as e:
            reply = _error(ctx, e.code, e.message)
        except (asyncio.CancelledError, _Cancelled):
            reply = _error(ctx, "CANCELLED", "the call was cancelled")
        except BaseException as e:  # noqa: BLE001 -- any failure must reach the client
            if ctx.cancelled:
                reply = _error(ctx, "CANCELLED", f"the call was cancelled ({type(e).__name__}: {e})")
            else:
                traceback.print_exc(file=sys.stderr)
                reply = _error(ctx, "INTERNAL", f"{type(e).__name__}: {e}")
        self._send(reply)

    def _invoke(self, ctx: Context, msg: dict[str, Any]) -> Any:
        name = msg["function"]
        if name not in self.functions:
            raise Error("UNIMPLEMENTED", f"this worker does not serve {name!r}")
        fn = getattr(self.model, name)
        kwargs = msg.get("kwargs") or {}
        path = pathlib.Path(msg["input"])
        try:
            inspect.signature(fn).bind(ctx, path, **kwargs)
        except TypeError as e:
            raise Error("INVALID_ARGUMENT", f"{name}: {e}") from None
        if inspect.iscoroutinefunction(fn):
            return self._run_async(fn(ctx, path, **kwargs))
        return fn(ctx, path, **kwargs)

    def _run_async(self, coro: Any) -> Any:
        # One event loop per worker, reused by every call (calls run one at
        # a time), so async models may keep loop-bound state.
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(coro)
        try:
            return self._loop.run_until_complete(self._task)
        finally:
            self._task = None

    def _reply(self, ctx: Context, value: Any) -> dict[str, Any]:
        if ctx.cancelled:
            raise _Cancelled()
        file = None
        if isinstance(value, Result):
            value, file = value.value, value.file
        try:
            size = len(json.dumps(value, separators=(",", ":")).encode())
        except (TypeError, ValueError) as e:
            raise Error("INTERNAL", f"{ctx.function} returned a result that is not JSON: {e}") from None
        if size > MAX_RESULT_JSON:
            raise Error(
                "RESOURCE_EXHAUSTED",
                f"{ctx.function} returned a result JSON of {size} bytes; a result may be at most {MAX_RESULT_JSON} "
                "bytes (8 MiB less 64 KiB): return large outputs as the result payload (Result(..., file=...))",
            )
        reply = {"type": "result", "id": ctx.call_id, "result": value}
        if file is not None:
            reply["output"] = os.fspath(file)
        return reply

    # -- plumbing ----------------------------------------------------------

    def _send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        with self._send_lock:
            assert self._out is not None, "Worker.run has not started"
            try:
                self._out.write(data)
                self._out.flush()
            except (BrokenPipeError, ValueError):
                pass  # the runtime is gone; run() ends on end of input

    def _close_model(self) -> None:
        close = getattr(self.model, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # noqa: BLE001 -- shutting down anyway
                traceback.print_exc(file=sys.stderr)
        if self._loop is not None:
            self._loop.close()


class _Cancelled(Exception):
    """A function returned after its call was cancelled."""


def _error(ctx: Context, code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "id": ctx.call_id, "code": code, "message": message}


def _functions(model: Any, functions: Iterable[str] | None) -> list[str]:
    if functions is None:
        functions = [
            name for name, member in inspect.getmembers(type(model))
            if not name.startswith("_") and name not in LIFECYCLE and callable(member)
        ]
    names = sorted(set(functions))
    if not names:
        raise ValueError(f"{type(model).__name__} has no public methods to serve")
    for name in names:
        if not callable(getattr(model, name, None)):
            raise ValueError(f"{type(model).__name__}.{name} is not a method")
    return names


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def serve(model: Any, functions: Iterable[str] | None = None) -> None:
    """Serves ``model`` to the runtime that started this process; never returns.

    ``functions`` names the methods to serve (default: every public method
    except ``close``, which is called on shutdown).
    """
    worker = Worker(model, functions)
    # Keep the protocol on private copies of fds 0 and 1, then point 0 at
    # /dev/null and 1 at stderr: nothing the model reads or prints can touch
    # the protocol.
    sys.stdout.flush()
    reader = os.fdopen(os.dup(0), "rb")
    writer = os.fdopen(os.dup(1), "wb")
    # Whatever the model printed before (at import, in __init__, from C)
    # went to the same pipe and the runtime logs it as output; a newline
    # ends a partial line, so the first protocol line starts clean.
    writer.write(b"\n")
    writer.flush()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    status = worker.run(reader, writer)
    sys.stdout.flush()
    sys.stderr.flush()
    # Daemon call threads may still be running (end of input); exit now.
    os._exit(status)

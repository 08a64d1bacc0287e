"""When and how a call is tried again: errors as `CallError`s, the rules
for what may be retried, the attempt budget, and the `Plan` of each
attempt (call, attach or resume)."""

from __future__ import annotations

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

from ._proto import ai_pb2
from .types import CallError, Result, RetryPolicy
from ._wire import (
    CALL_ID_KEY,
    Data,
    Out,
    PHASE_KEY,
    ProgressCallback,
    RETRYABLE_KEY,
    ResultCallback,
    UPSTREAM_KEY,
    header_frame,
    kwargs_bytes,
    metadata,
    new_call_id,
    trace_context,
)
from ._payload import Encoder, Payload
from ._receive import Receiver, Sink



# -- errors and retries ---------------------------------------------------------


def rpc_error(e: grpc.RpcError, target: str, receiver: Receiver | None) -> CallError:
    """A grpc error as a CallError: the status name, the server's message
    (with the address when the server was not reached), the phase from the
    `x-aipod-phase` trailer, whether the server said a retry is safe."""
    code_obj = e.code() if hasattr(e, "code") else None
    code = code_obj.name if code_obj is not None else "UNKNOWN"
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    trailers: dict[str, str] = {}
    try:
        for k, v in e.trailing_metadata() or ():
            trailers[k] = v if isinstance(v, str) else v.decode(errors="replace")
    except Exception:  # noqa: BLE001 - a broken connection may have none
        pass
    phase = trailers.get(PHASE_KEY) or (receiver.phase if receiver is not None and receiver.accepted else None)
    retryable = trailers.get(RETRYABLE_KEY) == "true"
    if code == "UNAVAILABLE" and not trailers:
        # Not the server's own status (that carries aipod trailers): the
        # transport failed.
        reached = receiver is not None and receiver.accepted
        if not reached:
            details = f"could not reach {target}: {details}"
        else:
            details = f"lost the connection to {target}: {details}"
    err = CallError(code, details, phase=phase, retryable=retryable)
    err.phase_from_server = trailers.get(PHASE_KEY)
    return err


def permanent(err: CallError) -> bool:
    """Errors no retry can fix even when the code says UNAVAILABLE."""
    text = err.message.lower()
    return any(
        s in text
        for s in ("dns resolution failed", "name or service not known", "domain name not found", "hostname lookup")
    )


def broken(err: CallError) -> bool:
    """A lost connection or a proxy's status (no aipod trailers), or the
    runtime asking for a resume; never a retained call's own outcome."""
    if err.code == "UNAVAILABLE":
        return err.phase_from_server is None or err.retryable
    return err.code in ("UNKNOWN", "INTERNAL", "CANCELLED") and err.phase_from_server is None


def should_retry(err: CallError, receiver: Receiver | None, payload: Payload, idempotent: bool) -> bool:
    """The retry rules (docs/client.md): a refusal before any model work, a
    payload that can be sent again, a model that has not started (by a
    RUNNING heartbeat or the failure's phase trailer) unless idempotent."""
    if not payload.rereadable:
        return False
    started = (receiver is not None and receiver.saw_running) or err.phase in ("RUNNING", "SENDING")
    if started and not idempotent:
        return False
    if err.code == "UNAVAILABLE":
        return not permanent(err)
    return err.code == "RESOURCE_EXHAUSTED" and err.retryable


@dataclass
class Attempts:
    """The retry loop's state: deadline, attempt count, backoff."""

    policy: RetryPolicy
    timeout: float | None
    started: float = field(default_factory=time.monotonic)
    n: int = 0

    def remaining(self) -> float | None:
        if self.timeout is None:
            return None
        return self.timeout - (time.monotonic() - self.started)

    def next_wait(self, err: CallError) -> float | None:
        """Seconds to wait before the next attempt, or None to give up."""
        if self.n >= self.policy.attempts:
            return None
        wait = self.policy.backoff(self.n)
        left = self.remaining()
        if left is not None and wait >= left:
            return None
        return wait

    def give_up(self, err: CallError, call_id: str) -> CallError:
        err.call_id = call_id
        err.attempts = self.n
        err.args = (str(err),)
        return err

    def deadline_error(self, call_id: str) -> CallError:
        return CallError("DEADLINE_EXCEEDED", "the call's timeout passed", call_id=call_id, attempts=self.n)


# -- one call, planned before anything is sent ----------------------------------

#: How an attempt opens: a new call, attaching to a retained one, or
#: resuming its upload.
Mode = Literal["call", "attach", "resume"]


@dataclass
class Plan:
    """Everything about a call decided before it is sent (bad input fails
    here), and its attempts: each makes a header and a receiver; a failure
    either gives the wait before the next attempt or is final."""

    func: str
    version: str | None
    kwargs_json: bytes
    payload: Payload
    sink: Sink
    call_id: str
    encoder: Encoder
    metadata: list[tuple[str, str]]
    attempts: Attempts
    progress: ProgressCallback | None
    on_result: ResultCallback | None
    idempotent: bool
    retain: float | None = None
    # How the next attempt opens.
    mode: Mode = "call"
    # The server accepted the call once: it is rejoined, never started again.
    accepted: bool = False
    last_contact: float = field(default_factory=time.monotonic)
    rejoins: int = 0

    @classmethod
    def make(
        cls,
        func: str,
        kwargs: dict[str, Any] | None,
        *,
        file: str | os.PathLike[str] | None,
        data: Data | None,
        out: Out,
        timeout: float | None,
        progress: ProgressCallback | None,
        on_result: ResultCallback | None,
        call_id: str | None,
        idempotent: bool,
        zstd_level: int | str | None,
        version: str | None,
        upstream: str | None,
        retry: RetryPolicy,
        auth: list[tuple[str, str]] | None = None,
        retain: float | None = None,
    ) -> Plan:
        if not func:
            raise ValueError("func must name a function")
        if retain is not None and retain < 0:
            raise ValueError("retain must be a number of seconds, 0 or more")
        kwargs_json = kwargs_bytes(kwargs)
        payload = Payload.of(file, data)
        sink = Sink(out)
        call_id = call_id or new_call_id()
        if retain and len(call_id) < 16:
            raise ValueError("a retained call needs a call_id of at least 16 unguessable characters")
        return cls(
            func=func, version=version, kwargs_json=kwargs_json, payload=payload, sink=sink, call_id=call_id,
            encoder=Encoder(zstd_level, payload.size),
            metadata=metadata(func, upstream, call_id if retain else None) + (auth or []) + trace_context(),
            attempts=Attempts(retry, timeout), progress=progress, on_result=on_result, idempotent=idempotent,
            retain=retain or None,
        )

    @classmethod
    def attach(
        cls,
        call_id: str,
        *,
        out: Out,
        timeout: float | None,
        progress: ProgressCallback | None,
        on_result: ResultCallback | None,
        upstream: str | None,
        retry: RetryPolicy,
        auth: list[tuple[str, str]] | None,
        patience: float,
    ) -> Plan:
        """Picks up the retained call `call_id`, reattaching for up to
        `patience` seconds after a broken stream."""
        md = [(CALL_ID_KEY, call_id)] + ([(UPSTREAM_KEY, upstream)] if upstream else []) + (auth or [])
        return cls(
            func="", version=None, kwargs_json=b"{}", payload=Payload(size=0), sink=Sink(out), call_id=call_id,
            encoder=Encoder(None), metadata=md, attempts=Attempts(retry, timeout), progress=progress,
            on_result=on_result, idempotent=False, retain=patience, mode="attach", accepted=True,
        )

    def start_attempt(self) -> tuple[ai_pb2.Frame, Receiver, float | None]:
        """The next attempt's header, receiver and time left (None: no
        deadline); DEADLINE_EXCEEDED when none is left."""
        self.attempts.n += 1
        left = self.attempts.remaining()
        if left is not None and left <= 0:
            raise self.attempts.deadline_error(self.call_id)
        receiver = Receiver(self.sink, self.progress, self.attempts.started, self.attempts.n, self.on_result)
        header = header_frame(
            self.func, self.version, self.kwargs_json, self.payload, self.encoder, self.call_id, self.retain,
            resume=self.mode == "resume",
        )
        return header, receiver, left

    def failed(self, err: CallError, receiver: Receiver) -> float:
        """Seconds to wait before retrying after `err`, or raises it as final."""
        self.sink.discard()
        if self.retain is not None:
            wait = self._rejoin(err, receiver)
            if wait is not None:
                return wait
        retry = not self.accepted and should_retry(err, receiver, self.payload, self.idempotent)
        wait = self.attempts.next_wait(err) if retry else None
        if wait is None:
            raise self.attempts.give_up(err, self.call_id) from None
        return wait

    def _rejoin(self, err: CallError, receiver: Receiver) -> float | None:
        """For a retained call the server accepted: the wait before
        reattaching (or resuming, when the server says the upload is
        incomplete), or None when `err` is the call's answer."""
        if receiver.accepted:
            self.accepted = True
            self.last_contact = time.monotonic()
        if not self.accepted:
            return None
        if self.mode == "attach" and err.code == "FAILED_PRECONDITION":
            if not self.payload.rereadable:
                err.message += "; the payload cannot be read again, so the upload cannot be resumed"
                raise self.attempts.give_up(err, self.call_id) from None
            self.mode = "resume"
            return 0.0
        if not broken(err):
            return None
        left = self.attempts.remaining()
        if left is None:
            left = self.last_contact + (self.retain or 0) - time.monotonic()
        wait = self.attempts.policy.backoff(self.rejoins)
        if left <= 0:
            return None
        self.rejoins += 1
        self.mode = "attach"
        return min(wait, left)

    def finish(self, receiver: Receiver) -> Result:
        return receiver.finish(self.call_id, self.attempts.n)

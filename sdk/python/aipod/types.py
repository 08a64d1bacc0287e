"""What a call returns, reports and raises: Result, Progress, CallError, RetryPolicy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Progress:
    """A call's state, passed to the `progress` callback on every heartbeat
    and upload step.

    `phase` is where the server says the call is: ``"RECEIVING"``,
    ``"QUEUED"``, ``"RUNNING"`` or ``"SENDING"``. `sent_bytes` counts the
    payload bytes this client has sent (uncompressed), `received_bytes` what
    the server has acknowledged receiving; `result_bytes` the result payload
    bytes received so far. `fraction` and `message` are the model's own
    progress report (`fraction` is None until the model reports one).
    """

    phase: str
    elapsed: float
    sent_bytes: int
    received_bytes: int
    queue_position: int
    fraction: float | None
    message: str
    result_bytes: int = 0
    attempt: int = 1


@dataclass(frozen=True)
class Result:
    """A finished call.

    `value` is the model's JSON result; `payload` the result payload when it
    was kept in memory (no `out=`), else None; `payload_size` its
    uncompressed size (None when the model returned no payload).
    """

    value: Any
    payload: bytes | None
    payload_size: int | None
    call_id: str
    attempts: int = 1


class CallError(Exception):
    """A call, describe or health check that failed.

    `code` is the gRPC status name (``"FAILED_PRECONDITION"``,
    ``"UNAVAILABLE"``, …), `message` the server's (or this client's)
    explanation, `call_id` the call's id, `phase` the phase the call was in
    when it failed (None when it failed before the server accepted it), and
    `attempts` how many times it was sent.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        call_id: str | None = None,
        phase: str | None = None,
        attempts: int = 1,
        retryable: bool = False,
    ) -> None:
        self.code = code
        self.message = message
        self.call_id = call_id
        self.phase = phase
        self.attempts = attempts
        self.retryable = retryable
        # The runtime's own `x-aipod-phase` trailer: None when the status
        # came from a proxy or a broken connection.
        self.phase_from_server: str | None = None
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" while {self.phase}" if self.phase else ""
        tries = f" after {self.attempts} attempts" if self.attempts > 1 else ""
        call = f" (call id {self.call_id})" if self.call_id else ""
        return f"{self.code}{where}{tries}{call}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes
        return (
            _rebuild_call_error,
            (self.code, self.message, self.call_id, self.phase, self.attempts, self.retryable),
        )


def _rebuild_call_error(
    code: str, message: str, call_id: str | None, phase: str | None, attempts: int, retryable: bool
) -> CallError:
    return CallError(code, message, call_id=call_id, phase=phase, attempts=attempts, retryable=retryable)


@dataclass(frozen=True)
class RetryPolicy:
    """When and how often a refused call is sent again.

    Only refusals that happened before any model work are retried: the
    server was unreachable or draining (``UNAVAILABLE``) or said the call may
    be retried (``RESOURCE_EXHAUSTED`` with ``x-aipod-retryable: true``);
    only payloads that can be read again (a file, bytes, a seekable file
    object, or none); and only before the model started (no ``RUNNING``
    heartbeat) unless the call is ``idempotent``. Waits `initial_backoff`
    seconds, doubling up to `max_backoff`, never past the call's deadline.
    """

    attempts: int = 5
    initial_backoff: float = 1.0
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("RetryPolicy backoffs must not be negative")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt number `attempt + 1`."""
        return float(min(self.max_backoff, self.initial_backoff * (2 ** (attempt - 1))))

"""The parts of a call both clients share, transport-neutral; `client.py`
drives them with grpcio's blocking API and `aio.py` with grpc.aio:

- `_wire`: the protocol — paths, metadata keys, limits, channel options,
  targets and credentials, the header frame, request metadata;
- `_payload`: the payload source, its re-reads, and the zstd encoder;
- `_receive`: the reply side — the result sink and the receiver;
- `_retry`: errors, what may be retried, the attempt budget, the `Plan`.

This module is their face: `ClientBase`, and each name the clients use.
"""

from __future__ import annotations

from typing import Any

import grpc

from .types import RetryPolicy
from ._payload import (
    Adapt,
    AUTO_SMALL_MAX,
    _compressor,
    _decompressor,
    Encoder,
    LEVELS,
    Payload,
    _stored_frame,
)
from ._receive import (
    Receiver,
    Sink,
)
from ._retry import (
    Attempts,
    broken,
    Mode,
    permanent,
    Plan,
    rpc_error,
    should_retry,
)
from ._wire import (
    ACCEPT_WAIT,
    ATTACH_PATH,
    authorization,
    CALL_PATH,
    CALL_PAYLOAD_MAX,
    CALL_ID_KEY,
    CHANNEL_OPTIONS,
    CHAOS_PATH,
    CHUNK_SIZE,
    credentials,
    Data,
    describe_dict,
    describe_metadata,
    DESCRIBE_PATH,
    FEATURE_CALL,
    fits_one_message,
    FRAME_MAX,
    FUNC_NAME_KEY,
    header_frame,
    INLINE_MAX,
    kwargs_bytes,
    MAX_MESSAGE_BYTES,
    MAX_WINDOW,
    metadata,
    method_missing,
    new_call_id,
    one_message,
    Out,
    parse_target,
    PathLike,
    PHASE_KEY,
    PHASES,
    ProgressCallback,
    protocol_error,
    ResultCallback,
    RETRYABLE_KEY,
    stubs,
    trace_context,
    UPSTREAM_KEY,
)


__all__ = [
    "ACCEPT_WAIT",
    "ATTACH_PATH",
    "CALL_PATH",
    "CALL_PAYLOAD_MAX",
    "FEATURE_CALL",
    "AUTO_SMALL_MAX",
    "Adapt",
    "Attempts",
    "CALL_ID_KEY",
    "CHANNEL_OPTIONS",
    "CHAOS_PATH",
    "CHUNK_SIZE",
    "ClientBase",
    "DESCRIBE_PATH",
    "Data",
    "Encoder",
    "FRAME_MAX",
    "FUNC_NAME_KEY",
    "INLINE_MAX",
    "LEVELS",
    "MAX_MESSAGE_BYTES",
    "MAX_WINDOW",
    "Mode",
    "Out",
    "PHASES",
    "PHASE_KEY",
    "PathLike",
    "Payload",
    "Plan",
    "ProgressCallback",
    "RETRYABLE_KEY",
    "Receiver",
    "ResultCallback",
    "Sink",
    "UPSTREAM_KEY",
    "_compressor",
    "_decompressor",
    "_stored_frame",
    "authorization",
    "broken",
    "credentials",
    "describe_dict",
    "header_frame",
    "kwargs_bytes",
    "metadata",
    "method_missing",
    "describe_metadata",
    "fits_one_message",
    "one_message",
    "new_call_id",
    "parse_target",
    "permanent",
    "protocol_error",
    "rpc_error",
    "should_retry",
    "stubs",
    "trace_context",
]


class ClientBase:
    """What `Client` and `AsyncClient` share: the target, defaults, token,
    the channel (made by `_open`, blocking or asyncio) and its stubs."""

    def __init__(
        self,
        target: str,
        upstream: str | None = None,
        version: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        options: list[tuple[str, Any]] | None = None,
        token: str | None = None,
        ca: PathLike | None = None,
        cert: PathLike | None = None,
        key: PathLike | None = None,
    ) -> None:
        self.target = parse_target(target)
        self.upstream = upstream
        self.version = version
        self.retry = retry or RetryPolicy()
        self._auth = authorization(token)
        creds = credentials(target, ca, cert, key)
        self._channel = self._open(self.target, CHANNEL_OPTIONS + list(options or []), creds)
        self._chaos, self._describe, self._health, self._attach, self._call = stubs(self._channel)
        # Per upstream: whether the server has the one-message `call`
        # (`Description.features`), learned by the first small call.
        self._one_message: dict[str, bool] = {}

    @staticmethod
    def _upstream_of(md: list[tuple[str, str]]) -> str:
        """The feature cache's key: the upstream a call with metadata `md` goes to."""
        return next((v for k, v in md if k == UPSTREAM_KEY), "")

    def _remember_one_message(self, md: list[tuple[str, str]], description: Any) -> bool:
        """Remembers, for the upstream of `md`, whether `description` (None:
        describe failed, so no) lists the one-message call."""
        has = description is not None and FEATURE_CALL in description.features
        self._one_message[self._upstream_of(md)] = has
        return has

    def _open(self, target: str, options: list[tuple[str, Any]], creds: grpc.ChannelCredentials | None) -> Any:
        raise NotImplementedError

    def _md(self) -> list[tuple[str, str]]:
        """Metadata of describe and health: the upstream and the token."""
        return ([(UPSTREAM_KEY, self.upstream)] if self.upstream else []) + self._auth

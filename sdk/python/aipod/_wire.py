"""The call protocol as both clients speak it: paths, metadata keys and
limits (mirroring src/contract.rs), channel options, targets and
credentials, the header frame, request metadata (function, upstream,
call id, trace context, token) and `describe` as a dict."""

from __future__ import annotations

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterable, Callable, Iterable
from pathlib import Path
from typing import IO, Any, BinaryIO, Union

import grpc

from ._proto import ai_pb2
from .types import CallError, Progress

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._payload import Encoder, Payload

# Mirrors src/contract.rs: names and defaults both ends agree on.
CHAOS_PATH = "/ai.AI/chaos"
DESCRIBE_PATH = "/ai.AI/describe"
ATTACH_PATH = "/ai.AI/attach"
CALL_PATH = "/ai.AI/call"
# The `Description.features` name of the one-message `call` method, and
# the most payload (encoded) one `Call` carries.
FEATURE_CALL = "call"
CALL_PAYLOAD_MAX = 256 << 10
FUNC_NAME_KEY = "x-func-name"
UPSTREAM_KEY = "x-upstream"
CALL_ID_KEY = "x-aipod-call-id"
RETRYABLE_KEY = "x-aipod-retryable"
PHASE_KEY = "x-aipod-phase"
CHUNK_SIZE = 1 << 20
# Payload bytes per zstd frame: a frame's window, the decoder memory an
# upload costs the server, is at most this (the Rust client's SEGMENT).
FRAME_MAX = 128 << 10
# Payloads in memory up to this size are encoded where they are sent (no
# feeder thread, no executor hop): for them the hand-off costs more than
# the work.
INLINE_MAX = 256 << 10
# How long a streamed payload waits for the server to accept the header
# (its first heartbeat comes at once) before it is sent anyway.
ACCEPT_WAIT = 1.0
MAX_MESSAGE_BYTES = 8 << 20
# The largest zstd window a result payload may ask the decoder for: the
# runtime's own cap (--max-zstd-window's default).
MAX_WINDOW = 8 << 20

# Production defaults, the Rust client's (docs/client.md): HTTP/2 pings every
# 5 s also while idle, so proxies and NATs keep the connection; no gRPC-level
# retries, because a multi-GB stream cannot be replayed by grpc itself.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 60_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    # A fixed HTTP/2 window instead of growing it by bandwidth-delay probes:
    # a fast server can otherwise park many MiB of result payload in the
    # client while Python writes it out (measured: 152 → 61 MiB peak RSS for
    # 1 GiB each way, and faster).
    ("grpc.http2.bdp_probe", 0),
]

PHASES = {
    ai_pb2.PHASE_RECEIVING: "RECEIVING",
    ai_pb2.PHASE_QUEUED: "QUEUED",
    ai_pb2.PHASE_RUNNING: "RUNNING",
    ai_pb2.PHASE_SENDING: "SENDING",
}

Data = Union[bytes, bytearray, memoryview, IO[bytes], Iterable[bytes], AsyncIterable[bytes]]
Out = Union[str, "os.PathLike[str]", BinaryIO, None]
ProgressCallback = Callable[[Progress], None]
# Called once when the result arrives, before its payload: (value, payload size).
ResultCallback = Callable[[Any, Union[int, None]], None]


def parse_target(target: str) -> str:
    """`host:port`, `http://host:port` (plain HTTP/2) or `https://host:port`
    (TLS) → grpc's `host:port`."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be 'host:port', 'http://host:port' or 'https://host:port', got {target!r}")
    t = target.strip()
    for scheme in ("http://", "https://"):
        if t.startswith(scheme):
            t = t[len(scheme) :]
    t = t.rstrip("/")
    if "/" in t or not t:
        raise ValueError(f"target must be 'host:port', 'http://host:port' or 'https://host:port', got {target!r}")
    return t


PathLike = Union[str, "os.PathLike[str]"]


def credentials(
    target: str, ca: PathLike | None, cert: PathLike | None, key: PathLike | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials for an `https://` target: trust `ca` (PEM; default
    the system's roots), present `cert`/`key` (PEM) to servers that require
    mutual TLS. None for plaintext targets, where TLS settings are an error
    (nothing goes out in the clear by mistake)."""
    if not target.strip().startswith("https://"):
        if ca or cert or key:
            raise ValueError(f"ca, cert and key need an https:// target, not {target!r}")
        return None
    if bool(cert) != bool(key):
        raise ValueError("cert and key go together (a client certificate and its private key)")

    def read(what: str, path: PathLike | None) -> bytes | None:
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read the {what} {path}: {e}") from e

    return grpc.ssl_channel_credentials(
        root_certificates=read("CA certificate", ca),
        private_key=read("client key", key),
        certificate_chain=read("client certificate", cert),
    )


def new_call_id() -> str:
    """128 random bits: unguessable, so an id can later name a retained call."""
    return os.urandom(16).hex()


def header_frame(
    func: str,
    version: str | None,
    kwargs_json: bytes,
    payload: Payload,
    encoder: Encoder,
    call_id: str,
    retain: float | None = None,
    resume: bool = False,
) -> ai_pb2.Frame:
    header = ai_pb2.Header(
        func=func, version=version or "", kwargs_json=kwargs_json, encoding=encoder.encoding, call_id=call_id
    )
    if payload.size is not None:
        header.payload_size = payload.size
    if retain:
        header.retain_seconds = max(1, int(retain))
    if resume:
        # Ask for everything: the server answers with the offset it holds.
        header.resume_from = payload.size if payload.size is not None else 2**64 - 1
    return ai_pb2.Frame(header=header)


def kwargs_bytes(kwargs: dict[str, Any] | None) -> bytes:
    """The kwargs as JSON; a TypeError (before anything is sent) when they
    are not a JSON-serialisable dict."""
    if kwargs is None:
        return b"{}"
    if not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict, not {type(kwargs).__name__}")
    try:
        return json.dumps(kwargs, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise TypeError(f"kwargs are not JSON-serialisable: {e}") from e


def metadata(func: str, upstream: str | None, routed_id: str | None) -> list[tuple[str, str]]:
    """A call's metadata; `routed_id`: a retained call's id, which a router
    with call affinity hashes to find the replica holding it. Any other
    call's id goes in its header alone (no header for either end's HPACK to
    spell out on every call)."""
    md = [(FUNC_NAME_KEY, func)]
    if routed_id:
        md.append((CALL_ID_KEY, routed_id))
    if upstream:
        md.append((UPSTREAM_KEY, upstream))
    return md


_propagate: Any = None  # opentelemetry.propagate once looked up; False when not installed
_trace: Any = None  # and opentelemetry.trace


def trace_context() -> list[tuple[str, str]]:
    """The current OpenTelemetry context's `traceparent` (and `tracestate`)
    when the `opentelemetry-api` package is installed and a span is current;
    none otherwise. The runtime continues that trace."""
    global _propagate, _trace
    if _propagate is None:
        try:
            from opentelemetry import propagate, trace

            _propagate, _trace = propagate, trace
        except ImportError:
            _propagate = False
    if not _propagate or not _trace.get_current_span().get_span_context().is_valid:
        return []  # no span, no traceparent: the propagators need not run
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return [(k, v) for k, v in carrier.items() if k in ("traceparent", "tracestate")]


def authorization(token: str | None) -> list[tuple[str, str]]:
    """The `authorization` metadata for `token`, else for `$AIPOD_TOKEN`
    (a runtime started with --auth-token-file asks for it); none without."""
    token = (token if token is not None else os.environ.get("AIPOD_TOKEN", "")).strip()
    if not token:
        return []
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError("token must be printable ASCII without spaces (it is sent as gRPC metadata)")
    return [("authorization", f"Bearer {token}")]


def describe_dict(message: Any) -> dict[str, Any]:
    """A protobuf message as a plain dict: field names as in the .proto,
    integers as ints (protobuf's JSON mapping would make uint64s strings)."""
    out: dict[str, Any] = {}
    for fd in message.DESCRIPTOR.fields:
        value = getattr(message, fd.name)
        if fd.message_type is not None:
            if _is_repeated(fd):
                out[fd.name] = [describe_dict(v) for v in value]
            else:
                out[fd.name] = describe_dict(value)
        elif _is_repeated(fd):
            out[fd.name] = list(value)
        else:
            out[fd.name] = value
    return out


def _is_repeated(fd: Any) -> bool:
    is_repeated = getattr(fd, "is_repeated", None)
    if is_repeated is not None:
        return bool(is_repeated)
    return bool(fd.label == fd.LABEL_REPEATED)


def stubs(channel: Any) -> tuple[Any, Any, Any, Any, Any]:
    """The chaos, describe, health-check, attach and call callables on a grpc
    channel (blocking or asyncio: both have the same multicallable
    factories)."""
    from grpc_health.v1 import health_pb2

    chaos = channel.stream_stream(
        CHAOS_PATH, request_serializer=ai_pb2.Frame.SerializeToString, response_deserializer=ai_pb2.Reply.FromString
    )
    describe = channel.unary_unary(
        DESCRIBE_PATH,
        request_serializer=ai_pb2.DescribeRequest.SerializeToString,
        response_deserializer=ai_pb2.Description.FromString,
    )
    health = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    attach = channel.unary_stream(
        ATTACH_PATH,
        request_serializer=ai_pb2.AttachRequest.SerializeToString,
        response_deserializer=ai_pb2.Reply.FromString,
    )
    call = channel.unary_stream(
        CALL_PATH, request_serializer=ai_pb2.Call.SerializeToString, response_deserializer=ai_pb2.Reply.FromString
    )
    return chaos, describe, health, attach, call


def fits_one_message(header: ai_pb2.Frame, payload: Payload) -> bool:
    """Whether the call can go as one `Call` message: a payload in memory
    that fits (zstd can grow incompressible bytes a little: room for that),
    not a resume. Otherwise it goes by `chaos`."""
    return (
        payload.data is not None
        and len(payload.data) <= CALL_PAYLOAD_MAX - (4 << 10)
        and not header.header.HasField("resume_from")
    )


def one_message(header: ai_pb2.Frame, payload: Payload, encoder: Encoder) -> ai_pb2.Call:
    """The call as one `Call` message: the header and the encoded payload
    (one that `fits_one_message`). A blocking grpcio client sends it
    without a thread to feed a request stream."""
    return ai_pb2.Call(header=header.header, payload=b"".join(encoder.encode(b) for b in payload.blocks()))


def method_missing(e: grpc.RpcError) -> bool:
    """Whether `e` says the server has no such method (a server older than
    `call`, behind a router that lists it), not that the function is unknown:
    gRPC servers answer a missing method UNIMPLEMENTED with no message
    (tonic's router), "Not yet implemented" (tonic's default stubs) or
    "Method not found!" (grpc core); aipod names the function."""
    code = e.code() if callable(getattr(e, "code", None)) else None
    details = e.details() if callable(getattr(e, "details", None)) else None
    return code == grpc.StatusCode.UNIMPLEMENTED and (details or "") in ("", "Not yet implemented", "Method not found!")


def describe_metadata(md: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Of a call's metadata, what a describe to the same server carries:
    its upstream and its token."""
    return [(k, v) for k, v in md if k in (UPSTREAM_KEY, "authorization")]

def protocol_error(message: str) -> CallError:
    return CallError("UNKNOWN", f"the server broke the protocol: {message}")

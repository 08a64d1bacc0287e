"""The parts of a call both clients share: target and channel options, the
payload source and its encoder, the reply decoder, and the retry rules.

Everything here is transport-neutral; `client.py` drives it with grpcio's
blocking API and `aio.py` with grpc.aio.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal, Union

import grpc
import zstandard

from ._proto import ai_pb2
from .types import CallError, Progress, Result, RetryPolicy

# Mirrors src/contract.rs: names and defaults both ends agree on.
CHAOS_PATH = "/ai.AI/chaos"
DESCRIBE_PATH = "/ai.AI/describe"
ATTACH_PATH = "/ai.AI/attach"
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
    return uuid.uuid4().hex


# -- the payload --------------------------------------------------------------


@dataclass
class Payload:
    """Where a call's payload comes from, checked before anything is sent."""

    path: Path | None = None
    data: bytes | memoryview | None = None
    fileobj: IO[bytes] | None = None
    iterable: Iterable[bytes] | None = None
    aiterable: AsyncIterable[bytes] | None = None
    start: int = 0
    size: int | None = None

    @classmethod
    def of(cls, file: str | os.PathLike[str] | None, data: Data | None) -> Payload:
        if file is not None and data is not None:
            raise ValueError("give the payload as file= or data=, not both")
        if file is not None:
            path = Path(os.fspath(file))
            st = path.stat()  # FileNotFoundError before connecting
            if not path.is_file():
                raise IsADirectoryError(f"{path}: not a regular file")
            with open(path, "rb"):
                pass  # PermissionError now, not mid-call
            return cls(path=path, size=st.st_size)
        if data is None:
            return cls(size=0)
        if isinstance(data, (bytes, bytearray, memoryview)):
            view = memoryview(data).cast("B")
            return cls(data=view, size=len(view))
        if isinstance(data, str):
            raise TypeError("data= takes bytes, a binary file object or an iterable of bytes, not str (encode it)")
        if hasattr(data, "read"):
            f: IO[bytes] = data  # type: ignore[assignment]
            size = None
            start = 0
            if _seekable(f):
                start = f.tell()
                end = f.seek(0, io.SEEK_END)
                f.seek(start)
                size = end - start
            return cls(fileobj=f, start=start, size=size)
        if isinstance(data, Iterable):
            return cls(iterable=data)
        if isinstance(data, AsyncIterable):
            return cls(aiterable=data)
        raise TypeError(f"data= takes bytes, a binary file object or an iterable of bytes, not {type(data).__name__}")

    @property
    def rereadable(self) -> bool:
        """Whether a retry can send the payload again from its start."""
        return (
            self.iterable is None
            and self.aiterable is None
            and (self.fileobj is None or _seekable(self.fileobj))
        )

    def blocks(self, offset: int = 0) -> Generator[bytes | memoryview, None, None]:
        """The payload in pieces of at most CHUNK_SIZE bytes, from byte
        `offset` (a resumed upload; rereadable payloads only)."""
        if offset and not self.rereadable:
            raise ValueError("a payload that cannot be read again cannot be resumed")
        if self.path is not None:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(offset)
                yield from _read_blocks(f)
        elif self.data is not None:
            for i in range(offset, len(self.data), CHUNK_SIZE):
                yield self.data[i : i + CHUNK_SIZE]
        elif self.fileobj is not None:
            if _seekable(self.fileobj):
                self.fileobj.seek(self.start + offset)
            yield from _read_blocks(self.fileobj)
        elif self.iterable is not None:
            yield from _rechunk(self.iterable)


    async def ablocks(self) -> AsyncIterator[bytes]:
        """An async iterable payload in pieces of at most CHUNK_SIZE bytes."""
        assert self.aiterable is not None
        pending = bytearray()
        async for piece in self.aiterable:
            if not isinstance(piece, (bytes, bytearray, memoryview)):
                raise TypeError(f"data= async iterable yielded {type(piece).__name__}, not bytes")
            pending += piece
            while len(pending) >= CHUNK_SIZE:
                yield bytes(pending[:CHUNK_SIZE])
                del pending[:CHUNK_SIZE]
        if pending:
            yield bytes(pending)


def _seekable(f: IO[bytes]) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, ValueError, OSError):
        return False


def _read_blocks(f: IO[bytes]) -> Iterator[bytes]:
    while True:
        block = f.read(CHUNK_SIZE)
        if not block:
            return
        if not isinstance(block, (bytes, bytearray)):
            raise TypeError(f"the payload file object returned {type(block).__name__}, not bytes (open it in 'rb' mode)")
        yield bytes(block)


def _rechunk(pieces: Iterable[bytes]) -> Iterator[bytes | memoryview]:
    """Any iterable of bytes → pieces of at most CHUNK_SIZE (small ones joined)."""
    pending = bytearray()
    for piece in pieces:
        if not isinstance(piece, (bytes, bytearray, memoryview)):
            raise TypeError(f"data= iterable yielded {type(piece).__name__}, not bytes")
        view = memoryview(piece).cast("B")
        if pending or len(view) < CHUNK_SIZE:
            pending += view
            while len(pending) >= CHUNK_SIZE:
                yield bytes(pending[:CHUNK_SIZE])
                del pending[:CHUNK_SIZE]
            continue
        for i in range(0, len(view), CHUNK_SIZE):
            part = view[i : i + CHUNK_SIZE]
            if len(part) == CHUNK_SIZE:
                yield part
            else:
                pending += part
    if pending:
        yield bytes(pending)


_contexts = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's zstd compressor for `level`: a context costs more to
    make (~15 µs) than a small payload costs to compress."""
    cache: dict[int, zstandard.ZstdCompressor] = _contexts.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor (its window capped at MAX_WINDOW)."""
    d: zstandard.ZstdDecompressor | None = getattr(_contexts, "decompressor", None)
    if d is None:
        d = _contexts.decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    return d


# Adaptive compression (the Rust client's `codec::adapt`): the level of
# each block is chosen from the payload rate each level achieved.
AUTO_SMALL_MAX = 64 << 10  # known sizes up to this go uncompressed with "auto"
LEVELS: list[int | None] = [None, -4, 1, 3, 7]  # None: stored blocks
_WARMUP, _FIRST_WARMUP, _WINDOW = 4, 16, 12
_MIN_WINDOW, _HOLD, _MARGIN = 0.05, 2.0, 1.03


class Adapt:
    """Hill climbing over LEVELS on measured payload bytes per second
    (including waits for the network): start at level 1, probe the
    best level's neighbours, move to a better one, hold the best for a
    while, then probe again, so a link that changes speed is followed."""

    def __init__(self) -> None:
        self.current = 2  # zstd level 1, what a payload too short to measure gets
        self.best = 2
        self.scores: list[float | None] = [None] * len(LEVELS)
        self.seen = 0
        self.warmup = _FIRST_WARMUP
        self.window_start: float | None = None
        self.window_bytes = 0
        self.hold_until: float | None = None

    def level(self) -> int | None:
        return LEVELS[self.current]

    def handed_on(self, n: int, now: float) -> None:
        """A block of `n` payload bytes was handed to the network at `now`."""
        if self.hold_until is not None:
            if now < self.hold_until:
                return
            self.hold_until = None
            self.scores = [None] * len(LEVELS)
            self._restart()
        self.seen += 1
        if self.seen <= self.warmup:
            if self.seen == self.warmup:
                self.window_start = now
            return
        self.window_bytes += n
        if self.window_start is None:
            return
        elapsed = now - self.window_start
        if self.seen < self.warmup + _WINDOW or elapsed < _MIN_WINDOW:
            return
        self.scores[self.current] = self.window_bytes / max(elapsed, 1e-9)
        self._decide(now)

    def _decide(self, now: float) -> None:
        def score(i: int) -> float:
            return self.scores[i] or 0.0

        if self.current != self.best and score(self.current) > score(self.best) * _MARGIN:
            self.best = self.current
        neighbours = [i for i in (self.best - 1, self.best + 1) if 0 <= i < len(LEVELS)]
        unmeasured = [i for i in neighbours if self.scores[i] is None]
        if unmeasured:
            self.current = unmeasured[0]
        else:
            self.current = self.best
            self.hold_until = now + _HOLD
        self._restart()

    def _restart(self) -> None:
        self.seen = 0
        self.warmup = _WARMUP
        self.window_start = None
        self.window_bytes = 0


def _stored_frame(block: bytes | memoryview) -> bytes:
    """`block` as zstd frames of one stored (raw) block each: no CPU spent."""
    view = memoryview(block).cast("B")
    out = bytearray()
    for i in range(0, len(view), FRAME_MAX):
        piece = view[i : i + FRAME_MAX]
        out += b"\x28\xb5\x2f\xfd"  # magic 0xFD2FB528, little-endian
        out.append(0b1010_0000)  # single segment, 4-byte content size
        out += len(piece).to_bytes(4, "little")
        out += (1 | (len(piece) << 3)).to_bytes(3, "little")  # the last (only) block, raw
        out += piece
    return bytes(out)


class Encoder:
    """Encodes payload blocks into `data` frames: zstd frames of at most
    FRAME_MAX bytes each (the Rust client's framing: the server decodes
    across frame boundaries, and a frame's known size bounds its window —
    the server's decoder memory for the upload), or identity.
    `level="auto"`: small payloads (a known size up to 64 KiB) uncompressed,
    larger ones at a level chosen block by block (`Adapt`). Safe to use
    from several threads: each uses its own zstd context."""

    def __init__(self, level: int | str | None, size: int | None = None) -> None:
        self.adapt: Adapt | None = None
        if level == "auto":
            small = size is not None and size <= AUTO_SMALL_MAX
            self.adapt = None if small else Adapt()
            level = None if small else 1
        elif isinstance(level, str):
            raise ValueError(f"zstd_level must be 'auto', None or a zstd level, not {level!r}")
        if level is not None:
            _compressor(level)  # a bad level fails here, before sending
        self.level = level

    @property
    def encoding(self) -> ai_pb2.Encoding:
        return ai_pb2.ENCODING_ZSTD if self.level is not None else ai_pb2.ENCODING_IDENTITY

    def encode(self, block: bytes | memoryview) -> bytes:
        level = self.adapt.level() if self.adapt is not None else self.level
        if level is None:
            return _stored_frame(block) if self.adapt is not None else bytes(block)
        view = memoryview(block).cast("B")
        compress = _compressor(level).compress
        if len(view) <= FRAME_MAX:
            return compress(view)
        return b"".join(compress(view[i : i + FRAME_MAX]) for i in range(0, len(view), FRAME_MAX))

    def handed_on(self, n: int) -> None:
        """A block of `n` payload bytes left for the network: what an
        adaptive encoder's next level is chosen by."""
        if self.adapt is not None:
            self.adapt.handed_on(n, time.monotonic())


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


def metadata(func: str, upstream: str | None, call_id: str) -> list[tuple[str, str]]:
    md = [(FUNC_NAME_KEY, func), (CALL_ID_KEY, call_id)]
    if upstream:
        md.append((UPSTREAM_KEY, upstream))
    return md


_propagate: Any = None  # opentelemetry.propagate once looked up; False when not installed


def trace_context() -> list[tuple[str, str]]:
    """The current OpenTelemetry context's `traceparent` (and `tracestate`)
    when the `opentelemetry-api` package is installed and a span is current;
    none otherwise. The runtime continues that trace."""
    global _propagate
    if _propagate is None:
        try:
            from opentelemetry import propagate

            _propagate = propagate
        except ImportError:
            _propagate = False
    if not _propagate:
        return []
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


# -- the result ---------------------------------------------------------------


class Sink:
    """Where a result payload goes: memory, a binary file object, or a path
    written under a temporary name and renamed when complete."""

    def __init__(self, out: Out) -> None:
        self.out = out
        self.path: Path | None = None
        if out is not None and not hasattr(out, "write"):
            self.path = Path(os.fspath(out))
            parent = self.path.parent
            if not parent.is_dir():
                raise FileNotFoundError(f"out={out}: directory {parent} does not exist")
            if not os.access(parent, os.W_OK):
                raise PermissionError(f"out={out}: directory {parent} is not writable")
        self._file: IO[bytes] | None = None
        self._tmp: str | None = None
        self._memory: io.BytesIO | None = None

    def open(self) -> None:
        if self.path is not None:
            fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".part")
            self._file = os.fdopen(fd, "wb")
        elif self.out is not None:
            self._file = self.out  # type: ignore[assignment]
        else:
            self._memory = io.BytesIO()
            self._file = self._memory

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)

    def commit(self) -> bytes | None:
        """Makes the written payload visible; returns it when kept in memory."""
        if self._tmp is not None and self._file is not None and self.path is not None:
            self._file.close()
            os.replace(self._tmp, self.path)
            self._tmp = None
        return self._memory.getvalue() if self._memory is not None else None

    def discard(self) -> None:
        """Drops a partial payload (a failed or retried attempt)."""
        if self._tmp is not None:
            if self._file is not None:
                self._file.close()
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._tmp = None
        elif self.path is None and self.out is not None and self._file is not None:
            raise CallError(
                "ABORTED",
                "the result payload was partly written to the given file object and cannot be taken back",
            )
        self._file = None
        self._memory = None


class Receiver:
    """Turns the server's replies into progress, a result and a written
    result payload, checking the payload against its announced size."""

    def __init__(
        self,
        sink: Sink,
        on_progress: ProgressCallback | None,
        started: float,
        attempt: int,
        on_result: ResultCallback | None = None,
    ) -> None:
        self.sink = sink
        self.on_progress = on_progress
        self.on_result = on_result
        self.started = started
        self.attempt = attempt
        self.phase: str | None = None
        self.saw_running = False
        self.accepted = False
        self.sent = 0
        self.acked = 0
        self.queue_position = 0
        self.fraction: float | None = None
        self.message = ""
        self.value: Any = None
        self.have_result = False
        self.payload_size: int | None = None
        self.written = 0
        self._decoder: Any = None
        # The first heartbeat: where a resumed upload continues (RECEIVING),
        # or None when the server attached instead.
        self.resume_offset: int | None = None
        self.first = threading.Event()

    def progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(
                Progress(
                    phase=self.phase or "RECEIVING",
                    elapsed=time.monotonic() - self.started,
                    sent_bytes=self.sent,
                    received_bytes=self.acked,
                    queue_position=self.queue_position,
                    fraction=self.fraction,
                    message=self.message,
                    result_bytes=self.written,
                    attempt=self.attempt,
                )
            )

    def sent_block(self, n: int) -> None:
        self.sent += n
        self.progress()

    def reply(self, reply: ai_pb2.Reply) -> None:
        kind = reply.WhichOneof("kind")
        if kind == "heartbeat":
            hb = reply.heartbeat
            if not self.first.is_set():
                if hb.phase == ai_pb2.PHASE_RECEIVING:
                    self.resume_offset = hb.received_bytes
                    self.sent = hb.received_bytes
                self.first.set()
            self.accepted = True
            self.phase = PHASES.get(hb.phase, self.phase)
            if self.phase == "RUNNING":
                self.saw_running = True
            self.acked = max(self.acked, hb.received_bytes)
            self.queue_position = hb.queue_position
            if hb.HasField("progress"):
                self.fraction = hb.progress
            if hb.message:
                self.message = hb.message
            self.progress()
        elif kind == "result":
            if self.have_result:
                raise protocol_error("the server sent a second result")
            r = reply.result
            self.first.set()
            self.accepted = True
            self.saw_running = True
            try:
                self.value = json.loads(r.json) if r.json else None
            except ValueError as e:
                raise protocol_error(f"the result is not JSON: {e}") from e
            self.have_result = True
            if r.HasField("payload_size"):
                self.payload_size = r.payload_size
                if r.encoding == ai_pb2.ENCODING_ZSTD:
                    # Across frames: the payload may be many zstd frames (the
                    # default stops after the first and truncates silently).
                    self._decoder = _decompressor().decompressobj(read_across_frames=True)
                elif r.encoding != ai_pb2.ENCODING_IDENTITY:
                    raise protocol_error(f"unknown result encoding {r.encoding}")
                self.phase = "SENDING"
                self.sink.open()
            if self.on_result is not None:
                self.on_result(self.value, self.payload_size)
        elif kind == "data":
            if self.payload_size is None:
                raise protocol_error("payload data without a result announcing it")
            chunk = reply.data
            if self._decoder is not None:
                try:
                    chunk = self._decoder.decompress(chunk)
                except zstandard.ZstdError as e:
                    raise CallError("DATA_LOSS", f"the result payload is not valid zstd: {e}") from e
            self.written += len(chunk)
            if self.written > self.payload_size:
                raise CallError(
                    "DATA_LOSS",
                    f"the result payload is larger than the {self.payload_size} bytes announced",
                )
            if chunk:
                self.sink.write(chunk)
        else:
            raise protocol_error(f"unknown reply kind {kind!r}")

    def finish(self, call_id: str, attempts: int) -> Result:
        if not self.have_result:
            raise protocol_error("the server ended the call without a result")
        if self.payload_size is not None and self.written != self.payload_size:
            raise CallError(
                "DATA_LOSS",
                f"the result payload has {self.written} bytes, the server announced {self.payload_size}",
            )
        payload = self.sink.commit() if self.payload_size is not None else None
        return Result(
            value=self.value, payload=payload, payload_size=self.payload_size, call_id=call_id, attempts=attempts
        )


def protocol_error(message: str) -> CallError:
    return CallError("UNKNOWN", f"the server broke the protocol: {message}")


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
            metadata=metadata(func, upstream, call_id) + (auth or []) + trace_context(),
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


def stubs(channel: Any) -> tuple[Any, Any, Any, Any]:
    """The chaos, describe, health-check and attach callables on a grpc
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
    return chaos, describe, health, attach


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
        self._chaos, self._describe, self._health, self._attach = stubs(self._channel)

    def _open(self, target: str, options: list[tuple[str, Any]], creds: grpc.ChannelCredentials | None) -> Any:
        raise NotImplementedError

    def _md(self) -> list[tuple[str, str]]:
        """Metadata of describe and health: the upstream and the token."""
        return ([(UPSTREAM_KEY, self.upstream)] if self.upstream else []) + self._auth

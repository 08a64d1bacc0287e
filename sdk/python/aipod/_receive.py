"""Replies on the way in: the sink a result payload is written to, and the
receiver that turns heartbeats, the result and its payload into progress
and a `Result`."""

from __future__ import annotations

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import zstandard

from ._proto import ai_pb2
from .types import CallError, Progress, Result
from ._wire import Out, PHASES, ProgressCallback, ResultCallback, protocol_error
from ._payload import _decompressor


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

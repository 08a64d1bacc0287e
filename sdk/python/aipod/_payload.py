"""A call's payload on the way out: the source (bytes, a file, an
iterable), its re-reads for a retry, and the encoder that frames it in
zstd (per 128 KiB, at a level `Adapt` picks for the link) or stores it."""

from __future__ import annotations

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import zstandard

from ._proto import ai_pb2
from ._wire import CHUNK_SIZE, Data, FRAME_MAX, MAX_WINDOW


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

"""The asyncio client: `await AsyncClient(target).call(func, file=…)`.

The same calls, rules and results as `aipod.Client`, on grpc.aio, for
asyncio applications (FastAPI, aiohttp). Reading and compressing the payload
and writing the result payload run in the default executor, so the event
loop never waits on the disk or on zstd.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2

from . import _call
from ._call import Attempts, Data, Encoder, Out, Payload, ProgressCallback, Receiver, ResultCallback, Sink
from ._proto import ai_pb2
from .types import CallError, Result, RetryPolicy


async def _encoded(
    payload: Payload, encoder: Encoder, loop: asyncio.AbstractEventLoop
) -> AsyncIterator[tuple[bytes, int]]:
    """The payload's encoded chunks and their sizes; reading and compressing
    run in the executor."""
    if payload.aiterable is not None:
        async for block in payload.ablocks():
            yield await loop.run_in_executor(None, encoder.encode, block), len(block)
        return
    blocks = payload.blocks()

    def next_chunk() -> tuple[bytes, int] | None:
        block = next(blocks, None)
        return None if block is None else (encoder.encode(block), len(block))

    try:
        while (item := await loop.run_in_executor(None, next_chunk)) is not None:
            yield item
    finally:
        await loop.run_in_executor(None, blocks.close)


class AsyncClient:
    """`aipod.Client` for asyncio: the same arguments, coroutine methods.

    Create it inside the event loop that uses it; close it with
    ``await client.close()`` or ``async with``.
    """

    def __init__(
        self,
        target: str,
        upstream: str | None = None,
        version: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self.target = _call.parse_target(target)
        self.upstream = upstream
        self.version = version
        self.retry = retry or RetryPolicy()
        self._channel = grpc.aio.insecure_channel(self.target, options=_call.CHANNEL_OPTIONS + list(options or []))
        self._chaos = self._channel.stream_stream(
            _call.CHAOS_PATH,
            request_serializer=ai_pb2.Frame.SerializeToString,
            response_deserializer=ai_pb2.Reply.FromString,
        )
        self._describe = self._channel.unary_unary(
            _call.DESCRIBE_PATH,
            request_serializer=ai_pb2.DescribeRequest.SerializeToString,
            response_deserializer=ai_pb2.Description.FromString,
        )
        self._health = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )

    async def call(
        self,
        func: str,
        kwargs: dict[str, Any] | None = None,
        *,
        file: str | os.PathLike[str] | None = None,
        data: Data | None = None,
        out: Out = None,
        timeout: float | None = None,
        progress: ProgressCallback | None = None,
        on_result: ResultCallback | None = None,
        call_id: str | None = None,
        idempotent: bool = False,
        zstd_level: int | None = 1,
        version: str | None = None,
        upstream: str | None = None,
    ) -> Result:
        """See `aipod.Client.call`; `data=` may also be an async iterable of
        bytes (a web request's body). Cancelling the task cancels the call
        (the server stops the model)."""
        if not func:
            raise ValueError("func must name a function")
        kwargs_json = _call.kwargs_bytes(kwargs)
        payload = Payload.of(file, data)
        sink = Sink(out)
        call_id = call_id or _call.new_call_id()
        encoder = Encoder(zstd_level)
        md = _call.metadata(func, upstream or self.upstream, call_id)
        attempts = Attempts(self.retry, timeout)
        while True:
            attempts.n += 1
            left = attempts.remaining()
            if left is not None and left <= 0:
                raise attempts.deadline_error(call_id)
            receiver = Receiver(sink, progress, attempts.started, attempts.n, on_result)
            header = _call.header_frame(func, version or self.version, kwargs_json, payload, encoder, call_id)
            try:
                await self._attempt(header, payload, encoder, receiver, md, left)
                return await asyncio.get_running_loop().run_in_executor(None, receiver.finish, call_id, attempts.n)
            except grpc.RpcError as e:
                err = _call.rpc_error(e, self.target, receiver)
            except CallError as e:
                err = e
            sink.discard()
            wait = attempts.next_wait(err) if _call.should_retry(err, receiver, payload, idempotent) else None
            if wait is None:
                raise attempts.give_up(err, call_id) from None
            await asyncio.sleep(wait)

    async def _attempt(
        self,
        header: ai_pb2.Frame,
        payload: Payload,
        encoder: Encoder,
        receiver: Receiver,
        md: list[tuple[str, str]],
        timeout: float | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        read_error: list[BaseException] = []

        async def frames() -> AsyncIterator[ai_pb2.Frame]:
            yield header
            try:
                async for data, n in _encoded(payload, encoder, loop):
                    yield ai_pb2.Frame(data=data)
                    receiver.sent_block(n)
            except (OSError, TypeError, ValueError) as e:
                # Never half-close a payload that could not be read.
                read_error.append(e)
                call.cancel()

        call = self._chaos(frames(), metadata=md, timeout=timeout)
        try:
            async for reply in call:
                if reply.WhichOneof("kind") == "data":
                    # Decoding and writing touch zstd and the disk.
                    await loop.run_in_executor(None, receiver.reply, reply)
                else:
                    receiver.reply(reply)
        except (grpc.RpcError, asyncio.CancelledError):
            if read_error:
                raise read_error[0] from None
            call.cancel()
            raise
        except BaseException:
            call.cancel()
            raise
        if read_error:
            raise read_error[0]

    async def describe(self, timeout: float | None = 30.0) -> dict[str, Any]:
        """See `aipod.Client.describe`."""
        try:
            reply = await self._describe(ai_pb2.DescribeRequest(), timeout=timeout, metadata=self._md())
        except grpc.RpcError as e:
            raise _call.rpc_error(e, self.target, None) from None
        return _call.describe_dict(reply)

    async def health(self, service: str = "ai.AI", timeout: float | None = 10.0) -> str:
        """See `aipod.Client.health`."""
        try:
            reply = await self._health(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=self._md()
            )
        except grpc.RpcError as e:
            raise _call.rpc_error(e, self.target, None) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def _md(self) -> list[tuple[str, str]]:
        return [(_call.UPSTREAM_KEY, self.upstream)] if self.upstream else []

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

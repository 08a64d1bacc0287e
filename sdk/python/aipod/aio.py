"""The asyncio client: `await AsyncClient(target).call(func, file=…)`.

The same calls, rules and results as `aipod.Client`, on grpc.aio, for
asyncio applications (FastAPI, aiohttp). Reading and compressing the payload
and writing the result payload run in the default executor, so the event
loop never waits on the disk or on zstd. A small call in one message that
is the client's only call runs on a thread of the client's own (`_lane`).
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

from . import _call, _lane
from ._call import Data, Encoder, Out, Payload, Plan, ProgressCallback, Receiver, ResultCallback
from ._proto import ai_pb2
from .client import blocking_channel
from .types import CallError, Result


def _off_loop(receiver: Receiver, reply: ai_pb2.Reply) -> bool:
    """Whether handing `reply` to the receiver belongs off the loop: writing
    to a file or the caller's object (which may block), or decoding a big
    piece. (A plain test, not a coroutine per reply.)"""
    return reply.WhichOneof("kind") == "data" and (receiver.sink.out is not None or len(reply.data) > _call.INLINE_MAX)


async def _encoded(
    payload: Payload, encoder: Encoder, loop: asyncio.AbstractEventLoop, offset: int = 0
) -> AsyncIterator[tuple[bytes, int]]:
    """The payload's encoded chunks and their sizes, from byte `offset`;
    reading and compressing run in the executor."""
    if payload.aiterable is not None:
        async for block in payload.ablocks():
            yield await loop.run_in_executor(None, encoder.encode, block), len(block)
        return
    blocks = payload.blocks(offset)

    def next_chunk() -> tuple[bytes, int] | None:
        block = next(blocks, None)
        return None if block is None else (encoder.encode(block), len(block))

    try:
        while (item := await loop.run_in_executor(None, next_chunk)) is not None:
            yield item
    finally:
        await loop.run_in_executor(None, blocks.close)


class AsyncClient(_call.ClientBase):
    """`aipod.Client` for asyncio: the same arguments, coroutine methods.

    `lone_thread` (default True): a call in one message (a small payload
    in memory) made while the client has no other call in flight runs on a
    thread of the client's own, on a blocking grpcio channel (a second
    connection) — grpc.aio's hand-offs to the event loop cost a lone small
    call more than its trip to the server. Callbacks still run on the
    event loop; concurrent calls go by grpc.aio, which is faster for them.
    While such calls answer within 1 ms, a call without callbacks is waited
    for on the event loop's thread, for at most 2 ms (then the loop turns
    as usual): the loop is held that long at most.

    Create it inside the event loop that uses it; close it with
    ``await client.close()`` or ``async with``.
    """

    def __init__(self, target: str, *args: Any, lone_thread: bool = True, **kwargs: Any) -> None:
        self._lone_thread = lone_thread
        self._in_flight = 0  # calls in `_run`
        super().__init__(target, *args, **kwargs)

    def _open(self, target: str, options: list[tuple[str, Any]], creds: grpc.ChannelCredentials | None) -> Any:
        self._lane = _lane.Lane(lambda: blocking_channel(target, options, creds))
        if creds is not None:
            return grpc.aio.secure_channel(target, creds, options=options)
        return grpc.aio.insecure_channel(target, options=options)

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
        zstd_level: int | str | None = "auto",
        version: str | None = None,
        upstream: str | None = None,
        retain: float | None = None,
    ) -> Result:
        """See `aipod.Client.call`; `data=` may also be an async iterable of
        bytes (a web request's body). Cancelling the task cancels the call
        (the server stops the model) — unless it is retained."""
        plan = Plan.make(
            func, kwargs, file=file, data=data, out=out, timeout=timeout, progress=progress, on_result=on_result,
            call_id=call_id, idempotent=idempotent, zstd_level=zstd_level, version=version or self.version,
            upstream=upstream or self.upstream, retry=self.retry, auth=self._auth, retain=retain,
        )
        return await self._run(plan)

    async def attach(
        self,
        call_id: str,
        *,
        out: Out = None,
        timeout: float | None = None,
        progress: ProgressCallback | None = None,
        on_result: ResultCallback | None = None,
        upstream: str | None = None,
        patience: float = 3600.0,
    ) -> Result:
        """See `aipod.Client.attach`."""
        plan = Plan.attach(
            call_id, out=out, timeout=timeout, progress=progress, on_result=on_result,
            upstream=upstream or self.upstream, retry=self.retry, auth=self._auth, patience=patience,
        )
        return await self._run(plan)

    async def _run(self, plan: Plan) -> Result:
        self._in_flight += 1  # the call and the waits between its attempts
        try:
            while True:
                header, receiver, left = plan.start_attempt()
                try:
                    if plan.mode == "attach":
                        await self._follow(plan.call_id, receiver, plan.metadata, left)
                    else:
                        await self._attempt(header, plan.payload, plan.encoder, receiver, plan.metadata, left)
                    if plan.sink.out is None:
                        return plan.finish(receiver)
                    return await asyncio.get_running_loop().run_in_executor(None, plan.finish, receiver)
                except grpc.RpcError as e:
                    err = _call.rpc_error(e, self.target, receiver)
                except CallError as e:
                    err = e
                await asyncio.sleep(plan.failed(err, receiver))
        finally:
            self._in_flight -= 1

    async def _follow(self, call_id: str, receiver: Receiver, md: list[tuple[str, str]], timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        call = self._attach(ai_pb2.AttachRequest(call_id=call_id), metadata=md, timeout=timeout)
        try:
            async for reply in call:
                if reply.WhichOneof("kind") == "data":
                    await loop.run_in_executor(None, receiver.reply, reply)
                else:
                    receiver.reply(reply)
        except BaseException:
            call.cancel()
            raise

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
        answered = asyncio.Event()

        async def frames() -> AsyncIterator[ai_pb2.Frame]:
            yield header
            # A streamed payload waits for the server's first reply (the
            # heartbeat that accepts the header): a refused call sends no
            # payload, and grpc.aio never races a refusal against frames
            # still going out (which could turn the server's status into
            # INTERNAL). A server with heartbeats off gets the payload after
            # ACCEPT_WAIT anyway.
            offset = 0
            if resume:
                # From the offset the server's first heartbeat names; none
                # when the server attached instead.
                await answered.wait()
                if receiver.resume_offset is None:
                    return
                offset = receiver.resume_offset
            try:
                await asyncio.wait_for(answered.wait(), _call.ACCEPT_WAIT)
            except asyncio.TimeoutError:
                pass
            try:
                async for data, n in _encoded(payload, encoder, loop, offset):
                    yield ai_pb2.Frame(data=data)
                    encoder.handed_on(n)
                    receiver.sent_block(n)
            except (OSError, TypeError, ValueError) as e:
                # Never half-close a payload that could not be read.
                read_error.append(e)
                call.cancel()

        resume = header.header.HasField("resume_from")
        if _call.fits_one_message(header, payload) and await self._has_one_message(md):
            one = _call.one_message(header, payload, encoder)
            try:
                await self._attempt_one(one, len(payload.data or b""), receiver, md, timeout)
                return
            except grpc.RpcError as e:
                if not _call.method_missing(e):
                    raise
                # A server without `call` behind the same upstream: chaos
                # from now on, this call first.
                self._remember_one_message(md, None)
        if payload.data is not None and len(payload.data) <= _call.INLINE_MAX and not resume:
            # Small and in memory: every frame made now, handed over as a
            # plain iterator (cheaper for grpc.aio than an async generator).
            requests: Any = [header] + [ai_pb2.Frame(data=encoder.encode(b)) for b in payload.blocks()]
            receiver.sent_block(len(payload.data))
        else:
            requests = frames()
        call = self._chaos(requests, metadata=md, timeout=timeout)
        try:
            async for reply in call:
                if _off_loop(receiver, reply):
                    await loop.run_in_executor(None, receiver.reply, reply)
                else:
                    receiver.reply(reply)
                answered.set()
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

    async def _attempt_one(
        self, one: ai_pb2.Call, size: int, receiver: Receiver, md: list[tuple[str, str]], timeout: float | None
    ) -> None:
        """The call in one message: one request, no request stream; on the
        lane when it is the client's only call."""
        lone = self._lone_thread and self._in_flight == 1
        watched = receiver.on_progress is not None or receiver.on_result is not None
        call = (lone and self._lane.call(one, md, timeout, watched)) or self._call(one, metadata=md, timeout=timeout)
        if isinstance(call, _lane.LaneCall) and not watched and self._lane.quick and call.wait_here(_lane.WAIT_HERE):
            self._lane.answered_here += 1
        try:
            async for reply in call:
                if size:
                    receiver.sent_block(size)  # the payload went with the header
                    size = 0
                if _off_loop(receiver, reply):
                    await asyncio.get_running_loop().run_in_executor(None, receiver.reply, reply)
                else:
                    receiver.reply(reply)
        except BaseException:
            call.cancel()
            raise

    async def _has_one_message(self, md: list[tuple[str, str]]) -> bool:
        known = self._one_message.get(self._upstream_of(md))
        if known is not None:
            return known
        try:
            description = await self._describe(
                ai_pb2.DescribeRequest(), timeout=10.0, metadata=_call.describe_metadata(md)
            )
        except grpc.RpcError:
            description = None
        return self._remember_one_message(md, description)

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

    async def close(self) -> None:
        """Closes the channels; calls in flight are cancelled."""
        self._lane.close()
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

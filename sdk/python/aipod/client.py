"""The blocking client: `Client(target).call(func, file=…, out=…)`.

One grpc channel per client, shared by calls from any number of threads.
The payload is read, compressed and sent chunk by chunk by a feeder thread
(zstd releases the GIL, so compression overlaps the network), and the
result payload is decoded and written as it arrives: memory stays bounded
for any payload size.

A small payload in memory goes in one message by the one-message `call`
method when the server has it (`describe`'s features, asked once per
upstream): grpcio's blocking API runs a thread per streaming request to
feed it, and `call` has no request stream — that thread was the cost of
every small call. Its replies are read in the calling thread (grpcio's
single-threaded unary-stream calls), not by a thread grpcio would start
for each call to drive the channel.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import grpc
import grpc.experimental
from grpc_health.v1 import health_pb2

from . import _call
from ._call import Data, Encoder, Out, Payload, Plan, ProgressCallback, Receiver, ResultCallback
from ._proto import ai_pb2
from .types import CallError, Result

_FEED_DEPTH = 4  # encoded chunks buffered ahead of the network


def blocking_channel(target: str, options: list[tuple[str, Any]], creds: grpc.ChannelCredentials | None) -> Any:
    """A blocking grpcio channel whose `call` and `attach` replies are read
    by the thread that iterates them."""
    options = [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1), *options]
    if creds is not None:
        return grpc.secure_channel(target, creds, options=options)
    return grpc.insecure_channel(target, options=options)


class Client(_call.ClientBase):
    """A connection to an aipod runtime (or a router in front of several).

    `target` is ``"host:port"``, ``"http://host:port"`` or
    ``"https://host:port"`` (TLS: `ca` is the CA certificate file to trust,
    default the system's roots; `cert` and `key` a client certificate for
    mutual TLS); `upstream` is sent
    as ``x-upstream`` on every call (routers pick the backend by it);
    `version` picks the model version (default: the server's default).
    """

    def _open(self, target: str, options: list[tuple[str, Any]], creds: grpc.ChannelCredentials | None) -> Any:
        return blocking_channel(target, options, creds)

    def call(
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
        """Runs `func` on the model with `kwargs` and the payload from
        `file` or `data`; returns the Result, or raises CallError.

        `retain` (seconds) retains the call: if the connection breaks after
        the server accepted it, the model keeps running and this client
        reattaches — or resumes the upload from the offset the server
        holds, for re-readable payloads — by itself until `timeout` (or the
        retain time since the last contact) passes; `attach(call_id)` picks
        it up from another process.

        The result payload goes to `out` (a path, written complete or not at
        all, or a binary file object), else into `Result.payload`. `timeout`
        bounds the whole call, retries included. `progress` is called on
        every heartbeat and upload step (from a feeder thread during the
        upload); `on_result` once with the JSON value and the result
        payload's size when the result arrives, before its payload. Refused
        calls are retried by the client's RetryPolicy.
        """
        plan = Plan.make(
            func, kwargs, file=file, data=data, out=out, timeout=timeout, progress=progress, on_result=on_result,
            call_id=call_id, idempotent=idempotent, zstd_level=zstd_level, version=version or self.version,
            upstream=upstream or self.upstream, retry=self.retry, auth=self._auth, retain=retain,
        )
        if plan.payload.aiterable is not None:
            raise TypeError("data= is an async iterable: call it with AsyncClient")
        return self._run(plan)

    def attach(
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
        """Picks up the retained call `call_id` (started with `retain=` by
        the same token, from any process): its heartbeats, then its Result
        and result payload into `out`. A broken stream is reattached for up
        to `patience` seconds; NOT_FOUND when the server does not hold it."""
        plan = Plan.attach(
            call_id, out=out, timeout=timeout, progress=progress, on_result=on_result,
            upstream=upstream or self.upstream, retry=self.retry, auth=self._auth, patience=patience,
        )
        return self._run(plan)

    def _run(self, plan: Plan) -> Result:
        while True:
            header, receiver, left = plan.start_attempt()
            try:
                if plan.mode == "attach":
                    self._follow(plan.call_id, receiver, plan.metadata, left)
                else:
                    self._attempt(header, plan.payload, plan.encoder, receiver, plan.metadata, left)
                return plan.finish(receiver)
            except grpc.RpcError as e:
                err = _call.rpc_error(e, self.target, receiver)
            except CallError as e:
                err = e
            time.sleep(plan.failed(err, receiver))

    def _follow(self, call_id: str, receiver: Receiver, md: list[tuple[str, str]], timeout: float | None) -> None:
        replies = self._attach(ai_pb2.AttachRequest(call_id=call_id), metadata=md, timeout=timeout)
        try:
            for reply in replies:
                receiver.reply(reply)
        except BaseException:
            replies.cancel()
            raise

    def _attempt(
        self,
        header: ai_pb2.Frame,
        payload: Payload,
        encoder: Encoder,
        receiver: Receiver,
        md: list[tuple[str, str]],
        timeout: float | None,
    ) -> Receiver:
        if _call.fits_one_message(header, payload) and self._has_one_message(md):
            one = _call.one_message(header, payload, encoder)
            try:
                return self._attempt_one(one, len(payload.data or b""), receiver, md, timeout)
            except grpc.RpcError as e:
                if not _call.method_missing(e):
                    raise
                # A server without `call` behind the same upstream: chaos
                # from now on, this call first.
                self._remember_one_message(md, None)
        feeder = _Feeder(header, payload, encoder, receiver)
        replies = self._chaos(iter(feeder), metadata=md, timeout=timeout)
        feeder.call = replies
        try:
            for reply in replies:
                feeder.answered.set()
                receiver.reply(reply)
            feeder.raise_error()
            return receiver
        except grpc.RpcError:
            feeder.raise_error()  # reading the payload failed: that is the cause
            raise
        except BaseException:
            replies.cancel()
            raise
        finally:
            feeder.close()

    def _attempt_one(
        self, one: ai_pb2.Call, size: int, receiver: Receiver, md: list[tuple[str, str]], timeout: float | None
    ) -> Receiver:
        """The call in one message: no request stream, so no feeder and no
        thread of grpcio's to consume one."""
        replies = self._call(one, metadata=md, timeout=timeout)
        try:
            for reply in replies:
                if size:
                    receiver.sent_block(size)  # the payload went with the header
                    size = 0
                receiver.reply(reply)
            return receiver
        except BaseException:
            replies.cancel()
            raise

    def _has_one_message(self, md: list[tuple[str, str]]) -> bool:
        known = self._one_message.get(self._upstream_of(md))
        if known is not None:
            return known
        try:
            description = self._describe(ai_pb2.DescribeRequest(), timeout=10.0, metadata=_call.describe_metadata(md))
        except grpc.RpcError:
            description = None
        return self._remember_one_message(md, description)

    def describe(self, timeout: float | None = 30.0) -> dict[str, Any]:
        """What the server serves: versions, functions, limits (the
        `describe` RPC's fields, as a dict)."""
        try:
            return _call.describe_dict(self._describe(ai_pb2.DescribeRequest(), timeout=timeout, metadata=self._md()))
        except grpc.RpcError as e:
            raise _call.rpc_error(e, self.target, None) from None

    def health(self, service: str = "ai.AI", timeout: float | None = 10.0) -> str:
        """The health status of `service` (``"ai.AI"``: ready for calls;
        ``""``: the process is alive): ``"SERVING"``, ``"NOT_SERVING"``, …"""
        try:
            reply = self._health(health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=self._md())
        except grpc.RpcError as e:
            raise _call.rpc_error(e, self.target, None) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _Feeder:
    """Reads and encodes the payload in its own thread, a few chunks ahead
    of grpc's sending thread, which iterates this object for frames."""

    _END = object()

    def __init__(self, header: ai_pb2.Frame, payload: Payload, encoder: Encoder, receiver: Receiver) -> None:
        self.header = header
        self.payload = payload
        self.encoder = encoder
        self.receiver = receiver
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=_FEED_DEPTH)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.call: Any = None
        self.offset = 0
        # Set on the server's first reply (its heartbeat accepts the header).
        self.answered = threading.Event()

    def __iter__(self) -> Iterator[ai_pb2.Frame]:
        yield self.header
        offset = 0
        if self.header.header.HasField("resume_from"):
            # A resume: the payload goes from the offset the server's first
            # heartbeat names; none when the server attached instead.
            while not self.receiver.first.wait(0.1):
                if self.stop.is_set():
                    return
            if self.receiver.resume_offset is None:
                return
            offset = self.receiver.resume_offset
        if self.payload.size == 0 and self.payload.iterable is None and self.payload.fileobj is None:
            return
        self.offset = offset
        if self.payload.data is not None and len(self.payload.data) <= _call.INLINE_MAX:
            # A small payload in memory: encoded right here, no thread.
            for block in self.payload.blocks(offset):
                yield ai_pb2.Frame(data=self.encoder.encode(block))
                self.receiver.sent_block(len(block))
            return
        thread = threading.Thread(target=self._run, name="aipod-feeder", daemon=True)
        thread.start()
        self.thread = thread  # only once started: close() may run concurrently
        # A streamed payload goes out once the server accepted the header
        # (a refused call sends none of it); the feeder reads ahead meanwhile.
        # A server with heartbeats off gets it after ACCEPT_WAIT anyway.
        self.answered.wait(_call.ACCEPT_WAIT)
        while True:
            item = self.queue.get()
            if item is self._END:
                if self.error is not None and self.call is not None:
                    # Never half-close a payload that could not be read: the
                    # server would take the truncated part for the whole.
                    self.call.cancel()
                return
            data, n = item
            yield ai_pb2.Frame(data=data)
            self.receiver.sent_block(n)

    def _run(self) -> None:
        try:
            for block in self.payload.blocks(self.offset):
                if not self._put((self.encoder.encode(block), len(block))):
                    return
                self.encoder.handed_on(len(block))
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            self.error = e
        self._put(self._END)

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def raise_error(self) -> None:
        """Re-raises what reading the payload raised (an OSError, a TypeError
        from a bad iterable), in the caller's thread."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)

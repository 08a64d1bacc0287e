"""A lone small call of the asyncio client, on a thread of the client's own.

grpc.aio hands every completion of a call (its start, each reply, its
status) from grpc's poller thread to the event loop, each with futures and
tasks of its own; for a call in one message that answers at once, that is
most of what the call costs the client. The lane is one thread running such
a call on a blocking grpcio channel whose unary-stream replies are read by
the thread that iterates them (no hop inside grpcio): it reads the replies
and hands them to the event loop in batches, one wake-up for all that have
arrived — or, when no callback watches the call, one at its end (or when
`_AHEAD` replies wait). Everything else a call does — progress and result callbacks,
decoding, writing the result — still runs on the event loop.

Only a call that is alone gets the lane: measured, with a second call in
flight the lane's thread and the event loop take turns at the GIL and both
calls are slower than on grpc.aio, which batches the completions of many
calls into one turn of the loop. A call that finds the lane busy (a long
model holds it for as long as it runs) goes by grpc.aio, so no call ever
waits for it. The lane reads at most `_AHEAD` replies ahead of the event
loop, so a large result streams through instead of piling up in memory.

While lone calls come back fast (the last one within half of `WAIT_HERE`,
2 ms), the event loop's thread waits for the answer itself, up to
`WAIT_HERE`, instead of turning the loop and being woken by the lane: the
answer is taken with no wake-up across threads. The loop is never held
longer than that; a call that takes longer is followed as above.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ._proto import ai_pb2
from ._wire import stubs

_AHEAD = 4  # replies the lane reads ahead of the event loop
# The longest the event loop's thread waits for a lone call's answer on the
# lane (`LaneCall.wait_here`), and only while the last one took at most
# half of it: a loop is never held longer than this, and only when calls
# answer faster than a turn of it costs.
WAIT_HERE = 0.002
_END = object()  # the last item of a call that ended OK


class LaneCall:
    """A call running on the lane, as the event loop sees it: an async
    iterator of its replies (raising the call's error) and `cancel()`, like
    a grpc.aio unary-stream call."""

    def __init__(self, loop: asyncio.AbstractEventLoop, replies: Any, eager: bool = True) -> None:
        self._loop = loop
        self._replies = replies  # grpcio's blocking call, iterated by the lane
        # Whether each reply wakes the loop (someone watches progress), or
        # only the end and a full `_AHEAD` do: one wake-up for a small call.
        self._eager = eager
        self._items: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._ahead = 0  # replies handed over and not yet taken
        self._gate: threading.Lock | None = None  # the lane waits on it for room
        self._wake_due = False
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._ended = False
        # The event loop's thread waits for the lane here (`wait_here`):
        # the lane sets `_here` instead of waking the loop.
        self._waiting_here = False
        self._here = threading.Event()
        self.started = time.monotonic()

    # -- the lane's side ------------------------------------------------------

    def read(self) -> Any:
        """Reads the replies until the call ends, handing each over; the
        last item, to hand over with `end` once the lane is free again."""
        try:
            replies = iter(self._replies)
            while True:
                self._wait_for_room()  # room first: at most _AHEAD replies read ahead of the loop
                reply = next(replies, None)
                if reply is None or not self._put(reply, reply=True):
                    return _END
        except BaseException as e:  # the call's error (grpc.RpcError), or the lane's
            return e

    def _wait_for_room(self) -> None:
        with self._lock:
            if self._ahead < _AHEAD or self._closed:
                return
            gate = self._gate = threading.Lock()
            gate.acquire()
        gate.acquire()  # released when the loop takes a reply, or the call is cancelled

    def end(self, last: Any) -> None:
        self._put(last)

    def _put(self, item: Any, reply: bool = False) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._items.append(item)
            self._ahead += reply
            if self._wake_due or (reply and not self._eager and self._ahead < _AHEAD):
                return True
            if self._waiting_here:
                self._here.set()
                return True
            self._wake_due = True
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: nobody is waiting
            return False
        return True

    # -- the event loop's side ------------------------------------------------

    def wait_here(self, bound: float) -> bool:
        """Waits on this (the event loop's) thread, at most `bound` seconds,
        for the lane to hand the replies over (for a call nobody watches:
        its end, or `_AHEAD` replies): a call that answers within it is
        taken with no wake-up of the loop and no turn of it. Whether it
        was."""
        with self._lock:
            if self._wake_due or self._closed:
                return False  # handed over already: the loop is woken
            self._waiting_here = True
        self._here.wait(bound)
        with self._lock:
            self._waiting_here = False
            # Set under the lock by a hand-over that saw this wait: no
            # wake-up was asked of the loop for it.
            return self._here.is_set()

    def _wake(self) -> None:
        with self._lock:
            self._wake_due = False
            waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> LaneCall:
        return self

    async def __anext__(self) -> ai_pb2.Reply:
        while True:
            if self._ended:
                raise StopAsyncIteration
            with self._lock:
                if self._items:
                    item = self._items.popleft()
                    if isinstance(item, ai_pb2.Reply):
                        self._ahead -= 1  # room for the lane's next read
                    gate, self._gate = self._gate, None
                    break
                waiter = self._waiter = self._loop.create_future()
            await waiter
        if item is _END:
            self._ended = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if gate is not None:
            gate.release()
        return item  # type: ignore[no-any-return]

    def cancel(self) -> None:
        """Cancels the call (the server stops the model); the lane stops
        reading it."""
        with self._lock:
            self._closed = True
            gate, self._gate = self._gate, None
        if gate is not None:
            gate.release()  # a lane waiting for room sees the call closed
        self._replies.cancel()


class Lane:
    """The thread and its blocking channel (`open_channel()`), both started
    by the first call; one call at a time."""

    def __init__(self, open_channel: Callable[[], Any]) -> None:
        self._open_channel = open_channel
        self._lock = threading.Lock()
        self._calls: queue.SimpleQueue[LaneCall | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._channel: Any = None
        self._method: Any = None
        self._busy = False
        self._closed = False
        self.calls = 0  # calls run on the lane, for tests and curiosity
        self.answered_here = 0  # of them, taken by `LaneCall.wait_here`
        # Whether the last call took at most half of WAIT_HERE, start to end.
        self.quick = False

    def call(
        self, one: ai_pb2.Call, md: list[tuple[str, str]], timeout: float | None, eager: bool = True
    ) -> LaneCall | None:
        """Starts `one` on the lane; None when it is busy (or closed): the
        caller goes by grpc.aio. `eager`: every reply wakes the event loop
        (a progress or result callback waits for it); else only the call's
        end, or `_AHEAD` replies waiting, do."""
        with self._lock:
            if self._busy or self._closed:
                return None
            self._busy = True
        try:
            if self._method is None:
                self._channel = self._open_channel()
                self._method = stubs(self._channel)[4]
            call = LaneCall(asyncio.get_running_loop(), self._method(one, metadata=md, timeout=timeout), eager)
        except BaseException:
            self._free()
            raise
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="aipod-lane", daemon=True)
            self._thread.start()
        self.calls += 1
        self._calls.put(call)
        return call

    def _free(self) -> None:
        with self._lock:
            self._busy = False

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            last = call.read()
            self.quick = time.monotonic() - call.started <= WAIT_HERE / 2
            self._free()  # before the last item: the caller's next call finds the lane free
            call.end(last)

    def close(self) -> None:
        """Cancels the call on the lane and ends its thread."""
        with self._lock:
            self._closed = True
        if self._channel is not None:
            self._channel.close()
        self._calls.put(None)

"""The tokenizer's one Session stream to its scheduler, shared by every request it
serves: a submit and maybe an abort go out per request, and each scheduler step's tokens
for all of them come back in one message, handed out here to each request's queue.

Whether the frontend keeps up goes out too, when it changes (scheduler.proto's
FrontendLoad): it does while no request waits in its intake and every update of the
step before was read by its request before the next step's came.

The stream opens with the first request and, if it breaks, again with the next one; the
requests it carried when it broke get an UnavailableError."""

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc

from services.common.errors import InvalidArgumentError, RemoteError, UnavailableError
from services.tokenizer.intake import Intake

log = logging.getLogger(__name__)

# What a request's queue receives: its updates in order, or the error that ends it.
Update = scheduler_pb2.RequestUpdate | Exception


def raise_if_error(update: scheduler_pb2.RequestUpdate) -> None:
    """Raises what the scheduler refused or failed the request with, as it said it."""
    if update.HasField("error"):
        raise RemoteError(update.error.code, update.error.message)


class _Unread:
    """Updates a session handed to its requests' queues and they have not yet read."""

    def __init__(self) -> None:
        self.count = 0


class _Updates(asyncio.Queue[Update]):
    """One request's updates, counted in its session's unread ones until read (or until
    the request is released, unread = None)."""

    def __init__(self, unread: _Unread) -> None:
        super().__init__()
        self.unread: _Unread | None = unread

    def put_nowait(self, item: Update) -> None:
        super().put_nowait(item)
        if self.unread is not None:
            self.unread.count += 1

    def get_nowait(self) -> Update:
        item = super().get_nowait()
        if self.unread is not None:
            self.unread.count -= 1
        return item


class SessionClient:
    def __init__(
        self,
        scheduler: scheduler_pb2_grpc.SchedulerStub,
        metadata: tuple[tuple[str, str], ...] = (),
        intake: Intake | None = None,
    ) -> None:
        self._scheduler = scheduler
        # What the stream's call carries (the internal token).
        self._metadata = metadata
        self._intake = intake or Intake()
        # Messages for the open stream; None while no stream is open.
        self._outgoing: asyncio.Queue[scheduler_pb2.SessionRequest | None] | None = None
        # What the open stream was last told of the frontend's load (a new one: behind).
        self._said_keeps_up = False
        self._unread = _Unread()
        # The requests in flight: their queues by handle, their handles by request_id.
        self._requests: dict[int, _Updates] = {}
        self._handle_of: dict[str, int] = {}
        self._next_handle = 1

    def submit(self, request: scheduler_pb2.SubmitRequest, traceparent: str) -> asyncio.Queue[Update]:
        """Sends the request; returns the queue its updates arrive on."""
        if request.request_id in self._handle_of:
            raise InvalidArgumentError("request_id", f"{request.request_id!r} is already in flight")
        outgoing = self._outgoing if self._outgoing is not None else self._open()
        handle, self._next_handle = self._next_handle, self._next_handle + 1
        updates = _Updates(self._unread)
        self._requests[handle] = updates
        self._handle_of[request.request_id] = handle
        submit = scheduler_pb2.SessionSubmit(request=request, traceparent=traceparent, handle=handle)
        outgoing.put_nowait(scheduler_pb2.SessionRequest(submit=submit))
        return updates

    def release(self, request_id: str, abort: bool) -> None:
        """The request's handler is done with it; abort: the scheduler has not finished
        it (the client went away, or stop strings ended it early). Updates still on their
        way for it are dropped, even if its request_id comes back at once."""
        handle = self._handle_of.pop(request_id, None)
        if handle is None:
            return
        updates = self._requests.pop(handle)
        self._unread.count -= updates.qsize()
        updates.unread = None
        if abort and self._outgoing is not None:
            abort_request = scheduler_pb2.AbortRequest(request_id=request_id)
            self._outgoing.put_nowait(scheduler_pb2.SessionRequest(abort=abort_request))

    def notify_all(self, error: Exception) -> None:
        """Puts `error` in the queue of every request in flight, after what it has received."""
        for updates in self._requests.values():
            updates.put_nowait(error)

    def close(self) -> None:
        if self._outgoing is not None:
            self._outgoing.put_nowait(None)

    def _open(self) -> asyncio.Queue[scheduler_pb2.SessionRequest | None]:
        outgoing: asyncio.Queue[scheduler_pb2.SessionRequest | None] = asyncio.Queue()

        async def messages() -> AsyncIterator[scheduler_pb2.SessionRequest]:
            while (message := await outgoing.get()) is not None:
                yield message

        self._outgoing = outgoing
        self._said_keeps_up = False
        asyncio.ensure_future(self._read(self._scheduler.Session(messages(), metadata=self._metadata)))
        return outgoing

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        error: Exception
        try:
            async for response in call:
                self._report_load()
                for update in response.updates:
                    updates = self._requests.get(update.handle)
                    if updates is not None:
                        updates.put_nowait(update)
            error = UnavailableError("the scheduler ended the session stream")
        except grpc.aio.AioRpcError as rpc_error:
            error = UnavailableError(f"the scheduler session stream failed: {rpc_error.details()}")
        # The next request opens a new stream; those of this one end here.
        if self._outgoing is not None:
            self._outgoing.put_nowait(None)
        self._outgoing = None
        if self._requests:
            log.warning("%s; failing %d requests", error, len(self._requests))
        requests, self._requests = self._requests, {}
        self._handle_of.clear()
        # The failed requests' queues leave the count with them.
        self._unread = _Unread()
        for updates in requests.values():
            updates.unread = None
            updates.put_nowait(error)

    def _report_load(self) -> None:
        """Tells the scheduler whether the frontend keeps up, if that changed: as a new
        step's updates come, none may wait to be taken in and none of the last step's
        may be unread."""
        keeps_up = self._intake.pending == 0 and self._unread.count == 0
        if keeps_up != self._said_keeps_up and self._outgoing is not None:
            load = scheduler_pb2.FrontendLoad(keeps_up=keeps_up)
            self._outgoing.put_nowait(scheduler_pb2.SessionRequest(load=load))
            self._said_keeps_up = keeps_up

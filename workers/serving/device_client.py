"""The consumer side of the hand-off to the device process (see workers/serving/ipc.py).

Each calling thread gets its own ZeroMQ DEALER socket, connected to the device process's
ROUTER, and waits on it for its own reply: no thread hand-off on the way there or back.
While it waits it checks, every ``poll_s`` seconds, that the device process is still there
(the group's status board, workers/process/status_board.py): if it died, the wait ends
with ``DeviceLost`` at once instead of hanging, and the caller hands its job back to the
queue. Nothing here imports torch.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from workers.process.status_board import State, StatusBoard
from workers.serving import ipc


class DeviceLost(RuntimeError):
    """The device process ended before it answered; the job was not computed to completion here."""


class DeviceClient:
    """Sends requests to the device process at ``address`` (``ipc://...``) and waits for replies."""

    def __init__(self, address: str, board: StatusBoard | None = None, *, poll_s: float = 0.25):
        self.address = address
        self._board = board
        self._poll_ms = max(1, int(poll_s * 1000))
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._local = threading.local()
        self._rids = itertools.count(1)
        self._sockets: list[zmq.Socket] = []
        self._sockets_lock = threading.Lock()

    def _socket(self) -> zmq.Socket:
        sock = getattr(self._local, "socket", None)
        if sock is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.address)
            self._local.socket = sock
            with self._sockets_lock:
                self._sockets.append(sock)
        return sock

    def device_gone(self) -> bool:
        """True once the launcher marked the device process dead, or it no longer exists."""
        if self._board is None:
            return False
        status = self._board.device()
        if status.state in (State.FAILED, State.STOPPED):
            return True
        if status.pid:
            try:
                os.kill(status.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return False

    def send(self, header: dict[str, Any], payloads: Sequence[bytes] = ()) -> None:
        """Fire and forget (``cancel``)."""
        self._socket().send_multipart(ipc.pack(header, *payloads), copy=False)

    def request(self, header: dict[str, Any], payloads: Sequence[bytes] = (), *,
                on_event: Callable[[dict[str, Any]], None] | None = None,
                periodically: Callable[[], None] | None = None,
                timeout_s: float | None = None) -> tuple[dict[str, Any], list[bytes]]:
        """Send one request; return its final reply ``(header, frames)``.

        ``on_event`` receives intermediate replies (``"event"`` headers: generated pieces,
        training progress) in order. ``periodically`` runs after each wake-up, at least every
        ``poll_s`` seconds (e.g. to look at a cancel flag; it throttles itself). Raises ``DeviceLost`` if the device
        process ends first, ``TimeoutError`` after ``timeout_s`` seconds if given (jobs pass
        none: their own limits, deadline and cancel, end them).
        """
        sock = self._socket()
        rid = next(self._rids)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        sock.send_multipart(ipc.pack({**header, "rid": rid}, *payloads), copy=False)
        while True:
            if sock.poll(self._poll_ms, zmq.POLLIN):
                reply, frames = ipc.unpack(sock.recv_multipart())
                if reply.get("rid") != rid:
                    continue  # a late reply to a request this thread gave up on
                if "event" not in reply:
                    return reply, frames
                if on_event is not None:
                    on_event(reply)
            elif self.device_gone():
                raise DeviceLost(f"the device process of this worker ended before answering request {rid}")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no reply from the device process within {timeout_s} s")
            if periodically is not None:
                periodically()

    def close(self) -> None:
        with self._sockets_lock:
            for sock in self._sockets:
                sock.close(0)
            self._sockets.clear()

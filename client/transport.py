"""Multipart send/receive with less per-frame overhead than pyzmq's generic helpers.

pyzmq's ``send_multipart``/``recv_multipart`` pay a Python-level wrapper and ``IntFlag`` arithmetic
for every frame; a request here has 6 to 10 frames, so on the broker's hot path that overhead was
about half of its CPU (see docs/BENCHMARKS.md). These call the Cython socket methods directly with
plain ints. Control frames are handed back as ``bytes``; frames from ``first_tensor`` on stay
zero-copy ``zmq.Frame`` objects, so tensors are never copied.
"""
from __future__ import annotations

from typing import Any, Sequence

import zmq
from zmq.backend import Socket as _BackendSocket

_send = _BackendSocket.send
_recv = _BackendSocket.recv
_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)


def send_frames(sock: zmq.Socket, frames: Sequence[Any], flags: int = 0) -> None:
    """Send a multipart message; buffers and Frames are sent without copying when large.

    ``flags`` (NOBLOCK) applies to the first frame: ZeroMQ takes a message whole or not at all, so
    once the first frame is in, the others never block.
    """
    last = len(frames) - 1
    if last == 0:
        _send(sock, frames[0], flags, False, False)
        return
    _send(sock, frames[0], _SNDMORE | flags, False, False)
    for i in range(1, last):
        _send(sock, frames[i], _SNDMORE, False, False)
    _send(sock, frames[last], 0, False, False)


def recv_frames(sock: zmq.Socket, first_tensor: int, *, block: bool = False) -> list:
    """Receive a multipart message: parts before ``first_tensor`` as bytes, the rest as Frames.

    Raises ``zmq.Again`` when not blocking and nothing is waiting.
    """
    frame = _recv(sock, 0 if block else _NOBLOCK, False, False)
    frames = [frame.bytes if first_tensor > 0 else frame]
    i = 1
    while frame.more:  # a Frame attribute: cheaper than getsockopt(RCVMORE) and its enum lookup
        frame = _recv(sock, 0, False, False)
        frames.append(frame.bytes if i < first_tensor else frame)
        i += 1
    return frames

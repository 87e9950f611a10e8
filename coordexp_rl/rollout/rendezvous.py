"""The TCP store that a process group's ranks meet at, listening only on the address they are told.

torch's ``TCPStore`` server listens on every interface (``*:port``, no authentication) whatever host name
it is given. Rank 0 here binds its own socket to ``master_addr`` and hands it to the store, so that the
listener is where the log says: loopback on one machine (Ray's node address there is 127.0.0.1), the
node's cluster address when the ranks span nodes. Used by the learner's group and the weight group.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch.distributed as dist


def bound_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` only (port 0: any free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def tcp_store(master_addr: str, port: int, world_size: int, rank: int, timeout: timedelta) -> dist.TCPStore:
    """Rank 0 serves the store on ``master_addr:port`` (that address only); the other ranks connect to it."""
    if rank != 0:
        return dist.TCPStore(master_addr, port, world_size, False, timeout=timeout)
    sock = bound_listener(master_addr, port)
    # detach: the store owns the descriptor from here (a collected socket object would close it under it)
    return dist.TCPStore(master_addr, port, world_size, True, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=sock.detach())

"""A TCP proxy a test can cut, freeze and restore, to take a service away from one process only.

* :meth:`TcpProxy.cut` is a dead server: every connection is closed, new ones are refused.
* :meth:`TcpProxy.freeze` is a *frozen* or half-open peer: every socket stays open and the
  kernel keeps ACKing (keepalive probes and sent data alike), but not one byte is forwarded in
  either direction, and new connections are accepted and then left unanswered. A client sees
  no error at all — only silence. A frozen connection stays frozen for good (its peer is gone);
  :meth:`restore` lets *new* connections through again, so a client that detects the silence
  and reconnects recovers, and one that waits on the old socket waits forever.
"""

from __future__ import annotations

import select
import socket
import threading
from dataclasses import dataclass, field

#: How often a pump looks at the freeze flag while its source is quiet.
POLL_S = 0.05


@dataclass
class _Link:
    """One proxied connection: the client's socket and ours to the target."""

    client: socket.socket
    upstream: socket.socket | None = None
    frozen: threading.Event = field(default_factory=threading.Event)
    closed: threading.Event = field(default_factory=threading.Event)


class TcpProxy:
    def __init__(self, *, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._cut = False
        self._frozen = False
        self._closed = False
        #: Connections accepted so far, and how many of them were black-holed (accepted while frozen).
        self.accepted = 0
        self.black_holed = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self._cut:
                client.close()
                continue
            link = _Link(client=client)
            if self._frozen:  # accepted by the kernel, never answered: what a stopped server does
                link.frozen.set()
                self.black_holed += 1
                with self._lock:
                    self._links.append(link)
                continue
            try:
                link.upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            link.upstream.settimeout(None)
            with self._lock:
                self._links.append(link)
            for src, dst in ((client, link.upstream), (link.upstream, client)):
                threading.Thread(target=self._pump, args=(link, src, dst), daemon=True).start()

    @staticmethod
    def _pump(link: _Link, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not link.closed.is_set():
                if link.frozen.is_set():  # leave the bytes in the kernel: nobody reads them
                    link.closed.wait(POLL_S)
                    continue
                readable, _, _ = select.select([src], [], [], POLL_S)
                if not readable:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                if link.frozen.is_set():  # read just as the freeze began: it is lost, as on a dead link
                    continue
                dst.sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            if not link.frozen.is_set():
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    @property
    def links(self) -> int:
        """Connections currently held open (frozen ones included)."""
        with self._lock:
            return sum(1 for link in self._links if not link.closed.is_set())

    def cut(self) -> None:
        """Drop every connection and refuse new ones, as a dead server would."""
        self._cut = True
        self._close_links()

    def freeze(self) -> None:
        """Stop forwarding on every connection, keep them all open, black-hole new ones."""
        self._frozen = True
        with self._lock:
            for link in self._links:
                link.frozen.set()

    def restore(self) -> None:
        """Accept and forward new connections again (frozen ones stay frozen)."""
        self._cut = False
        self._frozen = False

    def _close_links(self) -> None:
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.closed.set()
            for s in (link.client, link.upstream):
                if s is None:
                    continue
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self._cut = True
        self._close_links()
        self._listener.close()

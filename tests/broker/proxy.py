"""A small TCP balancer of the tests' own, in the role of a Kubernetes Service in front of
RabbitMQ nodes: each new connection goes to the next backend in turn, skipping one that refuses
it (a Service routes only to ready pods). Tests can cut every connection it carries (what a
client sees when the node behind it dies) and stop accepting for a while.

Threads, standard library only; every thread and socket ends with `close`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Sequence

Backend = tuple[str, int]


class TcpProxy:
    """Listens on 127.0.0.1:``port`` and forwards each connection to one of ``backends``."""

    def __init__(self, backends: Sequence[Backend] | Callable[[], Sequence[Backend]]) -> None:
        self._backends = backends
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket, Backend]] = []
        self._next = 0
        self._refusing = False
        self._closed = False
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)
        self._thread.start()

    # -- control ----------------------------------------------------------------------------

    def backends(self) -> list[Backend]:
        """The backends, in order."""
        b = self._backends
        return list(b() if callable(b) else b)

    def cut(self, backend: Backend | None = None) -> int:
        """Close every connection (to ``backend`` only, when given), both ends at once; return
        how many."""
        with self._lock:
            victims = [p for p in self._pairs if backend is None or p[2] == backend]
        for client, server, _ in victims:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
        return len(victims)

    def refuse(self, refusing: bool = True) -> None:
        """Close new connections at once (``True``) or forward them again (``False``)."""
        self._refusing = refusing

    def connections(self) -> int:
        """Connections being carried now."""
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        """Stop listening and cut everything."""
        self._closed = True
        # Closing a socket does not wake a thread blocked in its accept(); shutting it down does.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()
        self._thread.join(5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- forwarding ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _addr = self._listener.accept()
            except OSError:
                return
            if self._refusing:
                client.close()
                continue
            threading.Thread(target=self._open, args=(client,), daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        backends = self.backends()
        with self._lock:
            start = self._next
            self._next += 1
        for step in range(len(backends)):
            backend = backends[(start + step) % len(backends)]
            try:
                server = socket.create_connection(backend, timeout=5)
            except OSError:
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = (client, server, backend)
            with self._lock:
                self._pairs.append(pair)
                self.accepted += 1
            done = threading.Event()
            threading.Thread(
                target=self._pump, args=(server, client, pair, done), daemon=True
            ).start()
            self._pump(client, server, pair, done)
            return
        client.close()  # no backend answers: the client sees a closed connection

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        pair: tuple[socket.socket, socket.socket, Backend],
        done: threading.Event,
    ) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # One side ended: end both, as a dead node's connection ends for its client.
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            if not done.is_set():
                done.set()
            else:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.close()
                with self._lock, contextlib.suppress(ValueError):
                    self._pairs.remove(pair)

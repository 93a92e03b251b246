"""A TCP proxy in a thread, on real sockets: the network between a Ray client and its cluster.

``cut()`` closes every connection through it and refuses new ones (a network that drops:
the client sees its sockets reset, then connection refused); ``restore()`` lets connections
through again. Used between a Ray Client (``ray://``) and the head's client server.
"""

from __future__ import annotations

import selectors
import socket
import threading


class TcpProxy:
    """Forwards ``127.0.0.1:{port}`` to ``target`` (host, port) until :meth:`close`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._up = threading.Event()
        self._up.set()
        self._closed = threading.Event()
        self.cuts = 0
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)
        self._thread.start()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def cut(self) -> None:
        """Drop every connection now and refuse new ones until :meth:`restore`."""
        self._up.clear()
        self.cuts += 1
        self._close_pairs()

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closed.set()
        self._up.clear()
        self._close_pairs()
        self._listener.close()
        self._thread.join(timeout=5)

    def _close_pairs(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if not self._up.is_set():
                client.close()  # the network is down: the client's connect fails
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
                self.accepted += 1
            threading.Thread(target=self._pump, args=(client, upstream), name="tcp-proxy-pump", daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        """Copy bytes both ways until either side closes (or the proxy cuts them)."""
        peer = {a: b, b: a}
        with selectors.DefaultSelector() as sel:
            sel.register(a, selectors.EVENT_READ)
            sel.register(b, selectors.EVENT_READ)
            try:
                while True:
                    for key, _ in sel.select(timeout=0.5):
                        data = key.fileobj.recv(65536)
                        if not data:
                            raise OSError("closed")
                        peer[key.fileobj].sendall(data)
                    if a.fileno() < 0 or b.fileno() < 0:
                        return
            except (OSError, ValueError):
                pass
            finally:
                for sock in (a, b):
                    try:
                        sock.close()
                    except OSError:
                        pass

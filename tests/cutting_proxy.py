"""A TCP proxy on 127.0.0.1 in front of a real server that closes connections part-way through a response:
network faults in the middle of a download, made deterministic."""

from __future__ import annotations

import socket
import threading


class CuttingProxy:
    """Forwards every connection to `upstream`; the first `cuts` connections that carry more than `after` bytes
    back to the client are closed at that point, mid-response."""

    def __init__(self, upstream: tuple[str, int], after: int, cuts: int = 1):
        self.upstream, self.after, self.cuts_left, self.cut = upstream, after, cuts, 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _should_cut(self, sent: int) -> bool:
        with self._lock:
            if sent <= self.after or self.cuts_left <= 0:
                return False
            self.cuts_left -= 1
            self.cut += 1
            return True

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                sent += len(data)
                if downstream and self._should_cut(sent):
                    break
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

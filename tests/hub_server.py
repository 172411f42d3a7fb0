"""A stand-in for the Hugging Face Hub (which cannot be reached here): model directories served over the part of
the Hub's HTTP API that `huggingface_hub.snapshot_download` and `from_pretrained` use, on 127.0.0.1.

    GET  /api/models/{repo}[/revision/{rev}] the commit id and file list
    GET  /api/models/{repo}/tree/{rev}       every file with its size and sha256 (as the Hub lists LFS files)
    HEAD /{repo}/resolve/{rev}/{file}        X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{file}        the bytes (Range: bytes=N- for a resumed download)

It can send at a stated rate (`bytes_per_s`, all transfers together: a download at a given bandwidth), refuse the first
`refuse_downloads` file requests with 403 (a download that fails), and it records every file GET (`downloads`).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

CHUNK = 1 << 20


class _File:
    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
        self.sha256 = h.hexdigest()


class HubServer:
    def __init__(self, repos: dict[str, Path], bytes_per_s: float | None = None, refuse_downloads: int = 0):
        with ThreadPoolExecutor(max_workers=8) as pool:  # hashing a 16 GB model file by file takes a while
            self.repos = {
                repo: dict(zip((p.relative_to(d).as_posix() for p in files), pool.map(_File, files), strict=True))
                for repo, d in repos.items()
                for files in [sorted(p for p in d.rglob("*") if p.is_file())]
            }
        # A commit id per repository, from its files' names and digests: 40 hex digits, as the Hub's are.
        self.commits = {
            repo: hashlib.sha1(json.dumps({k: f.sha256 for k, f in files.items()}).encode()).hexdigest()
            for repo, files in self.repos.items()
        }
        self.bytes_per_s = bytes_per_s
        self.refuse_downloads = refuse_downloads
        self.downloads: list[str] = []  # "repo/file" for each file GET answered with bytes
        self._lock = threading.Lock()
        self._active, self._sent, self._t0 = 0, 0, time.monotonic()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _transfers(self, change: int) -> None:
        """Count the transfers in flight; the rate's clock starts again whenever one starts on an idle server."""
        with self._lock:
            if self._active == 0:
                self._t0, self._sent = time.monotonic(), 0
            self._active += change

    def _pace(self, n: int) -> None:
        """The stated rate holds for all transfers together (a client fetches several files at once): sleep until
        the bytes sent so far are due."""
        if not self.bytes_per_s:
            return
        with self._lock:
            self._sent += n
            ahead = self._sent / self.bytes_per_s - (time.monotonic() - self._t0)
        if ahead > 0:
            time.sleep(ahead)

    def _refused(self) -> bool:
        with self._lock:
            if self.refuse_downloads > 0:
                self.refuse_downloads -= 1
                return True
            return False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _json(self, doc: object, status: int = 200) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _route(self) -> tuple[str, str, str, str] | None:
                """(kind, repo, revision, rest) for the three URL forms; None for anything else."""
                parts = unquote(urlparse(self.path).path).strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) == 4:
                    return "revision", "/".join(parts[2:4]), "main", ""
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                    return parts[4], "/".join(parts[2:4]), parts[5], "/".join(parts[6:])
                if len(parts) >= 5 and parts[2] == "resolve":
                    return "resolve", "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                return None

            def do_GET(self) -> None:
                self._serve(body=True)

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def _serve(self, body: bool) -> None:
                route = self._route()
                files = hub.repos.get(route[1]) if route else None
                if route is None or files is None or route[2] not in ("main", hub.commits[route[1]]):
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                kind, repo, _, rest = route
                commit = hub.commits[repo]
                if kind == "revision":
                    return self._json({"id": repo, "sha": commit, "private": False,
                                       "siblings": [{"rfilename": k} for k in files]})  # fmt: skip
                if kind == "tree":
                    return self._json([
                        {"type": "file", "path": k, "size": f.size, "oid": f.sha256[:40],
                         "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134}}
                        for k, f in files.items()
                    ])  # fmt: skip
                f = files.get(rest)
                if f is None or hub._refused():
                    self.send_response(404 if f is None else 403)
                    self.send_header("X-Error-Code", "EntryNotFound" if f is None else "GatedRepo")
                    self.send_header("X-Repo-Commit", commit)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                wanted = self.headers.get("Range", "")
                if wanted.startswith("bytes=") and wanted[6:].split("-")[0].isdigit():
                    start = min(int(wanted[6:].split("-")[0]), f.size)
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{f.sha256}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(f.size - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{f.size - 1}/{f.size}")
                self.end_headers()
                if not body:
                    return
                with hub._lock:
                    hub.downloads.append(f"{repo}/{rest}")
                self._send(f.path, start)

            def _send(self, path: Path, start: int) -> None:
                with open(path, "rb") as src:
                    src.seek(start)
                    hub._transfers(+1)
                    try:
                        while block := src.read(CHUNK):
                            hub._pace(len(block))
                            self.wfile.write(block)
                    finally:
                        hub._transfers(-1)

        return Handler

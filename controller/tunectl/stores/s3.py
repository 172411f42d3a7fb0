"""The S3 artifact store (AWS S3, MinIO, any S3-compatible server): the `Store` contract (base.py) on a bucket.

`s3://bucket/prefix` holds `runs/<run-id>/<stage>/...` exactly as a local store directory does. Endpoint,
region and credentials come from the standard AWS chain (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...); in a cluster they come from a Secret through the environment.

Transfers are safe to interrupt and repeat:
- upload: a journal beside the files records each finished object's sha256, size and ETag; a file whose
  object still matches its entry is not sent again. The manifest is removed first and written last, so an
  interrupted publish never looks complete.
- download: ranges are fetched in parallel and appended in order to `<file>.part`; an interrupted download
  resumes from the end of that prefix. Every file is verified against the manifest's
  sha256 before it is moved into place. A `.part` that is not a regular file of ours (a symlink, say) is
  replaced, never opened: nothing outside the destination is written.
- the endpoint URL is printed with any user:password in it redacted.
- transient errors (connection refused or reset, timeouts, 5xx, throttling) are retried with backoff.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import queue
import random
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ArtifactError, ConfigError, TunectlError, redact
from ..files import create_fresh, open_regular, read_regular, write_atomic
from .base import Progress, Store
from .manifest import (
    MANIFEST,
    Digests,
    StageArtifacts,
    manifest_doc,
    matches,
    output_files,
    parse_document,
    safe_key,
    selected_files,
    sha256_file,
    sha256_stream,
)

T = TypeVar("T")
log = logging.getLogger("tunectl")

JOURNAL = ".uploaded.json"
CLAIM = ".claimed"  # marks a run id as taken (claim_run)
PART_SIZE = 64 * 2**20  # multipart upload part
RANGE_SIZE = 16 * 2**20  # download range; CONCURRENCY of them are in memory at once
CONCURRENCY = int(os.environ.get("TUNECTL_S3_CONCURRENCY", "8"))  # parallel parts per file, both directions
_RETRYABLE_CODES = {
    "500",
    "502",
    "503",
    "504",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "XMinioServerNotInitialized",
    "XMinioStorageFull",
}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}  # HEAD answers carry only the status
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken", "ExpiredToken"}


class TransientError(TunectlError):
    """The store could not be reached for long enough; retrying later may succeed."""


def _retry_seconds() -> float:
    return float(os.environ.get("TUNECTL_S3_RETRY_SECONDS", "300"))


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None, cache_root: Path | None = None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if client is None:
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            # MinIO and most S3-compatible servers want path-style URLs; AWS itself wants virtual hosts.
            style = os.environ.get("TUNECTL_S3_ADDRESSING") or (
                "path" if endpoint and "amazonaws.com" not in endpoint else "auto"
            )
            config = Config(
                s3={"addressing_style": style},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=CONCURRENCY * 2,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            try:
                client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
            except ValueError:  # botocore's message repeats the URL, password and all
                raise ConfigError(
                    f"AWS_ENDPOINT_URL {redact(endpoint or '')} is not a valid URL (expected http(s)://HOST[:PORT])"
                ) from None
        self.client = client
        cache = cache_root or Path(
            os.environ.get("TUNECTL_S3_CACHE")
            or Path(os.environ.get("TUNECTL_CACHE") or Path.home() / ".cache" / "tunectl") / "s3"
        )
        self.cache = cache / bucket / (self.prefix or "_")

    # -- naming
    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def endpoint(self) -> str:
        """The endpoint for messages: any user:password in AWS_ENDPOINT_URL is redacted."""
        return redact(self.client.meta.endpoint_url)

    def __repr__(self) -> str:
        return f"S3Store({self.uri} at {self.endpoint})"

    def _key(self, key: str) -> str:
        key = safe_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def location(self, run: str) -> str:
        return f"{self.uri}/runs/{safe_key(run)}"

    def where(self, key: str) -> str:
        return f"{self.uri}/{safe_key(key)}"

    def local_dir(self, run: str) -> Path:
        """A directory in the local cache (recipe file for the stages, logs being written)."""
        d = self.cache / "runs" / safe_key(run)
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- errors and retries
    def _explain(self, e: Exception) -> Exception | None:
        """A user-facing error for what retrying cannot fix; None when the error is transient."""
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        where = f"S3 store {self.endpoint} bucket '{self.bucket}'"
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return TunectlError(
                f"{where}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        cause = e if isinstance(e, ClientError) else e.__cause__ if isinstance(e.__cause__, ClientError) else None
        if cause is None:
            return None
        code = str(cause.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404"):  # HEAD requests carry no error body, only the status
            return TunectlError(f"{where} does not exist; create it first (for example `mc mb` or `aws s3 mb`)")
        if code in _AUTH_CODES:
            return TunectlError(
                f"{where}: access denied ({code}); check the credentials "
                f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE) and the bucket policy"
            )
        if code in _RETRYABLE_CODES:
            return None
        message = redact(str(cause.response.get("Error", {}).get("Message", "")))
        return TunectlError(f"{where}: {code}: {message}".rstrip(": "))

    def _retry(self, what: str, fn: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
        from botocore.exceptions import BotoCoreError

        deadline = time.monotonic() + _retry_seconds()
        delay = 0.5
        while True:
            try:
                return fn()
            except TunectlError:
                raise
            except Exception as e:  # botocore raises many unrelated types for network trouble
                fatal = self._explain(e)
                if fatal is not None:
                    raise fatal from None
                if not _is_transient(e):
                    if isinstance(e, BotoCoreError):  # its message may carry the endpoint URL: one redacted line
                        raise TunectlError(
                            f"S3 store {self.endpoint} bucket '{self.bucket}': {what} failed: {redact(str(e))}"
                        ) from None
                    raise
                if time.monotonic() + delay > deadline:
                    raise TransientError(
                        f"S3 store {self.endpoint} bucket '{self.bucket}': {what} kept failing "
                        f"for {_retry_seconds():.0f}s ({type(e).__name__}: {redact(str(e))})"
                    ) from None
                log.warning("%s failed (%s); retrying in %.1fs", what, type(e).__name__, delay)
                sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 10.0)

    # -- small documents
    def _get_bytes(self, key: str) -> bytes | None:
        def get() -> bytes | None:
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            except Exception as e:
                if _code(e) in _NOT_FOUND:
                    return None
                raise

        return self._retry(f"reading {key}", get)

    def read_json(self, key: str) -> dict[str, Any] | None:
        data = self._get_bytes(key)
        return None if data is None else parse_document(data, self.where(key))

    def read_text(self, key: str) -> str | None:
        data = self._get_bytes(key)
        return None if data is None else data.decode("utf-8", "replace")

    def _put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self._retry(
            f"writing {key}",
            lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type),
        )

    def write_json(self, key: str, doc: dict[str, Any]) -> None:
        self._put_bytes(key, (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode(), "application/json")

    def write_text(self, key: str, text: str) -> None:
        self._put_bytes(key, text.encode(), "text/plain; charset=utf-8")

    def put_file(self, key: str, path: Path) -> None:
        self._upload(path, key, None, None)

    def check(self) -> None:
        """Fail early, with one line, on a missing bucket or bad credentials."""
        self._retry("checking the bucket", lambda: self.client.head_bucket(Bucket=self.bucket))

    def list_runs(self) -> list[str]:
        prefix = self._key("runs") + "/"

        def runs() -> list[str]:
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"
            ):
                out += [p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
            return out

        names = self._retry("listing runs", runs)
        # Existence, not content: a run whose record is damaged is still a run (`list` shows it as unknown).
        return sorted(n for n in names if self._head(f"runs/{n}/run.json") is not None)

    def claim_run(self, run: str) -> bool:
        """Take `run` as a new run's id: False if anything is stored under it. The marker object is written only
        if absent (If-None-Match), so of two clients that pick the same id exactly one gets it."""
        prefix = self._key(f"runs/{safe_key(run)}") + "/"
        listed = self._retry(
            "checking the run id",
            lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1),
        )
        if listed.get("KeyCount", 0):
            return False
        key = self._key(f"runs/{run}/{CLAIM}")
        conditional = "IfNoneMatch" in self.client.meta.service_model.operation_model("PutObject").input_shape.members

        def put() -> bool:
            try:
                if conditional:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=b"", IfNoneMatch="*")
                else:  # a botocore too old for conditional writes: the listing above is the only check
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=b"")
            except Exception as e:
                if _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    return False
                raise
            return True

        return self._retry("claiming the run id", put)

    # -- stage handoff
    def _head(self, key: str) -> dict[str, Any] | None:
        def head() -> dict[str, Any] | None:
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except Exception as e:
                if _code(e) in _NOT_FOUND:
                    return None
                raise

        return self._retry(f"checking {key}", head)

    def _upload(
        self,
        path: Path,
        key: str,
        known: dict[str, Any] | None,
        progress: Progress | None,
        sha: str | None = None,
    ) -> dict[str, Any]:
        """Upload one file unless `known` (its journal entry) shows the object already holds it.

        Returns the file's journal entry: sha256, size and the object's ETag. A file seen for the first time
        is hashed while it uploads (unless `sha` has its digest already); a file with a journal entry is hashed
        first to decide whether to send it.
        """
        size = path.stat().st_size
        if known is not None and known.get("size") == size:
            sha = sha or sha256_file(path)
            head = self._head(key) if sha == known.get("sha256") else None
            if head is not None and head["ContentLength"] == size and head["ETag"] == known.get("etag"):
                if progress:
                    progress(size)
                return known
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(
            multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE, max_concurrency=CONCURRENCY, use_threads=True
        )

        def send() -> None:
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=config, Callback=progress)

        with ThreadPoolExecutor(max_workers=1) as hasher:
            digest = hasher.submit(sha256_file, path) if sha is None else None
            self._retry(f"uploading {key}", send)
            sha = digest.result() if digest is not None else sha
        head = self._head(key)
        return {"sha256": sha, "size": size, "etag": head["ETag"] if head else None}

    def publish(
        self,
        run: str,
        stage: str,
        src: Path,
        manifest: dict[str, Any],
        progress: Progress | None = None,
        digests: Digests | None = None,
    ) -> dict[str, Any]:
        """Upload `src`'s files (skipping those already there), then the manifest, the commit point.

        `.uploaded.json` beside the files records what each object holds (sha256, size, ETag) as uploads
        finish, so a retried publish sends only files that are new, changed or were not finished.
        """
        prefix = f"runs/{run}/{stage}"
        self._retry(
            "removing the old manifest",
            lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(f"{prefix}/{MANIFEST}")),
        )
        journal: dict[str, Any] = self.read_json(f"{prefix}/{JOURNAL}") or {}
        rels = output_files(src)
        for rel in rels:
            early = digests(src / rel) if digests else None
            journal[rel] = self._upload(src / rel, f"{prefix}/{rel}", journal.get(rel), progress, early)
            self.write_json(f"{prefix}/{JOURNAL}", journal)
        files = {rel: {"sha256": journal[rel]["sha256"], "size": journal[rel]["size"]} for rel in rels}
        doc = manifest_doc(run, stage, manifest, files)
        self.write_json(f"{prefix}/{MANIFEST}", doc)
        return doc

    def delete(self, run: str, stage: str) -> None:
        prefix = f"runs/{safe_key(run)}/{safe_key(stage)}"
        self._retry(
            "removing the manifest",
            lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(f"{prefix}/{MANIFEST}")),
        )

        def delete_all() -> None:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix) + "/"
            )
            for page in pages:
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})

        self._retry(f"deleting {prefix}", delete_all)

    def fetch(
        self,
        run: str,
        stage: str,
        dest: Path | None = None,
        select: Callable[[str], bool] | None = None,
        progress: Progress | None = None,
    ) -> StageArtifacts:
        """Download a completed stage's files (resuming, skipping what is already here) and verify them."""
        doc = self.completed_manifest(run, stage)
        base = dest or self.cache / "runs" / safe_key(run) / safe_key(stage)
        for rel, meta in selected_files(doc, select):
            self._download(f"runs/{run}/{stage}/{rel}", base / safe_key(rel), meta, run, stage, rel, progress)
        return StageArtifacts(run, stage, base, doc)

    def _download(
        self, key: str, path: Path, meta: dict[str, Any], run: str, stage: str, rel: str, progress: Progress | None
    ) -> None:
        """Ranges are fetched in parallel and appended in order, so `<file>.part` is always a prefix of the object:
        an interrupted download resumes from its end. The sha256 is computed from the ranges in memory, in order,
        on a thread of its own (hashlib releases the GIL), so verifying costs no second pass over the file."""
        size, sha = int(meta["size"]), meta["sha256"]
        if matches(path, meta):
            if progress:
                progress(size)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        ident = path.with_name(path.name + ".part.json")  # which object the .part is a prefix of
        out, offset = _open_part(part, ident, size, sha)
        try:
            digest = sha256_stream(out, offset)
            out.seek(offset)
        except BaseException:
            out.close()
            raise
        if progress:
            progress(offset)
        ranges = iter([(o, min(o + RANGE_SIZE, size)) for o in range(offset, size, RANGE_SIZE)])

        # Reused buffers: fresh 16 MiB allocations per range cost page faults that show up in throughput. A buffer
        # goes back to the pool once it is written and hashed; the spare ones let the hash lag behind a little.
        buffers: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(CONCURRENCY + 3):
            buffers.put(bytearray(RANGE_SIZE))

        def get(r: tuple[int, int]) -> memoryview:
            start, end = r

            def once() -> memoryview:
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{end - 1}")[
                    "Body"
                ]
                view, got = memoryview(buf)[: end - start], 0
                readinto, release = _socket_reader(body)
                while got < len(view) and (n := readinto(view[got:])):
                    got += n
                release()
                if got != end - start:  # the connection closed early: retried like any dropped connection
                    raise ConnectionError(f"{rel}: the store sent {got} bytes of a {end - start}-byte range")
                return view

            buf = buffers.get()
            return self._retry(f"downloading {key}", once)

        def hash_and_release(view: memoryview) -> None:
            digest.update(view)
            buffers.put(view.obj)  # type: ignore[arg-type]

        pool = ThreadPoolExecutor(max_workers=CONCURRENCY)
        hasher = ThreadPoolExecutor(max_workers=1)  # one thread: updates stay in order
        hashed: list[Future[None]] = []
        try:
            with out:
                inflight = deque(pool.submit(get, r) for r in islice(ranges, CONCURRENCY))
                while inflight:
                    view = inflight.popleft().result()
                    try:
                        out.write(view)
                    except OSError as e:  # a full disk: the error names no file by itself
                        e.filename = e.filename or str(part)
                        raise
                    hashed.append(hasher.submit(hash_and_release, view))
                    if progress:
                        progress(len(view))
                    nxt = next(ranges, None)
                    if nxt is not None:
                        inflight.append(pool.submit(get, nxt))
                try:
                    out.flush()
                except OSError as e:
                    e.filename = e.filename or str(part)
                    raise
            for f in hashed:
                f.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # stop at once; the prefix written so far is kept
            hasher.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()
        hasher.shutdown()
        if digest.hexdigest() != sha:
            part.unlink()
            ident.unlink(missing_ok=True)
            if offset:  # the kept prefix may be what is damaged (it sat on this disk): once more, from the start
                log.info("%s: checksum mismatch after resuming; downloading it again from the start", rel)
                return self._download(key, path, meta, run, stage, rel, progress)
            raise ArtifactError(
                f"run {run} stage {stage}: {rel} does not match its manifest checksum (corrupted "
                f"in {self.uri}); re-run the stage"
            )
        os.replace(part, path)  # a link at `path` is replaced itself, its target untouched
        ident.unlink(missing_ok=True)


def _socket_reader(body: Any) -> tuple[Callable[[memoryview], int], Callable[[], None]]:
    """`readinto` straight from the HTTP response under botocore's body, and how to hand its connection back.

    urllib3's own `readinto` reads into a new bytes object and copies it over, and `http.client` under it does the
    same once more: two fresh allocations and two extra copies of every range, a third of a pull's time here
    (docs/benchmarks.md). Bodies that are not plain identity-encoded HTTP responses keep the slow path."""
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    headers = getattr(raw, "headers", None) or {}
    plain = headers.get("content-encoding", "identity") == "identity"
    if raw is None or fp is None or not hasattr(fp, "readinto") or not plain:
        return body.readinto, lambda: None
    return fp.readinto, raw.release_conn


def _open_part(part: Path, ident: Path, size: int, sha: str) -> tuple[Any, int]:
    """The partial download to continue and how many of its bytes to keep: all of them if it is a regular file
    holding a prefix of this object (per `ident`), else none, and a new empty file replaces whatever was there.
    Neither file is ever opened through a link: a planted `.part` symlink is removed, its target untouched."""
    try:
        doc = json.loads(read_regular(ident) or b"null")
    except ValueError:
        doc = None
    if doc == {"size": size, "sha256": sha}:
        f = open_regular(part, "r+b")
        if f is not None:
            n = os.fstat(f.fileno()).st_size
            if n <= size:
                return f, n
            f.close()
    f = create_fresh(part)
    try:
        write_atomic(ident, json.dumps({"size": size, "sha256": sha}), durable=False)
    except BaseException:
        f.close()
        raise
    return f, 0


def _code(e: Exception) -> str:
    response = getattr(e, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _is_transient(e: Exception) -> bool:
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    if isinstance(
        e,
        (
            EndpointConnectionError,
            ConnectionClosedError,
            ConnectTimeoutError,
            ReadTimeoutError,
            ResponseStreamingError,
            ConnectionError,
            TimeoutError,
            http.client.IncompleteRead,  # a response cut short, read directly from http.client
        ),
    ):
        return True
    if isinstance(e, ClientError):
        return _code(e) in _RETRYABLE_CODES
    # s3transfer wraps failures of multipart uploads; the cause says what happened.
    if type(e).__name__ in ("S3UploadFailedError", "RetriesExceededError"):
        return e.__cause__ is None or _is_transient(e.__cause__)  # type: ignore[arg-type]
    return isinstance(e.__cause__, Exception) and _is_transient(e.__cause__)

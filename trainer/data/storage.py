"""Where shards live: a local folder, S3 (or S3-compatible), HTTP(S), or a `pipe:` command.

The one home of URL logic. A location is a folder path or one of
  s3://bucket/prefix          boto3; credentials and endpoint from the usual places (AWS_* variables,
                              ~/.aws, instance roles; AWS_ENDPOINT_URL_S3 for S3-compatible stores)
  http(s)://host/prefix       requests; HTTP basic credentials from ~/.netrc
  pipe:COMMAND                a shell command writing the file named `{name}` to stdout,
                              e.g. `pipe:gcloud storage cat gs://bucket/prefix/{name}`
Local folders take no detour: `is_remote()` is False and callers keep using plain files.

Remote reads stream (nothing is copied whole unless a cache folder is set) and survive transient
errors: a connection reset, a 5xx/429 answer or a timeout reopens the object at the byte where the
read stopped (an HTTP Range request; a pipe is rerun and the bytes already delivered are skipped),
with exponential backoff, and every retry is reported to a callback (the loader counts them as
`data/retried/<reason>`). `attempts` failures in a row without progress give up with RemoteError.
An optional bounded local cache (cache.py) keeps shards once read.
Credentials never come from a location: one holding a user:password@ or a query string is refused,
and `redact()` is what goes into logs and error messages.
"""
from __future__ import annotations

import http.client
import io
import logging
import os
import random
import re
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

REMOTE_PREFIXES = ("s3://", "http://", "https://", "pipe:")
WRITABLE_PREFIXES = ("s3://",)
BUFFER_BYTES = 1 << 20           # read-ahead per open shard: few large reads instead of tarfile's 10 KiB ones

OnRetry = Callable[[str], None]  # called with the reason of each retry: "connection", "timeout", "http_503", ...


class TransientError(OSError):
    """A failure worth retrying; `reason` names it in the retry counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class RemoteError(OSError):
    """A remote object could not be read after all retries (or not at all)."""


def is_remote(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and location.startswith(REMOTE_PREFIXES)


def check_location(location: str) -> None:
    """Refuse what cannot work, or would put a secret into configs, MLflow params and logs."""
    if not is_remote(location):
        if re.match(r"^[a-z][a-z0-9+.-]*://", location):
            raise ValueError(f"unsupported shard location {redact(location)!r}: use a folder, s3://, http(s):// "
                             f"or pipe: (GCS: its S3 interface via AWS_ENDPOINT_URL_S3, or "
                             f"'pipe:gcloud storage cat gs://bucket/prefix/{{name}}')")
        return
    if location.startswith("pipe:"):
        if "{name}" not in location:
            raise ValueError(f"a pipe: location must contain '{{name}}' (the file to write to stdout), e.g. "
                             f"'pipe:aws s3 cp s3://bucket/prefix/{{name}} -'; got {redact(location)!r}")
        return
    parts = urlsplit(location)
    if parts.username or parts.password:
        raise ValueError(f"credentials in the shard location {redact(location)!r}: keep them out of configs "
                         f"(S3: AWS_* variables or ~/.aws; HTTP: ~/.netrc)")
    if parts.query or parts.fragment:
        raise ValueError(f"a shard location takes no query string or fragment (signed URLs are per object; "
                         f"tokens belong in ~/.netrc or the environment): {redact(location)!r}")
    if location.startswith("s3://") and not parts.netloc:
        raise ValueError(f"no bucket in {location!r}: expected s3://bucket/prefix")


def redact(text: str) -> str:
    """`text` with URL user info and query strings (signatures, tokens) masked, for logs and errors."""
    text = re.sub(r"(\w+://)[^/\s@:]*(?::[^/\s@]*)?@", r"\1***@", str(text))
    return re.sub(r"(\w+://[^\s?#'\"]*)\?[^\s'\"]*", r"\1?***", text)


def join(root: str | os.PathLike, name: str) -> str:
    """The location of file `name` under `root` (a pipe: command gets it in place of `{name}`)."""
    if not is_remote(root):
        return str(Path(root) / name)
    if root.startswith("pipe:"):
        return root.replace("{name}", shlex.quote(name))
    return root.rstrip("/") + "/" + name


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5            # tries in a row without progress before giving up
    timeout_s: float = 60.0      # connect and read timeout of one request
    backoff_s: float = 0.5       # first wait; doubles per failure, with jitter, up to max_backoff_s
    max_backoff_s: float = 8.0

    def wait(self, failures: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)


def transient_reason(exc: BaseException) -> str | None:
    """The retry-count reason of a transient failure, or None for a permanent one."""
    if isinstance(exc, TransientError):
        return exc.reason
    if isinstance(exc, (FileNotFoundError, PermissionError, RemoteError)):
        return None
    name = type(exc).__name__
    if isinstance(exc, (TimeoutError, socket.timeout)) or "Timeout" in name:
        return "timeout"
    response = getattr(exc, "response", None)         # botocore ClientError
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = response.get("Error", {}).get("Code", "")
        if status >= 500 or status == 429 or code in ("SlowDown", "RequestTimeout", "InternalError"):
            return f"http_{status or code}"
        return None
    if isinstance(exc, (ConnectionError, http.client.HTTPException, EOFError)):
        return "connection"
    module = type(exc).__module__
    if module.startswith(("botocore", "urllib3", "requests")):
        return "connection"    # connection closed, streaming error, protocol error, chunked-encoding error
    return None


def with_retries(what: str, fn: Callable, policy: RetryPolicy, on_retry: OnRetry | None = None):
    """fn() retried on transient errors; the last one raises RemoteError naming `what` (redacted)."""
    failures = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            reason = transient_reason(exc)
            if reason is None:
                raise
            failures += 1
            if failures >= policy.attempts:
                raise RemoteError(f"{redact(what)}: gave up after {failures} attempts: {redact(repr(exc))}") from exc
            if on_retry is not None:
                on_retry(reason)
            log.debug("retrying %s after %s (%s)", redact(what), reason, redact(repr(exc)))
            time.sleep(policy.wait(failures))


# ------------------------------------------------------------------------------------- backends
class _Backend:
    def open_at(self, url: str, offset: int, policy: RetryPolicy) -> tuple[object, int | None]:
        """A stream positioned at `offset` (with .read(n), .close()) and the object's total size."""
        raise NotImplementedError

    def exists(self, url: str, policy: RetryPolicy) -> bool:
        raise NotImplementedError

    def list_names(self, root: str, policy: RetryPolicy) -> list[str] | None:
        """File names directly under root, or None where the store cannot list (HTTP, pipe:)."""
        return None


_clients: dict = {}


def _s3_client(policy: RetryPolicy):
    """One client per process (and timeout): boto3 clients must not cross a fork into DataLoader workers."""
    key = (os.getpid(), policy.timeout_s, os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ENDPOINT_URL"))
    if key not in _clients:
        import boto3
        from botocore.config import Config
        # botocore's own retries off: this module retries (mid-stream too) and counts every retry
        cfg = Config(retries={"total_max_attempts": 1}, connect_timeout=policy.timeout_s,
                     read_timeout=policy.timeout_s, max_pool_connections=32)
        _clients[key] = boto3.session.Session().client("s3", config=cfg)
    return _clients[key]


def _s3_split(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key


def _missing(exc: Exception) -> bool:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound")


class _S3(_Backend):
    def open_at(self, url, offset, policy):
        bucket, key = _s3_split(url)
        try:
            resp = _s3_client(policy).get_object(Bucket=bucket, Key=key,
                                                 **({"Range": f"bytes={offset}-"} if offset else {}))
        except Exception as exc:
            if _missing(exc):
                raise FileNotFoundError(f"{url} does not exist") from exc
            raise
        size = resp.get("ContentLength")
        total = offset + size if size is not None else None
        return resp["Body"], total

    def exists(self, url, policy):
        bucket, key = _s3_split(url)
        try:
            _s3_client(policy).head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:
            if _missing(exc):
                return False
            raise

    def list_names(self, root, policy):
        bucket, prefix = _s3_split(root.rstrip("/") + "/")
        prefix = prefix.lstrip("/") if prefix != "/" else ""
        names = []
        for page in _s3_client(policy).get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names += [obj["Key"][len(prefix):] for obj in page.get("Contents", [])]
        return names


_sessions: dict = {}


class _HTTP(_Backend):
    @staticmethod
    def _get():
        """One session per process (connections reused across shards, never across a fork)."""
        if os.getpid() not in _sessions:
            import requests
            _sessions[os.getpid()] = requests.Session()   # trust_env: ~/.netrc and proxy variables
        return _sessions[os.getpid()]

    @staticmethod
    def _check(resp, url):
        if resp.status_code == 404:
            raise FileNotFoundError(f"{url} does not exist (HTTP 404)")
        if resp.status_code in (401, 403):
            raise PermissionError(f"{url}: HTTP {resp.status_code} (credentials go in ~/.netrc)")
        if resp.status_code >= 500 or resp.status_code == 429:
            raise TransientError(f"http_{resp.status_code}", f"{url}: HTTP {resp.status_code}")
        if resp.status_code >= 400:
            raise OSError(f"{url}: HTTP {resp.status_code}")

    def open_at(self, url, offset, policy):
        headers = {"Range": f"bytes={offset}-", "Accept-Encoding": "identity"} if offset else \
            {"Accept-Encoding": "identity"}
        resp = self._get().get(url, headers=headers, stream=True, timeout=(policy.timeout_s, policy.timeout_s))
        try:
            self._check(resp, url)
        except Exception:
            resp.close()
            raise
        length = resp.headers.get("Content-Length")
        raw = resp.raw
        if offset and resp.status_code == 200:     # the server ignored the range: skip what was delivered
            _discard(raw, offset)
            return raw, int(length) if length else None
        return raw, offset + int(length) if length else None

    def exists(self, url, policy):
        resp = self._get().head(url, timeout=(policy.timeout_s, policy.timeout_s), allow_redirects=True)
        if resp.status_code == 404:
            return False
        self._check(resp, url)
        return True


class _PipeStream:
    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        if not data:
            code = self.proc.wait()
            if code != 0:
                err = self.proc.stderr.read().decode("utf-8", "replace").strip()[-300:]
                raise TransientError("pipe_exit", f"{redact(self.command)} exited with {code}: {redact(err)}")
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()       # a shard given up early: do not leave the download running
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


class _Pipe(_Backend):
    def open_at(self, url, offset, policy):
        stream = _PipeStream(url[len("pipe:"):])
        if offset:
            _discard(stream, offset)
        return stream, None

    def exists(self, url, policy):
        return True        # a command cannot be asked; reading it tells


def _discard(stream, n: int) -> None:
    while n > 0:
        chunk = stream.read(min(n, BUFFER_BYTES))
        if not chunk:
            raise TransientError("connection", "stream ended while skipping to the resume offset")
        n -= len(chunk)


def _backend(url: str) -> _Backend:
    if url.startswith("s3://"):
        return _S3()
    if url.startswith(("http://", "https://")):
        return _HTTP()
    if url.startswith("pipe:"):
        return _Pipe()
    raise ValueError(f"not a remote location: {redact(url)}")


# ------------------------------------------------------------------------------------- reading
class RemoteReader(io.RawIOBase):
    """A forward-only stream of one remote object that resumes after transient errors."""

    def __init__(self, url: str, policy: RetryPolicy, on_retry: OnRetry | None = None):
        super().__init__()
        self.url, self.policy, self.on_retry = url, policy, on_retry
        self.backend = _backend(url)
        self.offset = 0
        self.total: int | None = None
        self._stream = None
        self._failures = 0
        self._reopen()

    def readable(self) -> bool:
        return True

    def _reopen(self) -> None:
        self._drop()
        self._stream, total = with_retries(self.url, lambda: self.backend.open_at(self.url, self.offset, self.policy),
                                           self.policy, self.on_retry)
        self.total = self.total if total is None else total

    def _drop(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except Exception:
                pass
            self._stream = None

    def readinto(self, buf) -> int:
        while True:
            try:
                data = self._stream.read(len(buf))
                if not data and self.total is not None and self.offset < self.total:
                    raise TransientError("connection", f"stream ended at byte {self.offset} of {self.total}")
            except Exception as exc:
                reason = transient_reason(exc)
                if reason is None:
                    raise
                self._failures += 1
                if self._failures >= self.policy.attempts:
                    raise RemoteError(f"{redact(self.url)}: gave up at byte {self.offset} after {self._failures} "
                                      f"failures in a row: {redact(repr(exc))}") from exc
                if self.on_retry is not None:
                    self.on_retry(reason)
                time.sleep(self.policy.wait(self._failures))
                self._reopen()
                continue
            n = len(data)
            buf[:n] = data
            self.offset += n
            if n:
                self._failures = 0
            return n

    def close(self) -> None:
        self._drop()
        super().close()


def open_stream(url: str, policy: RetryPolicy = RetryPolicy(), on_retry: OnRetry | None = None,
                cache=None) -> io.BufferedIOBase:
    """A buffered, resuming read stream of a remote object (through `cache`, a cache.ShardCache, when given)."""
    if cache is not None:
        hit = cache.lookup(url)
        if hit is not None:
            try:
                return open(hit, "rb", buffering=BUFFER_BYTES)
            except FileNotFoundError:
                pass            # evicted by another worker just now: read it remotely
    stream = io.BufferedReader(RemoteReader(url, policy, on_retry), BUFFER_BYTES)
    return cache.tee(url, stream) if cache is not None else stream


def read_bytes(url: str, policy: RetryPolicy = RetryPolicy(), on_retry: OnRetry | None = None) -> bytes:
    with open_stream(url, policy, on_retry) as f:
        return f.read()


def exists(url: str, policy: RetryPolicy = RetryPolicy()) -> bool:
    if not is_remote(url):
        return Path(url).is_file()
    backend = _backend(url)
    return with_retries(url, lambda: backend.exists(url, policy), policy)


def list_names(root: str, policy: RetryPolicy = RetryPolicy()) -> list[str] | None:
    """File names directly under root (a folder or s3:// prefix); None where the store cannot list."""
    if not is_remote(root):
        return sorted(p.name for p in Path(root).iterdir() if p.is_file()) if Path(root).is_dir() else []
    backend = _backend(root)
    return with_retries(root, lambda: backend.list_names(root, policy), policy)


# ------------------------------------------------------------------------------------- writing
class OutFolder:
    """Where the shard writer puts files: a local folder (plain os calls) or an s3:// prefix.

    S3 has no rename: `replace` is a server-side copy and a delete, and `write_bytes` (one PUT)
    is atomic, so the writer's order (shards under temporary names, old split removed, new names,
    index last) keeps the same guarantee as on a local disk.
    """

    def __init__(self, location: str | os.PathLike, policy: RetryPolicy = RetryPolicy()):
        self.location, self.policy = str(location), policy
        self.remote = is_remote(self.location)
        if self.remote and not self.location.startswith(WRITABLE_PREFIXES):
            raise ValueError(f"cannot write shards to {redact(self.location)}: use a folder or s3://bucket/prefix")
        if self.remote:
            check_location(self.location)
        else:
            Path(self.location).mkdir(parents=True, exist_ok=True)

    def url(self, name: str) -> str:
        return join(self.location, name)

    def _s3(self, op: str, name: str, fn: Callable):
        return with_retries(f"{op} {self.url(name)}", fn, self.policy)

    def names(self) -> list[str]:
        return list_names(self.location, self.policy) or []

    def delete(self, name: str) -> None:
        if not self.remote:
            Path(self.url(name)).unlink(missing_ok=True)
            return
        bucket, key = _s3_split(self.url(name))
        self._s3("delete", name, lambda: _s3_client(self.policy).delete_object(Bucket=bucket, Key=key))

    def replace(self, src: str, dst: str) -> None:
        if not self.remote:
            os.replace(self.url(src), self.url(dst))
            return
        bucket, src_key = _s3_split(self.url(src))
        _, dst_key = _s3_split(self.url(dst))
        # managed copy: multipart server-side copy above 5 GB, where a single CopyObject fails
        self._s3("copy", src, lambda: _s3_client(self.policy).copy(
            {"Bucket": bucket, "Key": src_key}, bucket, dst_key))
        self.delete(src)

    def put(self, local: str | os.PathLike, name: str) -> None:
        """Upload a finished local file as `name` (multipart for large shards)."""
        bucket, key = _s3_split(self.url(name))
        self._s3("upload", name, lambda: _s3_client(self.policy).upload_file(str(local), bucket, key))

    def read_bytes(self, name: str) -> bytes:
        return Path(self.url(name)).read_bytes() if not self.remote else read_bytes(self.url(name), self.policy)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomically: local via a temporary file and os.replace, S3 by a single PUT."""
        if not self.remote:
            path = Path(self.url(name))
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return
        bucket, key = _s3_split(self.url(name))
        self._s3("put", name, lambda: _s3_client(self.policy).put_object(Bucket=bucket, Key=key, Body=data))

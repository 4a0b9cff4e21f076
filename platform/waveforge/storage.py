"""Storage access for any URL through fsspec: plain paths, file://, s3://, gs:// (and anything fsspec knows).

    fs, path = filesystem("s3://bucket/shards", scfg)       # scfg: the recipe's StorageConfig (or None)
    read_bytes(url, scfg)  write_bytes(url, data, scfg)  exists(url, scfg)  put_file(local, url, scfg) ...

S3 settings come from the recipe's `storage` section, else from the standard AWS environment variables
(AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).

Every helper retries transient errors (connection resets, timeouts, throttling, 5xx) with exponential
backoff. Permanent errors are raised at once as `StorageError` with a message that names the URL/bucket
and what to check, never a raw botocore trace; its subclasses say which: `AccessDenied` (wrong key or
secret, no permission), `BucketMissing`, `Unreachable` (the endpoint did not answer through the retries).
A missing object raises the ordinary `FileNotFoundError`, so callers can treat it as "absent".
"""

from __future__ import annotations

import http.client
import os
import random
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse, urlsplit

import fsspec

from waveforge.config import StorageConfig, UserError

T = TypeVar("T")

DEFAULT_RETRIES = 5
BASE_DELAY_S = 0.5  # first backoff; doubles each retry (with jitter), capped at MAX_DELAY_S
MAX_DELAY_S = 20.0


class StorageError(OSError):
    """A storage operation failed for a reason retrying does not fix (credentials, bucket, endpoint)."""


class AccessDenied(StorageError, UserError):
    """The credentials were refused (wrong key or secret, or no permission on the bucket or file)."""


class BucketMissing(StorageError, UserError):
    """The URL's bucket does not exist."""


class CredentialsFileError(StorageError, UserError):
    """storage.credentials_file is missing, unreadable, or readable by others."""


class Unreachable(StorageError, UserError):
    """The storage endpoint did not answer, or kept failing, through every retry."""


def scheme(url: str) -> str:
    """'s3', 'gs', 'file', ... ('' and Windows drive letters count as 'file')."""
    s = urlparse(str(url)).scheme
    return "file" if len(s) <= 1 else s


def is_local(url: str) -> bool:
    return scheme(url) == "file"


def local_path(url: str) -> str:
    """The filesystem path of a plain path or file:// URL, read as fsspec reads it (and as the checkpoint and
    evaluation code do): everything after 'file://' is the path, relative to the working directory unless
    it starts with '/', with '~' expanded. So `file://runs/x` is ./runs/x, not /x on host 'runs'."""
    return os.path.expanduser(str(url).removeprefix("file://"))


def join(url: str, *names: str) -> str:
    """Join path components onto a URL or path with '/' (no normalisation of the scheme part)."""
    out = str(url).rstrip("/")
    for n in names:
        out = f"{out}/{str(n).strip('/')}"
    return out


def bucket(url: str) -> str:
    """The bucket of an object-store URL ('' for local paths)."""
    return "" if is_local(url) else urlparse(str(url)).netloc


def storage_options(scfg: StorageConfig | None, url: str) -> dict[str, Any]:
    """fsspec options for `url`: for s3, endpoint/region/credentials from `scfg`, else the AWS env vars."""
    scfg = scfg or StorageConfig()
    if scheme(url) not in ("s3", "s3a"):
        return {}
    endpoint = scfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
    region = scfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", "")
    from_file = read_credentials_file(scfg.credentials_file) if scfg.credentials_file else {}
    key = scfg.access_key or from_file.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_ACCESS_KEY_ID", "")
    secret = scfg.secret_key or from_file.get("AWS_SECRET_ACCESS_KEY") or os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    client_kwargs: dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if region:
        client_kwargs["region_name"] = region
    opts: dict[str, Any] = {
        "client_kwargs": client_kwargs,
        # Fail over to our own retry loop quickly instead of botocore's long internal one.
        "config_kwargs": {"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 2}},
    }
    if key:
        opts["key"] = key
    if secret:
        opts["secret"] = secret
    return opts


def read_credentials_file(path: str) -> dict[str, str]:
    """KEY=value lines (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; `export ` prefixes and quotes allowed) of a
    file only its owner may read (mode 0600 or stricter): a credentials file others can read is refused."""
    p = os.path.expanduser(path)
    try:
        mode = os.stat(p).st_mode & 0o777
        text = open(p).read()
    except OSError as e:
        raise CredentialsFileError(f"storage.credentials_file={path}: {e.strerror or e}") from None
    if mode & 0o077:
        raise CredentialsFileError(f"storage.credentials_file={path} can be read by others (mode {mode:o}): "
                                   f"chmod 600 {path}")
    out = {}
    for line in text.splitlines():
        line = line.strip().removeprefix("export ").strip()
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip().strip("'\"")
    return out


def filesystem(url: str, scfg: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for `url`. Instances are cached by fsspec per options."""
    fs, path = fsspec.core.url_to_fs(str(url), **storage_options(scfg, url))
    return fs, path


# --------------------------------------------------------------------------------------------------
# Error classification and retries
# --------------------------------------------------------------------------------------------------

_TRANSIENT_NAMES = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "ServerDisconnectedError", "ClientOSError", "ClientPayloadError", "IncompleteRead",
                    "ResponseStreamingError", "ProtocolError", "ServiceUnavailable", "SlowDown", "Throttling",
                    "RequestTimeout", "InternalError", "TimeoutError")
_AUTH_WORDS = ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "Forbidden", "403",
               "InvalidToken", "ExpiredToken", "NoCredentials", "Unable to locate credentials")


def _chain(exc: BaseException) -> list[BaseException]:
    out, e = [], exc
    while e is not None and len(out) < 8:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _is_transient(exc: BaseException) -> bool:
    for e in _chain(exc):
        name = type(e).__name__
        if isinstance(e, (ConnectionError, TimeoutError)) or any(n in name for n in _TRANSIENT_NAMES):
            return True
        text = str(e)
        if any(w in text for w in ("SlowDown", "Service Unavailable", "InternalError", "503", "500 ",
                                   "Connection reset", "timed out")):
            return True
    return False


def _is_auth(exc: BaseException) -> bool:
    return any(isinstance(e, PermissionError) or any(w in f"{type(e).__name__} {e}" for w in _AUTH_WORDS)
               for e in _chain(exc))


def _is_missing_bucket(exc: BaseException) -> bool:
    return any("NoSuchBucket" in f"{type(e).__name__} {e}" or "bucket does not exist" in str(e).lower()
               for e in _chain(exc))


def _endpoint_hint(url: str, scfg: StorageConfig | None) -> str:
    if is_local(url):
        return ""
    ep = storage_options(scfg, url).get("client_kwargs", {}).get("endpoint_url", "")
    return f" (endpoint {ep})" if ep else ""


def explain(exc: BaseException, url: str, what: str, scfg: StorageConfig | None = None) -> StorageError:
    """A StorageError with a message a user can act on, for the failure `exc` of `what` on `url`."""
    where = f"{url}{_endpoint_hint(url, scfg)}"
    b = bucket(url)
    kind: type[StorageError] = StorageError
    if _is_missing_bucket(exc):
        kind, msg = BucketMissing, f"{what} {where}: bucket {b!r} does not exist (create it, or fix the URL)"
    elif _is_auth(exc):
        kind = AccessDenied
        if is_local(url):
            msg = f"{what} {where}: permission denied"
        else:
            msg = (f"{what} {where}: access denied to bucket {b!r}: check the access key and secret "
                   f"(storage.access_key / storage.secret_key, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) "
                   f"and the bucket's permissions")
    elif _is_transient(exc):
        kind = Unreachable
        msg = (f"{what} {where}: storage unreachable or failing after retries: {type(exc).__name__}: {exc}. "
               f"Check the endpoint (storage.endpoint_url or AWS_ENDPOINT_URL) and the network")
    else:
        msg = f"{what} {where}: {type(exc).__name__}: {exc}"
    err = kind(msg)
    err.url = url  # type: ignore[attr-defined]
    return err


def with_retries(fn: Callable[[], T], url: str, what: str, *, retries: int = DEFAULT_RETRIES,
                 scfg: StorageConfig | None = None, on_retry: Callable[[int, BaseException], None] | None = None,
                 base_delay: float | None = None) -> T:
    """Call fn(); retry transient errors up to `retries` times with exponential backoff + jitter.

    FileNotFoundError (object or file absent) passes through unchanged (callers decide what absent means),
    unless the bucket itself is missing; every other failure becomes a StorageError naming `url`.
    `on_retry(attempt, exc)` is called before each retry (counters, logs).
    """
    base_delay = BASE_DELAY_S if base_delay is None else base_delay
    attempt = 0
    while True:
        try:
            return fn()
        except FileNotFoundError as e:
            if _is_missing_bucket(e):
                raise explain(e, url, what, scfg) from None
            raise
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            if _is_transient(e) and not _is_auth(e) and attempt < retries:
                attempt += 1
                if on_retry is not None:
                    on_retry(attempt, e)
                delay = min(MAX_DELAY_S, base_delay * 2 ** (attempt - 1))
                time.sleep(delay * (0.75 + 0.5 * random.random()))
                continue
            raise explain(e, url, what, scfg) from None


# --------------------------------------------------------------------------------------------------
# Small helpers (each retried). `url` may be a plain path, file://, s3://, gs://, ...
# --------------------------------------------------------------------------------------------------


def exists(url: str, scfg: StorageConfig | None = None, retries: int = DEFAULT_RETRIES) -> bool:
    fs, path = filesystem(url, scfg)

    def check() -> bool:
        fs.invalidate_cache(path)
        return fs.exists(path)

    return with_retries(check, url, "checking", retries=retries, scfg=scfg)


def size(url: str, scfg: StorageConfig | None = None, retries: int = DEFAULT_RETRIES) -> int:
    """Bytes of the object at `url` (FileNotFoundError if absent)."""
    fs, path = filesystem(url, scfg)
    return int(with_retries(lambda: fs.size(path), url, "reading the size of", retries=retries, scfg=scfg))


def read_bytes(url: str, scfg: StorageConfig | None = None, retries: int = DEFAULT_RETRIES,
               on_retry: Callable[[int, BaseException], None] | None = None, start: int | None = None,
               end: int | None = None) -> bytes:
    """The object's bytes [start, end) (the whole object by default; fewer when it is shorter). From s3:// a
    single GET: see `_s3_get`."""
    fs, path = filesystem(url, scfg)
    if scheme(url) in ("s3", "s3a"):
        return with_retries(lambda: _s3_get(fs, path, start, end), url, "reading", retries=retries, scfg=scfg,
                            on_retry=on_retry)
    return with_retries(lambda: fs.cat_file(path, start=start, end=end), url, "reading", retries=retries,
                        scfg=scfg, on_retry=on_retry)


# --------------------------------------------------------------------------------------------------
# S3 object reads: a presigned GET on a kept-alive connection
# --------------------------------------------------------------------------------------------------

PRESIGN_EXPIRES_S = 3600  # validity of a presigned GET URL; a URL is re-signed after half of it
_presigned: dict[tuple[Any, str], tuple[float, str]] = {}
_connections = threading.local()  # per thread: {(scheme, host, port): http.client connection}
FAST_GET_STATS = {"fast": 0, "fallback": 0}  # reads served by the presigned GET / handed to s3fs


def _connection(scheme_: str, host: str, port: int | None, fresh: bool) -> http.client.HTTPConnection:
    conns = getattr(_connections, "map", None)
    if conns is None:
        conns = _connections.map = {}
    key = (scheme_, host, port)
    conn = conns.get(key)
    if conn is None or fresh:
        if conn is not None:
            conn.close()
        if scheme_ == "https":
            import ssl

            ctx = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)
            conn = http.client.HTTPSConnection(host, port, timeout=60, context=ctx)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=60)
        conns[key] = conn
    return conn


def _fast_get(fs: Any, path: str, start: int | None, end: int | None) -> bytes | None:
    """The bytes by one GET of a presigned URL on this thread's kept-alive connection, or None to let s3fs do
    the request (anything but a 200/206 answer: missing object or bucket, denied access, redirects, server
    errors, an unreachable endpoint; also proxies). s3fs's own GET costs ~2.7 ms of client CPU per 1 MiB
    object and ~1.1 ms per further MiB (botocore's per-request machinery, aiohttp's chunked body); this
    one ~0.5 ms and ~0.5 ms per MiB, and the server does less work per request too. Every failure takes
    s3fs's path, so errors are exactly s3fs's (classified by `with_retries`)."""
    if not hasattr(fs, "url") or getattr(fs, "req_kw", None) or min(start or 0, end or 0) < 0:
        return None
    now = time.monotonic()
    got = _presigned.get((fs, path))
    try:
        if got is None or now - got[0] > PRESIGN_EXPIRES_S / 2:
            if len(_presigned) > 65536:
                _presigned.clear()
            got = _presigned[(fs, path)] = (now, fs.url(path, expires=PRESIGN_EXPIRES_S))
    except Exception:  # noqa: BLE001 - e.g. no credentials: s3fs reports it
        return None
    u = urlsplit(got[1])
    if u.scheme not in ("http", "https") or not u.hostname or (
            urllib.request.getproxies() and not urllib.request.proxy_bypass(u.hostname)):
        return None
    headers = {}
    if start is not None or end is not None:
        lo = start or 0
        if end is not None and end <= lo:
            return b""
        headers["Range"] = f"bytes={lo}-{'' if end is None else end - 1}"
    target = f"{u.path}?{u.query}" if u.query else u.path
    for fresh in (False, True):  # a kept-alive connection the server closed meanwhile: once more, anew
        conn = _connection(u.scheme, u.hostname, u.port, fresh)
        try:
            conn.request("GET", target, headers=headers)
            resp = conn.getresponse()
            status, data = resp.status, resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            if fresh:
                return None
            continue
        if status in (200, 206):
            FAST_GET_STATS["fast"] += 1
            return data[start or 0:end] if status == 200 and headers else data  # 200: the range was ignored
        _presigned.pop((fs, path), None)  # e.g. expired credentials: sign anew next time
        return None
    return None


def _s3_get(fs: Any, path: str, start: int | None, end: int | None) -> bytes:
    data = _fast_get(fs, path, start, end)
    if data is None:
        FAST_GET_STATS["fallback"] += 1
        data = fs.cat_file(path, start=start, end=end)
    return data


def read_text(url: str, scfg: StorageConfig | None = None, retries: int = DEFAULT_RETRIES) -> str:
    return read_bytes(url, scfg, retries).decode()


def _replace_local(path: str, write: Callable[[str], Any]) -> None:
    """Local files are never half-written: `write(tmp)` fills a temporary name, renamed over `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_bytes(url: str, data: bytes, scfg: StorageConfig | None = None, retries: int = DEFAULT_RETRIES) -> None:
    """Write `data` to `url`. Local files are written to a temporary name and renamed (never half-written)."""
    if is_local(url):
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        with_retries(lambda: _replace_local(local_path(url), write), url, "writing", retries=retries, scfg=scfg)
        return
    fs, path = filesystem(url, scfg)
    with_retries(lambda: fs.pipe_file(path, data), url, "writing", retries=retries, scfg=scfg)


def write_text(url: str, text: str, scfg: StorageConfig | None = None, retries: int = DEFAULT_RETRIES) -> None:
    write_bytes(url, text.encode(), scfg, retries)


def put_file(local: str, url: str, scfg: StorageConfig | None = None, retries: int = DEFAULT_RETRIES) -> None:
    """Upload (or copy) the local file `local` to `url`."""
    if is_local(url):
        import shutil

        with_retries(lambda: _replace_local(local_path(url), lambda tmp: shutil.copyfile(local, tmp)), url,
                     "copying to", retries=retries, scfg=scfg)
        return
    fs, path = filesystem(url, scfg)
    with_retries(lambda: fs.put_file(local, path), url, "uploading to", retries=retries, scfg=scfg)


def get_file(url: str, local: str, scfg: StorageConfig | None = None, retries: int = DEFAULT_RETRIES) -> None:
    """Download `url` to the local file `local` (written to a temporary name, then renamed)."""
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = f"{local}.tmp{os.getpid()}"
    fs, path = filesystem(url, scfg)

    def get() -> None:
        fs.get_file(path, tmp)
        os.replace(tmp, local)

    with_retries(get, url, "downloading", retries=retries, scfg=scfg)


def listdir(url: str, scfg: StorageConfig | None = None, retries: int = DEFAULT_RETRIES) -> list[str]:
    """Names (not paths) of the entries directly under `url`, sorted; [] if the folder does not exist."""
    fs, path = filesystem(url, scfg)

    def ls() -> list[str]:
        fs.invalidate_cache(path)
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    return with_retries(ls, url, "listing", retries=retries, scfg=scfg)


def remove(url: str, scfg: StorageConfig | None = None, recursive: bool = False,
           retries: int = DEFAULT_RETRIES) -> None:
    """Delete `url` (a folder only with recursive=True). Absent is not an error."""
    fs, path = filesystem(url, scfg)

    def rm() -> None:
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    with_retries(rm, url, "deleting", retries=retries, scfg=scfg)


def makedirs(url: str, scfg: StorageConfig | None = None, retries: int = DEFAULT_RETRIES) -> None:
    """Create a local folder; for an object-store URL, create its bucket if it does not exist yet."""
    if is_local(url):
        os.makedirs(local_path(url), exist_ok=True)
        return
    b = bucket(url)
    fs, _ = filesystem(url, scfg)
    root = f"{scheme(url)}://{b}"

    def make() -> None:
        fs.invalidate_cache(b)
        if not fs.exists(b):
            try:
                fs.mkdir(b)
            except FileExistsError:
                pass

    with_retries(make, root, "creating bucket", retries=retries, scfg=scfg)

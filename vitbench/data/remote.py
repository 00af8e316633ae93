"""Where `--data-dir` points, and reading a file there, local or remote, without a shell.

  /data/imagenet-wds                       a local directory
  https://host/prefix                      any HTTP(S) server (plain http:// only to a loopback address: tests)
  s3://bucket/prefix                       S3 or any S3-compatible store: AWS_ENDPOINT_URL_S3 and the standard AWS
                                           environment and credential chain (s3fs)
  gs://bucket/prefix                       Google Cloud Storage (Application Default Credentials, through gcsfs;
                                           STORAGE_EMULATOR_HOST: an emulator)
  hf://datasets/ORG/REPO[@revision][/dir]  the Hugging Face Hub (HF_TOKEN); the revision is pinned to a commit

A remote file is read as one streaming request through a read buffer. A request that fails (a 429 or 5xx, a
body cut mid-transfer, no byte for `stall_s`) is retried with exponential backoff and jitter, honouring
Retry-After, and resumes at the byte offset with a Range request; a server that answers it with the whole file
is read from the start again and the bytes already delivered are skipped, never taken for the rest. After
`attempts` failures in a row the read raises RemoteReadError, an OSError: the shard readers count what it cost
as lost samples, as for any unreadable shard. Secrets travel in request headers only, and only to the origin
they are for: never in a URL, argv, results.json, W&B or a log line. No subprocess is ever started here.
"""

from __future__ import annotations

import email.utils
import io
import ipaddress
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

from vitbench.errors import UserError

READ_BUFFER = 1 << 20  # bytes per read from the network (tar members are read in far smaller pieces)
MAX_REDIRECTS = 5
_HF_REPO = re.compile(r"^datasets/([\w.-]+/[\w.-]+)(?:@([\w./-]+?))?(?:/(.*))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


# Jitter from a generator of its own: a retry must not draw from `random`, whose state drives augmentation (a
# run with retries would otherwise train on other crops than the same run without).
_JITTER = random.Random()


class LocationError(UserError):
    pass


class RemoteReadError(OSError):
    """A remote file that could not be read within the retry policy (an OSError, so it is counted as lost)."""


@dataclass(frozen=True)
class Location:
    """A directory of shards. BASE: a local path, or the URL prefix the shards' names are joined to."""

    scheme: str  # "file", "https", "http", "s3", "gs" or "hf"
    base: str
    source: str  # as given (refused if it holds a secret), recorded in results.json and checkpoints
    revision: str | None = None  # hf: the commit, once pinned

    @property
    def remote(self) -> bool:
        return self.scheme != "file"

    def join(self, name: str) -> str:
        """Where file NAME (a plain relative name, checked by shardformat) of this directory is read from."""
        if not self.remote:
            return str(Path(self.base) / name)
        return f"{self.base}/{quote(name)}"


def parse(text: str, flag: str = "--data-dir") -> Location:
    """FLAG's TEXT as a Location, checked without any request: anything but the forms above is refused."""
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", text):  # no scheme: a local path
        return Location("file", str(Path(text).expanduser()), text)
    # Messages name the scheme, host and path only: what follows `pipe:`, credentials and a query (a signature)
    # are never echoed.
    u = urlsplit(text)
    scheme, forms = u.scheme.lower(), "a local directory, https://, s3://, gs:// or hf://datasets/ORG/REPO"
    if scheme not in ("https", "http", "s3", "gs", "hf"):
        raise LocationError(f"{flag}: '{scheme}:' is not a place shards are read from ({forms}); "
                            "nothing is ever run through a shell")
    path = u.path.rstrip("/")
    shown = f"{scheme}://{u.hostname or ''}{f':{u.port}' if u.port else ''}{path}"
    if u.username or u.password or "@" in u.netloc:
        raise LocationError(f"{flag} {shown}: credentials do not belong in the URL (it is recorded in "
                            "results.json); use HF_TOKEN, the AWS environment or Google's default credentials")
    if u.query or u.fragment or "?" in text or "#" in text:
        raise LocationError(f"{flag} {shown}: a query string or fragment is not part of a shard directory")
    if not u.netloc:
        raise LocationError(f"{flag} {text!r}: no host or bucket ({forms})")
    if scheme == "http" and not _loopback(u.hostname):
        raise LocationError(f"{flag} {shown}: plain http:// is only for a server on this machine (tests); "
                            "use https://")
    if scheme != "hf":
        return Location(scheme, f"{scheme}://{u.netloc}{path}", text)
    m = _HF_REPO.match(f"{u.netloc}{path}")
    if not m:
        raise LocationError(f"{flag} {shown}: the Hub form is hf://datasets/ORG/REPO[@revision][/subdir]")
    repo, revision, subdir = m.group(1), m.group(2) or "main", (m.group(3) or "").strip("/")
    return Location("hf", _hf_base(repo, revision, subdir), text, revision=revision)


def _loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _hf_base(repo: str, revision: str, subdir: str) -> str:
    base = f"{_hf_endpoint()}/datasets/{repo}/resolve/{quote(revision, safe='')}"
    return f"{base}/{quote(subdir)}" if subdir else base


def pin(location: Location) -> Location:
    """An hf:// location with its revision (a branch or tag) resolved to the commit it names now, so that every
    rank, and a resumed run, reads the same files (one Hub API request). Others are returned as they are."""
    if location.scheme != "hf" or _COMMIT.match(location.revision or ""):
        return location
    from huggingface_hub import HfApi

    m = _HF_REPO.match(location.source.split("://", 1)[1].rstrip("/"))
    repo, subdir = m.group(1), (m.group(3) or "").strip("/")
    try:
        info = HfApi(endpoint=_hf_endpoint()).dataset_info(repo, revision=location.revision,
                                                            token=os.environ.get("HF_TOKEN") or None)
    except Exception as e:  # not found, gated without a token, no network: one line, no token in it
        raise LocationError(f"--data-dir {location.source}: the Hub did not resolve revision "
                            f"{location.revision!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return Location("hf", _hf_base(repo, info.sha, subdir), location.source, revision=info.sha)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8  # failed requests in a row before a file counts as unreadable
    backoff_s: float = 1.0  # the first wait; doubled after each failure, with jitter
    max_wait_s: float = 60.0  # no wait longer than this, a Retry-After included
    stall_s: float = 60.0  # no byte for this long ends the request (a slow stream that moves is never cut)
    connect_s: float = 20.0

    ENV = {"attempts": "VITBENCH_READ_ATTEMPTS", "backoff_s": "VITBENCH_READ_BACKOFF_S",
           "stall_s": "VITBENCH_READ_STALL_S"}

    @classmethod
    def from_env(cls, environ=os.environ) -> "RetryPolicy":
        """The policy, with VITBENCH_READ_ATTEMPTS / _BACKOFF_S / _STALL_S where set; checked at start."""
        values = {}
        for name, var in cls.ENV.items():
            if var in environ:
                try:
                    value = (int if name == "attempts" else float)(environ[var])
                except ValueError:
                    value = -1
                if not value > 0 or value == float("inf"):
                    raise LocationError(f"{var}={environ[var]!r} is not a number > 0")
                values[name] = value
        return cls(**values)

    def wait(self, failures: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_wait_s)
        return min(self.max_wait_s, self.backoff_s * 2 ** (failures - 1)) * _JITTER.uniform(0.5, 1.0)


def open_file(path_or_url: str, policy: RetryPolicy | None = None):
    """A readable binary file: a local file as it is; a remote one through a read buffer, resumable."""
    if "://" not in path_or_url:
        return open(path_or_url, "rb")
    return io.BufferedReader(ResumableReader(path_or_url, policy or RetryPolicy.from_env()), READ_BUFFER)


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class ResumableReader(io.RawIOBase):
    """One remote file as a raw stream: one request, resumed at the byte offset after a failure."""

    def __init__(self, url: str, policy: RetryPolicy):
        self.url, self.policy = url, policy
        self.pos, self.size, self.failures, self._body = 0, None, 0, None
        self._backend = _S3 if url.startswith("s3://") else _Http

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            try:
                if self._body is None:
                    self._body, self.size = self._backend.open(self.url, self.pos, self.policy)
                n = self._body.readinto(buffer)
                if n == 0 and self.size is not None and self.pos < self.size:
                    raise _Retryable(f"the body ended at byte {self.pos} of {self.size}")
            except (FileNotFoundError, PermissionError, RemoteReadError):
                raise
            except Exception as e:  # a cut body, a stall, a reset connection, a 503: resume from self.pos
                self._failed(e)
                continue
            if n:
                self.pos += n
                self.failures = 0  # progress: the next failure starts a new count
            return n

    def _failed(self, e: Exception) -> None:
        self._close_body()
        self.failures += 1
        if self.failures >= self.policy.attempts:
            raise RemoteReadError(f"{_redacted(self.url)}: unreadable after {self.failures} attempts at byte "
                                  f"{self.pos} (last: {type(e).__name__}: {_redacted(str(e))[:200]})") from None
        time.sleep(self.policy.wait(self.failures, getattr(e, "retry_after", None)))

    def _close_body(self) -> None:
        body, self._body = self._body, None
        try:
            if body is not None:
                body.close()
        except Exception:
            pass

    def close(self) -> None:
        self._close_body()
        super().close()


def _redacted(text: str) -> str:
    """TEXT (a URL, or an error naming one) without query strings: a pre-signed redirect target's holds a
    signature."""
    return re.sub(r"\?[^\s'\")]*", "?...", text)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class _PerProcess:
    """A client made in the process that uses it: network clients are not fork-safe, and loader workers fork."""

    def __init__(self, make, key=os.getpid):
        self.make, self.key, self.made_for, self.value, self.lock = make, key, None, None, threading.Lock()

    def get(self):
        with self.lock:
            if self.made_for != (key := self.key()):
                self.value, self.made_for = self.make(), key
            return self.value


def _requests_session():
    import requests

    session = requests.Session()
    session.trust_env = False  # no ~/.netrc credentials added to a request behind our back
    return session


_SESSION = _PerProcess(_requests_session)


def _auth_headers(url: str) -> dict:
    """The secret for URL's origin, if one is configured: HF_TOKEN for the Hub, Google's credentials for GCS."""
    host = urlsplit(url).hostname
    if host == urlsplit(_hf_endpoint()).hostname and os.environ.get("HF_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"}
    if host == "storage.googleapis.com":
        return _GCS_CREDENTIALS.get()()
    return {}


def _gcs_endpoint() -> str:
    """GCS, or the emulator STORAGE_EMULATOR_HOST names (the variable Google's own clients read)."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        return emulator.rstrip("/") if "://" in emulator else f"http://{emulator}"
    return "https://storage.googleapis.com"


def _gcs_credentials():
    """gcsfs's credentials (Application Default Credentials; anonymous where there are none, said once)."""
    from gcsfs.credentials import GoogleCredentials

    try:
        creds = GoogleCredentials(project=None, access="read_only", token="google_default")
    except Exception as e:
        print(f"warning: no Google credentials ({type(e).__name__}); reading gs:// anonymously (public buckets)")
        return lambda: {}

    def headers() -> dict:
        h = {}
        creds.apply(h)
        return h
    return headers


_GCS_CREDENTIALS = _PerProcess(_gcs_credentials)


class _Http:
    @staticmethod
    def open(url: str, offset: int, policy: RetryPolicy):
        """(body, total size) of URL from OFFSET. Redirects are followed here: the secret goes only to URL's
        origin, never to another one (the Hub redirects to a CDN)."""
        if url.startswith("gs://"):  # GCS's XML API: a plain GET of /bucket/object, Range honoured
            bucket, _, key = url[5:].partition("/")
            url = f"{_gcs_endpoint()}/{bucket}/{key}"
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
        origin, target = _origin(url), url
        for _ in range(MAX_REDIRECTS + 1):
            resp = _SESSION.get().get(target, stream=True, allow_redirects=False, timeout=(policy.connect_s,
                                      policy.stall_s), headers={**headers, **(_auth_headers(url) if
                                                                           _origin(target) == origin else {})})
            if not resp.is_redirect:
                break
            resp.close()
            target = urljoin(target, resp.headers["Location"])
            if urlsplit(target).scheme not in ("https", "http"):
                raise RemoteReadError(f"{_redacted(url)}: redirected to a {urlsplit(target).scheme}: URL")
        else:
            raise RemoteReadError(f"{_redacted(url)}: more than {MAX_REDIRECTS} redirects")
        status = resp.status_code
        if status not in (200, 206):
            resp.close()
        if status in (401, 403):
            raise PermissionError(f"{_redacted(url)}: HTTP {status} (a token or credentials that grant access?)")
        if status in (404, 410):
            raise FileNotFoundError(f"{_redacted(url)}: HTTP {status}")
        if status == 408 or status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}", _retry_after(resp.headers.get("Retry-After")))
        if status not in (200, 206):
            raise RemoteReadError(f"{_redacted(url)}: unexpected HTTP {status}")
        body = resp.raw
        if status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:  # never take another stretch of the file for the rest
                resp.close()
                raise _Retryable(f"asked for byte {offset} on, the server sent {resp.headers.get('Content-Range')}")
            return body, int(m.group(2)) if m.group(2) != "*" else None
        size = int(resp.headers["Content-Length"]) if "Content-Length" in resp.headers else None
        _skip(body, offset)  # a 200 to a ranged request: the whole file again; drop what was delivered
        return body, size


def _origin(url: str) -> tuple:
    u = urlsplit(url)
    return u.scheme, u.hostname, u.port or {"https": 443, "http": 80}.get(u.scheme)


def _skip(body, n: int) -> None:
    while n > 0:
        got = body.read(min(n, READ_BUFFER))
        if not got:
            raise _Retryable(f"the body ended while skipping to byte {n}")
        n -= len(got)


def _s3fs():
    import s3fs

    # s3fs's own client: AWS_ENDPOINT_URL_S3 and the AWS credential chain. Its retries cover the request; the
    # body is ours to resume. read_timeout is the stall limit of one socket read.
    policy = RetryPolicy.from_env()
    return s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={"read_timeout": policy.stall_s,
                                                                      "connect_timeout": policy.connect_s})


_S3FS = _PerProcess(_s3fs, key=lambda: (os.getpid(), os.environ.get("AWS_ENDPOINT_URL_S3"),
                                         os.environ.get("AWS_ENDPOINT_URL")))


class _S3Body:
    def __init__(self, fs, stream):
        self.fs, self.stream = fs, stream

    def readinto(self, buffer) -> int:
        from fsspec.asyn import sync

        data = sync(self.fs.loop, self.stream.read, len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.stream.close()


class _S3:
    @staticmethod
    def open(url: str, offset: int, policy: RetryPolicy):
        """One GetObject from OFFSET, streamed (s3fs's own reads would make one request per block)."""
        from fsspec.asyn import sync

        fs = _S3FS.get()
        bucket, _, key = url[5:].partition("/")
        kwargs = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = sync(fs.loop, fs._call_s3, "get_object", Bucket=bucket, Key=key, **kwargs)
        except FileNotFoundError:
            raise FileNotFoundError(f"{url}: no such object") from None
        if offset:
            m = re.match(r"bytes (\d+)-\d+/(\d+)", resp.get("ContentRange", ""))
            if not m or int(m.group(1)) != offset:
                resp["Body"].close()
                raise _Retryable(f"asked for byte {offset} on, the store sent {resp.get('ContentRange')}")
            return _S3Body(fs, resp["Body"]), int(m.group(2))
        return _S3Body(fs, resp["Body"]), resp.get("ContentLength")

"""A client of the OCI distribution API v2 over http.client: TLS, auth, proxies, retries,
resumable transfers (image references are sysbake.oci.reference's).

Plain http is used only with --tls-verify=false or for a loopback registry (127.0.0.0/8,
::1, localhost) that does not speak TLS, as docker does for loopback; a loopback registry
that does offer TLS is still verified. Bearer tokens (realm/service/scope, or an identity
token a credential helper gave) and Basic auth answer the registry's `WWW-Authenticate`
challenge; Basic credentials go to a token realm only on the registry's own host or over
https.

Every transfer must keep moving (`Limits`): a response that brings fewer than
`min_rate` bytes/s over a window (default 1 KiB/s over 30 s), or a request body the registry
does not take at that rate, is dropped with an error saying so.

Real networks (`Proxies`, `Retry`):
* Proxies as docker and podman (Go) read them: $HTTPS_PROXY for https, $HTTP_PROXY for
  http (upper case first, then lower case), never for loopback hosts nor for the hosts
  $NO_PROXY names (domains with their subdomains, ".domain" for subdomains only, IPs,
  CIDRs, any of them with ":port", "*" for all). An https registry is reached through an
  HTTP CONNECT tunnel, a plain-http one with absolute-URI requests; the proxy's own URL
  is http:// (user:password@ in it authenticates to the proxy).
* One kept-alive connection per host (and proxy), reused while the server keeps it open.
* Idempotent requests (GET, HEAD, PUT, DELETE) are tried again on 429 and 5xx answers
  and on dropped connections (reset, closed before an answer), at most `Retry.attempts`
  times in all, waiting as Retry-After says or backing off (0.5 s doubling, with jitter);
  a Retry-After longer than `Retry.longest` is not waited for. A slow registry (above)
  and a refused connection are not tried again.
* A blob download cut short resumes where it stopped (a Range request; a server that
  ignores Range has its first bytes skipped).
* `Session.upload_blob`: a blob larger than one chunk (32 MiB, $SYSBAKE_REGISTRY_CHUNK
  bytes, at least the registry's OCI-Chunk-Min-Length) goes in chunked PATCHes with
  Content-Range; after a dropped connection or a 429/5xx the upload's status (GET of its
  location) says where to resume. A registry that refuses chunks gets one streamed PUT;
  an upload that cannot resume (the registry forgot it, the final PUT failed) starts the
  blob over, within the same bound.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import json
import os
import select
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from sysbake import log
from sysbake.records import field, record
from sysbake.registry.auth import (
    Challenge,
    Credentials,
    RegistryError,
    parse_challenges,
    pick_challenge,
)

DEFAULT_MIN_RATE = 1.0  # KiB/s: a registry that drips bytes is dropped
DEFAULT_WINDOW = 30.0  # seconds: what docker and podman allow a silent connection
MIN_RATE_ENV = "SYSBAKE_REGISTRY_MIN_RATE"
WINDOW_ENV = "SYSBAKE_REGISTRY_WINDOW"
CHUNK = 1 << 20
SEND_BLOCK = 64 << 10  # small enough that a slow but honest uplink moves a block per window
_CERT_DIRS = (Path("/etc/containers/certs.d"), Path("/etc/docker/certs.d"))


class Body(Protocol):
    """A streamed request body: read in chunks, rewound to resend after a 401."""

    def read(self, n: int = -1) -> bytes: ...
    def tell(self) -> int: ...
    def seek(self, pos: int) -> int: ...


class SlowTransfer(OSError):
    """A registry moved fewer bytes than the minimum rate over a window (the message says
    how many); an OSError so that it unwinds http.client like a dropped connection."""


@record
class Limits:
    """How slow a registry may be: at least `min_rate` KiB/s over every `window` seconds
    of a transfer (0: any rate, but never a whole window without a byte)."""

    min_rate: float = DEFAULT_MIN_RATE
    window: float = DEFAULT_WINDOW

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Limits:
        """The defaults, overridden by $SYSBAKE_REGISTRY_MIN_RATE (KiB/s) and
        $SYSBAKE_REGISTRY_WINDOW (seconds)."""
        env = os.environ if env is None else env
        return cls(
            _number(env, MIN_RATE_ENV, DEFAULT_MIN_RATE, minimum=0.0),
            _number(env, WINDOW_ENV, DEFAULT_WINDOW, minimum=0.1),
        )

    def floor(self) -> float:
        """The fewest bytes a window must move."""
        return self.min_rate * 1024 * self.window


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= minimum or value == float("inf"):
        raise RegistryError(f"${name}={text!r}: expected a number of at least {minimum:g}")
    return value


class RateWindow:
    """Counts the bytes a transfer moves per window of `limits.window` seconds (the first
    window opens at the first `deadline()` call); `check` raises SlowTransfer when a window
    that has ended moved too few, else opens the next one."""

    def __init__(self, limits: Limits, verb: str) -> None:
        self.limits, self.verb = limits, verb
        self.start: float | None = None
        self.count = 0

    def deadline(self) -> float:
        if self.start is None:
            self.start = time.monotonic()
        return self.start + self.limits.window

    def check(self) -> None:
        now = time.monotonic()
        if now < self.deadline():
            return
        if self.count == 0 or self.count < self.limits.floor():
            raise SlowTransfer(
                f"the registry {self.verb} {self.count} bytes in "
                f"{self.limits.window:g} s (less than the minimum of "
                f"{self.limits.min_rate:g} KiB/s)"
            )
        self.start, self.count = now, 0

    def add(self, n: int) -> None:
        self.count += n


class _MeteredSocket(io.RawIOBase):
    """A response socket read under a RateWindow: each wait ends at the window's end."""

    def __init__(self, sock: socket.socket, limits: Limits) -> None:
        # makefile() keeps the socket open until this file is closed, as http.client expects
        # (it closes the connection early and lets the response finish reading).
        self._file = sock.makefile("rb", buffering=0)
        self._sock = sock
        self._window = RateWindow(limits, "sent")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            self._window.check()
            self._sock.settimeout(max(self._window.deadline() - time.monotonic(), 0.001))
            try:
                n = self._sock.recv_into(buffer)
            except TimeoutError:
                continue  # the window ended: check() decides
            self._window.add(n)
            return n

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


@functools.lru_cache(maxsize=8)
def _response_class(limits: Limits) -> type[http.client.HTTPResponse]:
    """An HTTPResponse whose socket reads (status line, headers, body) keep to `limits`."""

    class MeteredResponse(http.client.HTTPResponse):
        def __init__(self, sock: socket.socket, *args: Any, **kw: Any) -> None:
            super().__init__(sock, *args, **kw)
            self.fp.close()
            self.fp = io.BufferedReader(_MeteredSocket(sock, limits), CHUNK)

    return MeteredResponse


def is_loopback(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@record
class TlsOptions:
    """--tls-verify and --cert-dir (a directory of *.crt CAs and *.cert/*.key pairs, or one
    CA file); without cert_dir, /etc/containers/certs.d/HOST and /etc/docker/certs.d/HOST."""

    verify: bool = True
    cert_dir: Path | None = None


def tls_context(registry: str, options: TlsOptions) -> ssl.SSLContext:
    """A client TLS context for `registry`: system CAs plus the cert dir's."""
    context = ssl.create_default_context()
    if not options.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    dirs = [options.cert_dir] if options.cert_dir else [d / registry for d in _CERT_DIRS]
    for d in dirs:
        if d.is_file():
            _load(context.load_verify_locations, d, cafile=str(d))
        elif d.is_dir():
            for ca in sorted(d.glob("*.crt")):
                _load(context.load_verify_locations, ca, cafile=str(ca))
            for cert in sorted(d.glob("*.cert")):
                _load(context.load_cert_chain, cert, str(cert), str(cert.with_suffix(".key")))
        elif options.cert_dir is not None:
            raise RegistryError(f"--cert-dir {d}: no such file or directory")
    return context


def _load(fn: Any, path: Path, *args: Any, **kw: Any) -> None:
    try:
        fn(*args, **kw)
    except (OSError, ssl.SSLError) as exc:
        raise RegistryError(f"{path}: not a usable PEM certificate or key ({exc})") from exc


# -- proxies ----------------------------------------------------------------------------------


@record
class Proxy:
    """An HTTP proxy: its host and port, the Proxy-Authorization its URL's user:password
    gives ("" for none), and the variable that named it (for messages)."""

    host: str
    port: int
    auth: str = ""
    source: str = ""

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Proxy-Authorization": self.auth} if self.auth else {}


def parse_proxy(value: str, source: str) -> Proxy:
    """The Proxy of a $HTTPS_PROXY-style value ("host:port" or "http://[user:pw@]host[:port]")."""
    text = value.strip()
    url = urllib.parse.urlsplit(text if "://" in text else f"http://{text}")
    if url.scheme != "http":
        raise RegistryError(
            f"{source}={value!r}: only http:// proxies are supported (not {url.scheme}://)"
        )
    try:
        port = url.port or 80
    except ValueError:
        port = -1
    if not url.hostname or port < 1:
        raise RegistryError(f"{source}={value!r}: expected http://HOST[:PORT]")
    auth = ""
    if url.username is not None:
        user = urllib.parse.unquote(url.username)
        password = urllib.parse.unquote(url.password or "")
        auth = Credentials(user, password).basic()
    return Proxy(url.hostname, port, auth, source)


@record
class Proxies:
    """Which proxy, if any, a request goes through (the module docstring has the rules)."""

    https: Proxy | None = None
    http: Proxy | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Proxies:
        env = os.environ if env is None else env

        def first(*names: str) -> tuple[str, str]:
            for name in names:
                if env.get(name, "").strip():
                    return f"${name}", env[name]
            return "", ""

        found = {}
        for scheme in ("https", "http"):
            source, value = first(f"{scheme.upper()}_PROXY", f"{scheme}_proxy")
            found[scheme] = parse_proxy(value, source) if value else None
        _, no_proxy = first("NO_PROXY", "no_proxy")
        entries = tuple(e.strip().lower() for e in no_proxy.split(",") if e.strip())
        return cls(found["https"], found["http"], entries)

    def for_url(self, url: str) -> Proxy | None:
        """The proxy for a request to `url`, None to connect directly."""
        parts = urllib.parse.urlsplit(url)
        proxy = self.https if parts.scheme == "https" else self.http
        host = (parts.hostname or "").lower()
        if proxy is None or not host:
            return None
        port = str(parts.port or (443 if parts.scheme == "https" else 80))
        return None if bypasses(host, port, self.no_proxy) else proxy


def bypasses(host: str, port: str, no_proxy: tuple[str, ...]) -> bool:
    """Whether a request to `host`:`port` goes direct: a loopback host, or one that an
    entry of `no_proxy` names (lower-case entries as in $NO_PROXY, Go's rules)."""
    ip = _ip(host)
    if host == "localhost" or (ip is not None and ip.is_loopback):
        return True
    return any(_no_proxy_match(entry, host, port, ip) for entry in no_proxy)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _no_proxy_match(
    entry: str, host: str, port: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
) -> bool:
    if entry == "*":
        return True
    if "/" in entry:  # a CIDR: only IP hosts are in it (names are never resolved for this)
        try:
            return ip is not None and ip in ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return False
    name, want_port = _split_host_port(entry)
    if want_port and want_port != port:
        return False
    entry_ip = _ip(name)
    if entry_ip is not None:
        return ip is not None and ip == entry_ip
    if name.startswith("*."):
        name = name[1:]
    if not name or name == ".":
        return False
    if name.startswith("."):  # subdomains only
        return host.endswith(name)
    return host == name or host.endswith("." + name)


def _split_host_port(entry: str) -> tuple[str, str]:
    """("host", "port") of "host:port" or "[v6]:port"; ("host", "") without a port."""
    if entry.startswith("["):
        end = entry.find("]")
        rest = entry[end + 1 :] if end > 0 else ""
        return entry[1:end] if end > 0 else entry, rest[1:] if rest.startswith(":") else ""
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        return name, port
    return entry, ""  # a bare IPv6 address or a plain name


# -- retries ----------------------------------------------------------------------------------

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRIES_ENV = "SYSBAKE_REGISTRY_RETRIES"
CHUNK_ENV = "SYSBAKE_REGISTRY_CHUNK"
DEFAULT_UPLOAD_CHUNK = 32 << 20


@record
class Retry:
    """How a failing request is tried again: `attempts` tries in all, waiting `base`
    seconds and twice as long each time (half to all of it: jitter), or what Retry-After
    says when it is at most `longest` seconds."""

    attempts: int = 5
    base: float = 0.5
    longest: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Retry:
        """The defaults; $SYSBAKE_REGISTRY_RETRIES sets the tries after the first (0: none)."""
        env = os.environ if env is None else env
        retries = _number(env, RETRIES_ENV, 4, minimum=0)
        if retries != int(retries) or retries > 100:
            raise RegistryError(f"${RETRIES_ENV}={env[RETRIES_ENV]!r}: expected 0 to 100 tries")
        return cls(attempts=int(retries) + 1)

    def delay(self, attempt: int) -> float:
        """The wait after failed try number `attempt` (1 for the first)."""
        full = min(self.base * 2.0 ** (attempt - 1), self.longest)
        jitter = int.from_bytes(os.urandom(2), "big") / 0xFFFF
        return full * (0.5 + jitter / 2)

    def wait_for(self, resp: Response, attempt: int) -> float | None:
        """How long to wait before trying again after `resp`: its Retry-After (None when
        that is longer than `longest`), else the backoff."""
        value = (resp.headers.get("Retry-After") or "").strip()
        if not value:
            return self.delay(attempt)
        if value.isdigit():
            seconds = float(value)
        else:
            from email.utils import parsedate_to_datetime

            try:
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                return self.delay(attempt)
        seconds = max(seconds, 0.0)
        return None if seconds > self.longest else seconds


def upload_chunk_size(env: Mapping[str, str] | None = None) -> int:
    """The size of an upload's chunks: $SYSBAKE_REGISTRY_CHUNK bytes, else 32 MiB."""
    env = os.environ if env is None else env
    value = _number(env, CHUNK_ENV, DEFAULT_UPLOAD_CHUNK, minimum=4096)
    return int(value)


_DROPPED = (
    ConnectionResetError,  # http.client.RemoteDisconnected too
    ConnectionAbortedError,
    BrokenPipeError,
    http.client.IncompleteRead,
    ssl.SSLEOFError,
)


def dropped(exc: BaseException) -> bool:
    """Whether `exc` (or the error it wraps) is a connection that dropped: worth a retry,
    unlike a refused connection, a TLS failure or a registry below the minimum rate."""
    cause = exc.__cause__ if isinstance(exc, RegistryError) else exc
    return isinstance(cause, _DROPPED) and not isinstance(cause, SlowTransfer)


# -- responses --------------------------------------------------------------------------------

_DRAIN_MAX = 64 << 10  # bytes of an unread body read anyway to keep the connection


class Response:
    """A response whose body is still to be read; `close()` gives its connection back to
    the session when it can carry another request, else closes it."""

    def __init__(
        self,
        conn: http.client.HTTPConnection,
        raw: http.client.HTTPResponse,
        url: str,
        keep: Callable[[http.client.HTTPConnection], None] | None = None,
    ) -> None:
        self.conn, self.raw, self.url = conn, raw, url
        self.status = raw.status
        self.headers = raw.headers
        self.keep = keep
        # Set by Session.request for a GET: the same request from a byte offset on.
        self.resume: Callable[[int], Response] | None = None
        self.retry = Retry()
        self._closed = False

    def read(self, limit: int = 4 << 20) -> bytes:
        """The whole body (small documents only: manifests, errors, tokens)."""
        try:
            data = self.raw.read(limit + 1)
        except SlowTransfer as exc:
            raise RegistryError(f"{self.url}: {exc}: dropped") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise RegistryError(
                f"{self.url}: connection dropped while reading the response ({_reason(exc)})"
            ) from exc
        if len(data) > limit:
            raise RegistryError(f"{self.url}: the response is larger than {limit} bytes: refused")
        return data

    def chunks(self) -> Iterator[bytes]:
        """The body in chunks. A connection that drops before the declared length was
        read is asked again for the rest (see the module docstring); when that fails
        too, the chunks just end short, or the last error is raised."""
        expected = _length(self)
        got = failures = 0
        while True:
            error: BaseException | None = None
            try:
                while chunk := self.raw.read(CHUNK):
                    got += len(chunk)
                    yield chunk
            except SlowTransfer:
                raise
            except (OSError, http.client.HTTPException) as exc:
                error = exc
            if expected is None or got >= expected:
                if error is not None:
                    raise error
                return
            failures += 1
            if self.resume is None or failures >= self.retry.attempts:
                if error is not None:
                    raise error
                return
            before = got
            got = self._resume(got, failures, error)
            if got > before:
                failures = 0

    def _resume(self, offset: int, failures: int, error: BaseException | None) -> int:
        """Ask for the body again from `offset`: the offset the new response starts at."""
        assert self.resume is not None
        wait = self.retry.delay(failures)
        why = _reason(error) if error is not None else "it ended early"
        log.info(
            f"    {urllib.parse.urlsplit(self.url).path}: the connection dropped after "
            f"{offset} bytes ({why}); resuming in {wait:.1f}s"
        )
        time.sleep(wait)
        again = self.resume(offset)
        self._swap(again)
        if again.status == 206 and _range_start(again.headers.get("Content-Range")) == offset:
            return offset
        if again.status != 200:
            raise ConnectionResetError(f"asked to resume, the registry answered {again.status}")
        skip = offset  # a server that ignores Range: its first bytes are ones we have
        while skip > 0:
            data = self.raw.read(min(CHUNK, skip))
            if not data:
                break
            skip -= len(data)
        return offset - skip

    def _swap(self, other: Response) -> None:
        """Take `other`'s connection and body in place of this one's."""
        self.close()
        self.conn, self.raw, self.keep = other.conn, other.raw, other.keep
        self.status, self.headers = other.status, other.headers
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        raw = self.raw
        reusable = self.keep is not None and not raw.will_close
        if reusable and not raw.isclosed() and not raw.chunked and (raw.length or 0) <= _DRAIN_MAX:
            try:
                raw.read()  # a small unread body: read it, the connection is worth more
            except (OSError, http.client.HTTPException):
                reusable = False
        if reusable and raw.isclosed() and self.keep is not None:
            self.keep(self.conn)
            return
        raw.close()
        self.conn.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def error_text(self) -> str:
        """The registry's error codes and messages, e.g. 'MANIFEST_UNKNOWN: manifest unknown'."""
        body = self.read(64 << 10)
        try:
            errors = json.loads(body).get("errors") or []
            return (
                "; ".join(f"{e.get('code', '?')}: {e.get('message', '')}".strip() for e in errors)
                or f"HTTP {self.status}"
            )
        except (ValueError, AttributeError):
            return f"HTTP {self.status} {self.raw.reason}".strip()


def _length(resp: Response) -> int | None:
    """The body's declared length (for a 206, the whole entity's end), None if unknown."""
    text = resp.headers.get("Content-Length") or ""
    return int(text) if text.isdigit() else None


def _range_start(value: str | None) -> int | None:
    """The first byte of a Content-Range ("bytes 100-199/200")."""
    if not value:
        return None
    first = value.strip().removeprefix("bytes").strip().partition("-")[0]
    return int(first) if first.isdigit() else None


def _reason(exc: BaseException, window: float = DEFAULT_WINDOW) -> str:
    if isinstance(exc, http.client.IncompleteRead):
        return f"got {len(exc.partial)} more bytes, {exc.expected} missing"
    if isinstance(exc, SlowTransfer):
        return str(exc)
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no progress for {window:g} s"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "closed by the other end without an answer"
    return str(getattr(exc, "strerror", None) or exc) or type(exc).__name__


# -- the session ------------------------------------------------------------------------------


class Sent(Protocol):
    """What counts an upload's bytes: set to the offset reached (sysbake.progress.Blob)."""

    done: int


class _Restart(RegistryError):
    """An upload that cannot go on where it is: start the blob over (if tries are left)."""


@record(frozen=False)
class Session:
    """Requests to one registry with its scheme, TLS context, auth state and kept-alive
    connections (mutable: the scheme is probed and tokens are fetched on first use)."""

    registry: str
    tls: TlsOptions = field(default_factory=TlsOptions)
    creds: Credentials | None = None
    limits: Limits = field(default_factory=Limits.from_env)
    proxies: Proxies = field(default_factory=Proxies.from_env)
    retry: Retry = field(default_factory=Retry.from_env)
    chunk: int = field(default_factory=upload_chunk_size)
    scheme: str | None = None
    _challenge: Challenge | None = None
    _tokens: dict[tuple[str, ...], str] = field(default_factory=dict)
    _context: ssl.SSLContext | None = None
    _idle: dict[tuple[str, str, str], http.client.HTTPConnection] = field(default_factory=dict)
    _chunked: bool = True  # False once the registry refused a chunked upload

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            self._context = tls_context(self.registry, self.tls)
        return self._context

    def close(self) -> None:
        """Close the kept-alive connections."""
        for conn in self._idle.values():
            conn.close()
        self._idle.clear()

    def __del__(self) -> None:
        # A session is dropped, not closed, by its users: its sockets are closed here
        # rather than left to the collector (which warns of each).
        self.close()

    # -- connections -----------------------------------------------------------------------

    def _connection(
        self, parts: urllib.parse.SplitResult, proxy: Proxy | None
    ) -> tuple[http.client.HTTPConnection, bool]:
        """A connection for a request to `parts`: a kept-alive one (True) or a new one."""
        key = (parts.scheme, parts.netloc, proxy.netloc if proxy else "")
        conn = self._idle.pop(key, None)
        # A connection the server closed meanwhile reads as ready (EOF): drop it.
        if (
            conn is not None
            and conn.sock is not None
            and not select.select([conn.sock], [], [], 0)[0]
        ):
            conn.sock.settimeout(self.limits.window)  # responses change it
            return conn, True
        if conn is not None:
            conn.close()
        # The socket timeout bounds connecting and each block sent; responses are metered.
        window = self.limits.window
        if parts.scheme == "https":
            context = self.context()
            if proxy is None:
                conn = http.client.HTTPSConnection(
                    parts.netloc, timeout=window, context=context, blocksize=SEND_BLOCK
                )
            else:
                conn = http.client.HTTPSConnection(
                    proxy.host, proxy.port, timeout=window, context=context, blocksize=SEND_BLOCK
                )
                port = parts.port or 443
                conn.set_tunnel(parts.hostname or "", port, headers=proxy.headers())
        else:
            where = proxy.netloc if proxy is not None else parts.netloc
            conn = http.client.HTTPConnection(where, timeout=window, blocksize=SEND_BLOCK)
        conn.response_class = _response_class(self.limits)
        return conn, False

    def _keeper(
        self, parts: urllib.parse.SplitResult, proxy: Proxy | None
    ) -> Callable[[http.client.HTTPConnection], None]:
        key = (parts.scheme, parts.netloc, proxy.netloc if proxy else "")

        def keep(conn: http.client.HTTPConnection) -> None:
            old = self._idle.pop(key, None)
            if old is not None and old is not conn:
                old.close()
            self._idle[key] = conn

        return keep

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | Body | None,
        *,
        replay: bool = True,
    ) -> Response:
        """One request on one connection; errors become one-line RegistryErrors whose
        cause says why. A kept-alive connection that turns out to be closed is replaced
        once, for an idempotent request that may be `replay`ed (an upload's may not: the
        registry may have taken part of it)."""
        parts = urllib.parse.urlsplit(url)
        proxy = self.proxies.for_url(url)
        start = body.tell() if body is not None and not isinstance(body, bytes) else 0
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        send = dict(headers)
        if proxy is not None and parts.scheme == "http":
            target = url  # absolute-URI form: the proxy forwards it
            send.update(proxy.headers())
        log.debug(f"{method} {url}" + (f" (through the proxy {proxy.netloc})" if proxy else ""))
        for fresh in (False, True):
            conn, reused = self._connection(parts, proxy)
            try:
                conn.request(method, target, body=body, headers=send)
                raw = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                failure = self._failure(method, url, conn, proxy, exc)
                conn.close()
                may_replay = replay and method in IDEMPOTENT
                if reused and not fresh and may_replay and isinstance(exc, _DROPPED):
                    # The server closed a kept-alive connection first: it never got this.
                    if body is not None and not isinstance(body, bytes):
                        body.seek(start)
                    continue
                raise failure from exc
            if proxy is not None and raw.status == 407:
                conn.close()
                raise RegistryError(
                    f"the proxy {proxy.netloc} ({proxy.source}) requires authentication: "
                    "give it as http://USER:PASSWORD@HOST:PORT"
                )
            return Response(conn, raw, url, self._keeper(parts, proxy))
        raise AssertionError("unreachable")

    def _failure(
        self,
        method: str,
        url: str,
        conn: http.client.HTTPConnection,
        proxy: Proxy | None,
        exc: BaseException,
    ) -> RegistryError:
        """The one-line error of a request that got no answer."""
        parts = urllib.parse.urlsplit(url)
        window = self.limits.window
        via = f" through the proxy {proxy.netloc} ({proxy.source})" if proxy else ""
        if isinstance(exc, ssl.SSLCertVerificationError):
            return RegistryError(
                f"TLS verification of {parts.netloc} failed ({exc.verify_message}): pass "
                "--cert-dir with its CA certificate, or --tls-verify=false"
            )
        if proxy is not None and "Tunnel connection failed" in str(exc):
            answer = str(exc).split(":", 1)[1].strip()
            if answer.startswith("407"):
                return RegistryError(
                    f"the proxy {proxy.netloc} ({proxy.source}) requires authentication: "
                    "give it as http://USER:PASSWORD@HOST:PORT"
                )
            return RegistryError(
                f"the proxy {proxy.netloc} ({proxy.source}) refused to connect to "
                f"{parts.netloc}: {answer}"
            )
        if isinstance(exc, ConnectionRefusedError):
            if proxy is not None:
                return RegistryError(
                    f"cannot connect to the proxy {proxy.netloc} ({proxy.source}): "
                    "connection refused"
                )
            return RegistryError(f"cannot connect to {parts.netloc}: connection refused")
        if isinstance(exc, socket.gaierror):
            name = proxy.host if proxy is not None else parts.hostname
            return RegistryError(f"cannot resolve {name}{via}: {exc.strerror}")
        if isinstance(exc, SlowTransfer):
            return RegistryError(f"{method} {url}: {exc}: dropped")
        if isinstance(exc, TimeoutError):
            # Responses are metered (SlowTransfer): a timeout is in connecting or sending.
            doing = "accepted no data" if conn.sock is not None else "did not accept the connection"
            return RegistryError(
                f"{method} {url}{via}: the registry {doing} for {window:g} s: dropped"
            )
        return RegistryError(
            f"{method} {url}{via}: connection failed or dropped ({_reason(exc, window)})"
        )

    def _retrying(
        self,
        method: str,
        url: str,
        attempt: Callable[[], Response],
        rewind: Callable[[], None],
        *,
        transient: Callable[[RegistryError], bool] = dropped,
    ) -> Response:
        """`attempt()`, tried again on a 429/5xx answer or a dropped connection when
        `method` is idempotent (see `Retry`); `rewind` readies the body for a new try."""
        tries = self.retry.attempts if method in IDEMPOTENT else 1
        for number in range(1, tries + 1):
            try:
                resp = attempt()
            except RegistryError as exc:
                if number == tries or not transient(exc):
                    raise
                why, wait = _reason(exc.__cause__ or exc), self.retry.delay(number)
            else:
                if number == tries or resp.status not in RETRY_STATUSES:
                    return resp
                found = self.retry.wait_for(resp, number)
                if found is None:
                    return resp  # the registry asks for a longer wait than we give
                why, wait = f"HTTP {resp.status}", found
                resp.close()
            path = urllib.parse.urlsplit(url).path
            log.info(
                f"    {self.registry}: {method} {path}: {why}; trying again in {wait:.1f}s "
                f"({number + 1} of {tries})"
            )
            time.sleep(wait)
            rewind()
        raise AssertionError("unreachable")

    def _probe(self) -> None:
        """Find the scheme (https, or http where allowed) and the auth challenge: GET /v2/."""
        schemes = ["https"]
        if not self.tls.verify or is_loopback(self.registry):
            schemes.append("http")
        for scheme in schemes:
            url = f"{scheme}://{self.registry}/v2/"
            may_fall_back = scheme == "https" and len(schemes) > 1
            try:
                resp = self._retrying(
                    "GET",
                    url,
                    functools.partial(self._send, "GET", url, {}, None),
                    lambda: None,
                    transient=functools.partial(_worth_retrying, may_fall_back=may_fall_back),
                )
            except RegistryError as exc:
                cause = exc.__cause__
                if may_fall_back and _plain_http(cause):
                    continue  # not a TLS server: try plain http
                if _plain_http(cause) and cause is not None:
                    raise RegistryError(
                        f"TLS handshake with {self.registry} failed "
                        f"({_reason(cause, self.limits.window)}): for "
                        "a plain-http registry pass --tls-verify=false"
                    ) from exc
                raise
            with resp:
                resp.read(64 << 10)
                if resp.status == 401:
                    self._challenge = pick_challenge(
                        parse_challenges(", ".join(resp.headers.get_all("WWW-Authenticate") or []))
                    )
                elif resp.status != 200:
                    raise RegistryError(
                        f"{self.registry} is not an OCI registry: GET /v2/ "
                        f"answered HTTP {resp.status}"
                    )
            self.scheme = scheme
            return

    # -- auth ------------------------------------------------------------------------------

    def _auth_header(self, scopes: tuple[str, ...]) -> dict[str, str]:
        challenge = self._challenge
        if challenge is None:
            return {}
        if challenge.scheme == "basic":
            if self.creds is None:
                raise RegistryError(
                    f"{self.registry} requires authentication: pass --creds "
                    f"USER[:PASSWORD] or run `sysbake login {self.registry}`"
                )
            return {"Authorization": self.creds.basic()}
        if challenge.scheme == "bearer":
            if scopes not in self._tokens:
                self._tokens[scopes] = self._fetch_token(challenge, scopes)
            return {"Authorization": f"Bearer {self._tokens[scopes]}"}
        raise RegistryError(
            f"{self.registry} asks for unsupported authentication {challenge.scheme!r}"
        )

    def _fetch_token(self, challenge: Challenge, scopes: tuple[str, ...]) -> str:
        realm = challenge.get("realm")
        if not realm or urllib.parse.urlsplit(realm).scheme not in ("http", "https"):
            raise RegistryError(f"{self.registry}: Bearer challenge without a usable realm")
        withheld = self.creds is not None and not self._may_see_creds(realm)
        if self.creds is not None and self.creds.identity_token and not withheld:
            return self._exchange_identity_token(realm, challenge, scopes, self.creds)
        query = [("service", challenge.get("service") or "")] if challenge.get("service") else []
        query += [("scope", s) for s in scopes]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers = (
            {"Authorization": self.creds.basic()} if self.creds is not None and not withheld else {}
        )
        with self._retrying(
            "GET", url, lambda: self._send("GET", url, headers, None), lambda: None
        ) as resp:
            if resp.status in (401, 403) and withheld:
                raise RegistryError(
                    f"{self.registry}: the token service {realm} refused an anonymous "
                    f"request; the credentials for {self.registry} were withheld because "
                    "that realm is on another host over plain http (it must be on the "
                    "registry's host or use https)"
                )
            if resp.status in (401, 403):
                raise self._denied(resp.status, "the token service")
            if resp.status != 200:
                raise RegistryError(f"token service {realm} answered HTTP {resp.status}")
            return _token_of(resp, realm)

    def _exchange_identity_token(
        self, realm: str, challenge: Challenge, scopes: tuple[str, ...], creds: Credentials
    ) -> str:
        """An access token for an identity token (a credential helper's "<token>" user):
        OAuth2's refresh_token grant, POSTed to the realm as docker does."""
        form = {
            "grant_type": "refresh_token",
            "refresh_token": creds.password,
            "client_id": "sysbake",
            "service": challenge.get("service") or "",
            "scope": " ".join(scopes),
        }
        body = urllib.parse.urlencode(form).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        with self._send("POST", realm, headers, body) as resp:
            if resp.status in (401, 403):
                raise self._denied(resp.status, "the token service (identity token)")
            if resp.status != 200:
                raise RegistryError(f"token service {realm} answered HTTP {resp.status}")
            return _token_of(resp, realm)

    def _may_see_creds(self, realm: str) -> bool:
        """Whether Basic credentials may go to token `realm`: over https, or on the
        registry's own host (any port); a plain-http realm elsewhere could be anyone's."""
        parts = urllib.parse.urlsplit(realm)
        own = urllib.parse.urlsplit(f"//{self.registry}").hostname
        return parts.scheme == "https" or (parts.hostname or "").lower() == (own or "")

    def _denied(self, status: int, what: str) -> RegistryError:
        if self.creds is None:
            return RegistryError(
                f"{self.registry} requires authentication for {what}: pass "
                f"--creds USER[:PASSWORD] or run `sysbake login "
                f"{self.registry}`"
            )
        verb = "rejected the credentials of" if status == 401 else "denied access to"
        return RegistryError(f"{self.registry} {verb} user {self.creds.username!r} for {what}")

    # -- requests --------------------------------------------------------------------------

    def url(self, path: str) -> str:
        if self.scheme is None:
            self._probe()
        return f"{self.scheme}://{self.registry}{path}"

    def request(
        self,
        method: str,
        path: str,
        *,
        scopes: tuple[str, ...],
        headers: dict[str, str] | None = None,
        body: bytes | Body | None = None,
    ) -> Response:
        """Send a request (path or absolute URL), authenticating and following redirects;
        a 401 refreshes the token once (a file body must be seekable to be sent again);
        tried again as `Retry` says. The caller reads and closes the response (a GET's
        `chunks()` resume a body cut short)."""
        url = path if "://" in path else self.url(path)
        start = body.tell() if body is not None and not isinstance(body, bytes) else 0

        def rewind() -> None:
            if body is not None and not isinstance(body, bytes):
                body.seek(start)

        resp = self._retrying(
            method,
            url,
            lambda: self._request_once(method, url, scopes, headers or {}, body),
            rewind,
        )
        if method == "GET" and resp.status == 200:
            resp.retry = self.retry

            def resume(offset: int) -> Response:
                ranged = {**(headers or {}), "Range": f"bytes={offset}-"}
                return self.request("GET", url, scopes=scopes, headers=ranged)

            resp.resume = resume
        return resp

    def _request_once(
        self,
        method: str,
        url: str,
        scopes: tuple[str, ...],
        headers: dict[str, str],
        body: bytes | Body | None,
        *,
        replay: bool = True,
    ) -> Response:
        """`request` without retries (`replay`: see `_send`)."""
        start = body.tell() if body is not None and not isinstance(body, bytes) else 0
        for attempt in range(2):
            send = dict(headers)
            same_host = urllib.parse.urlsplit(url).netloc == self.registry
            if same_host:
                send.update(self._auth_header(scopes))
            resp = self._send(method, url, send, body, replay=replay)
            for _ in range(5):
                if resp.status not in (301, 302, 303, 307, 308) or method not in ("GET", "HEAD"):
                    break
                location = resp.headers.get("Location") or ""
                resp.close()
                # Blob storage behind a redirect gets no registry credentials.
                target = urllib.parse.urljoin(resp.url, location)
                extra = {k: v for k, v in send.items() if k != "Authorization"}
                if urllib.parse.urlsplit(target).netloc == self.registry:
                    extra = send
                resp = self._send(method, target, extra, None)
            if resp.status != 401 or attempt == 1 or not same_host:
                return resp
            challenge = pick_challenge(
                parse_challenges(", ".join(resp.headers.get_all("WWW-Authenticate") or []))
            )
            resp.close()
            known = self._challenge
            if challenge is None or (
                known is not None and challenge.scheme == "basic" and known.scheme == "basic"
            ):
                raise self._denied(401, f"{method} {urllib.parse.urlsplit(url).path}")
            self._challenge = challenge
            self._tokens.clear()
            if body is not None and not isinstance(body, bytes):
                body.seek(start)
        raise AssertionError("unreachable")

    def fail(self, resp: Response, what: str) -> RegistryError:
        """The error for an unexpected answer to `what` (closes the response)."""
        with resp:
            if resp.status in (401, 403):
                return self._denied(resp.status, what)
            return RegistryError(f"{self.registry}: {what} failed: {resp.error_text()}")

    def check_login(self) -> None:
        """Prove the credentials work (GET /v2/ with them): raises RegistryError if not."""
        with self.request("GET", "/v2/", scopes=()) as resp:
            if resp.status in (401, 403):
                raise self._denied(resp.status, "GET /v2/")
            if resp.status != 200:
                raise RegistryError(f"{self.registry}: GET /v2/ answered HTTP {resp.status}")

    # -- blob uploads ----------------------------------------------------------------------

    def upload_blob(
        self,
        repo: str,
        digest: str,
        size: int,
        f: BinaryIO,
        *,
        scopes: tuple[str, ...],
        location: str | None = None,
        sent: Sent | None = None,
    ) -> None:
        """Upload the `size` bytes of file `f` as blob `digest` of `repo`, at `location`
        (an upload the caller opened) or at a new one (see the module docstring)."""
        tries = self.retry.attempts
        for number in range(1, tries + 1):
            try:
                if location is None:
                    location = self._start_upload(repo, digest, scopes)
                if size > self.chunk and self._chunked:
                    if self._upload_chunks(location, digest, size, f, scopes, sent):
                        return
                    location = self._start_upload(repo, digest, scopes)
                self._upload_whole(location, digest, size, f, scopes, sent)
                return
            except _Restart as exc:
                if number == tries:
                    raise RegistryError(
                        f"{exc} ({tries} tries)" if tries > 1 else str(exc)
                    ) from exc
                if self._has_blob(repo, digest, scopes):
                    return  # the upload did land, only its answer was lost
                wait = self.retry.delay(number)
                log.info(
                    f"    {self.registry}: {exc}; uploading blob {digest[:19]} again "
                    f"in {wait:.1f}s ({number + 1} of {tries})"
                )
                time.sleep(wait)
                location = None
        raise AssertionError("unreachable")

    def _upload_request(
        self,
        method: str,
        url: str,
        scopes: tuple[str, ...],
        headers: dict[str, str],
        body: bytes | Body | None,
        what: str,
    ) -> Response:
        """One request of an upload; dropped connections, 429 and 5xx are `_Restart`s
        (the caller decides whether to resume or start over), other failures errors."""
        try:
            resp = self._request_once(method, url, scopes, headers, body, replay=False)
        except RegistryError as exc:
            if dropped(exc):
                why = _reason(exc.__cause__ or exc, self.limits.window)
                raise _Restart(f"{what}: connection failed or dropped ({why})") from exc
            raise
        if resp.status in RETRY_STATUSES:
            with resp:
                raise _Restart(f"{what}: {resp.error_text()}")
        return resp

    def _start_upload(self, repo: str, digest: str, scopes: tuple[str, ...]) -> str:
        """Open an upload session: its location."""
        path = f"/v2/{repo}/blobs/uploads/"
        resp = self._upload_request(
            "POST", self.url(path), scopes, {}, b"", f"starting the upload of blob {digest}"
        )
        if resp.status != 202 or not resp.headers.get("Location"):
            raise self.fail(resp, f"starting the upload of blob {digest}")
        with resp:
            resp.read(64 << 10)
            floor = (resp.headers.get("OCI-Chunk-Min-Length") or "").strip()
            if floor.isdigit():
                self.chunk = max(self.chunk, int(floor))
            return urllib.parse.urljoin(resp.url, str(resp.headers["Location"]))

    def _upload_whole(
        self,
        location: str,
        digest: str,
        size: int,
        f: BinaryIO,
        scopes: tuple[str, ...],
        sent: Sent | None,
    ) -> None:
        """The blob in one streamed PUT."""
        body = _Section(f, 0, size, self.limits, sent)
        self._close_upload(location, digest, scopes, body, size, f"uploading blob {digest}")

    def _close_upload(
        self,
        location: str,
        digest: str,
        scopes: tuple[str, ...],
        body: bytes | Body,
        length: int,
        what: str,
    ) -> None:
        """The PUT that closes the upload at `location` as blob `digest`, sending `body`
        (`length` bytes: the whole blob, or none after the chunks); `what` names it."""
        resp = self._upload_request(
            "PUT",
            _with_digest(location, digest),
            scopes,
            {"Content-Type": "application/octet-stream", "Content-Length": str(length)},
            body,
            what,
        )
        if resp.status not in (201, 204):
            raise self.fail(resp, what)
        resp.close()

    def _upload_chunks(
        self,
        location: str,
        digest: str,
        size: int,
        f: BinaryIO,
        scopes: tuple[str, ...],
        sent: Sent | None,
    ) -> bool:
        """The blob in PATCHes of `self.chunk` bytes, then the closing PUT; False when the
        registry refuses the first chunk (the caller uploads it whole)."""
        offset = stalls = 0
        while offset < size:
            end = min(offset + self.chunk, size)
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{end - 1}",
                "Content-Length": str(end - offset),
            }
            body = _Section(f, offset, end - offset, self.limits, sent)
            try:
                resp = self._upload_request(
                    "PATCH", location, scopes, headers, body, f"uploading blob {digest}"
                )
            except _Restart as exc:
                stalls += 1
                if stalls >= self.retry.attempts:
                    raise
                time.sleep(self.retry.delay(stalls))
                location, resumed = self._upload_status(location, scopes, str(exc))
                if resumed > offset:
                    stalls = 0
                offset = resumed
                continue
            if resp.status == 202:
                with resp:
                    resp.read(64 << 10)
                    location = urllib.parse.urljoin(
                        resp.url, resp.headers.get("Location") or location
                    )
                    offset = _range_end(resp.headers.get("Range"), end)
                continue
            if offset == 0 and resp.status in (400, 404, 405, 413, 416, 501):
                resp.close()
                self._chunked = False
                log.debug(f"{self.registry}: chunked upload refused ({resp.status})")
                return False
            raise self.fail(resp, f"uploading blob {digest}")
        if sent is not None:
            sent.done = size
        self._close_upload(location, digest, scopes, b"", 0, f"closing the upload of blob {digest}")
        return True

    def _upload_status(self, location: str, scopes: tuple[str, ...], why: str) -> tuple[str, int]:
        """Where the upload at `location` stands (its location, the bytes it holds), asked
        after `why` stopped it; `_Restart` when the registry no longer has it."""
        try:
            resp = self._request_once("GET", location, scopes, {}, None)
        except RegistryError as exc:
            raise _Restart(f"{why}; asking where the upload stands: {exc}") from exc
        with resp:
            resp.read(64 << 10)
            if resp.status not in (202, 204):
                raise _Restart(f"{why}; the registry lost the upload (HTTP {resp.status})")
            offset = _range_end(resp.headers.get("Range"), 0)
            found = urllib.parse.urljoin(resp.url, resp.headers.get("Location") or location)
        log.info(f"    {self.registry}: {why}; resuming the upload at byte {offset}")
        return found, offset

    def _has_blob(self, repo: str, digest: str, scopes: tuple[str, ...]) -> bool:
        try:
            with self.request("HEAD", f"/v2/{repo}/blobs/{digest}", scopes=scopes) as resp:
                return resp.status == 200
        except RegistryError:
            return False


def _plain_http(exc: BaseException | None) -> bool:
    """Whether a TLS handshake failed as it does with a plain-http server."""
    return isinstance(exc, ssl.SSLError | ConnectionResetError) and not isinstance(
        exc, ssl.SSLCertVerificationError
    )


def _worth_retrying(exc: RegistryError, *, may_fall_back: bool) -> bool:
    # A reset TLS handshake may be a plain-http server (when http is allowed): no retry.
    return dropped(exc) and not (may_fall_back and _plain_http(exc.__cause__))


def _with_digest(location: str, digest: str) -> str:
    return location + ("&" if "?" in location else "?") + urllib.parse.urlencode({"digest": digest})


def _range_end(value: str | None, default: int) -> int:
    """The offset after the bytes an upload's Range header ("0-1023") says it holds; 0 for
    "0-0", which docker's registry also says of an empty upload."""
    if not value:
        return default
    last = value.strip().removeprefix("bytes=").partition("-")[2]
    if not last.isdigit():
        return default
    return int(last) + 1 if int(last) > 0 else 0


def _token_of(resp: Response, realm: str) -> str:
    try:
        doc = json.loads(resp.read())
        return str(doc.get("token") or doc["access_token"])
    except (ValueError, KeyError, AttributeError) as exc:
        raise RegistryError(f"token service {realm} sent no token") from exc


class _Section:
    """`length` bytes of file `f` from `start` as a request body, read in blocks (never
    whole), counted on `sent`; a registry that takes them slower than the minimum rate
    is a SlowTransfer."""

    def __init__(
        self, f: BinaryIO, start: int, length: int, limits: Limits, sent: Sent | None
    ) -> None:
        self.f, self.end, self.sent = f, start + length, sent
        self.window = RateWindow(limits, "accepted")
        self.seek(start)

    def read(self, n: int = -1) -> bytes:
        # Called by http.client for each block once the previous one was sent.
        self.window.check()
        left = self.end - self.f.tell()
        data = self.f.read(left if n < 0 else min(n, left)) if left > 0 else b""
        if self.sent is not None:
            self.sent.done = self.f.tell()
        self.window.add(len(data))
        return data

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, pos: int) -> int:
        if self.sent is not None:
            self.sent.done = pos
        return self.f.seek(pos)

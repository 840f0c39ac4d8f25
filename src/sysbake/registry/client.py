"""A client of the OCI distribution API v2 over http.client: TLS, auth, requests (image
references are sysbake.oci.reference's).

Plain http is used only with --tls-verify=false or for a loopback registry (127.0.0.0/8,
::1, localhost) that does not speak TLS, as docker does for loopback; a loopback registry
that does offer TLS is still verified. Bearer tokens (realm/service/scope) and Basic auth
answer the registry's `WWW-Authenticate` challenge; Basic credentials go to a token realm
only on the registry's own host or over https.

Every transfer must keep moving (`Limits`): a response that brings fewer than
`min_rate` bytes/s over a window (default 1 KiB/s over 30 s), or a request body the registry
does not take at that rate, is dropped with an error saying so.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import json
import os
import socket
import ssl
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

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


class Response:
    """A response whose body is still to be read; `close()` drops the connection."""

    def __init__(
        self, conn: http.client.HTTPConnection, raw: http.client.HTTPResponse, url: str
    ) -> None:
        self.conn, self.raw, self.url = conn, raw, url
        self.status = raw.status
        self.headers = raw.headers

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
        while chunk := self.raw.read(CHUNK):
            yield chunk

    def close(self) -> None:
        self.raw.close()
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


def _reason(exc: BaseException, window: float = DEFAULT_WINDOW) -> str:
    if isinstance(exc, http.client.IncompleteRead):
        return f"got {len(exc.partial)} more bytes, {exc.expected} missing"
    if isinstance(exc, SlowTransfer):
        return str(exc)
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no progress for {window:g} s"
    return str(getattr(exc, "strerror", None) or exc) or type(exc).__name__


@record(frozen=False)
class Session:
    """Requests to one registry with its scheme, TLS context and auth state (mutable:
    the scheme is probed and tokens are fetched on first use)."""

    registry: str
    tls: TlsOptions = field(default_factory=TlsOptions)
    creds: Credentials | None = None
    limits: Limits = field(default_factory=Limits.from_env)
    scheme: str | None = None
    _challenge: Challenge | None = None
    _tokens: dict[tuple[str, ...], str] = field(default_factory=dict)
    _context: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            self._context = tls_context(self.registry, self.tls)
        return self._context

    # -- connections -----------------------------------------------------------------------

    def _send(
        self, method: str, url: str, headers: dict[str, str], body: bytes | Body | None
    ) -> Response:
        parts = urllib.parse.urlsplit(url)
        conn: http.client.HTTPConnection
        # The socket timeout bounds connecting and each block sent; responses are metered.
        window = self.limits.window
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                parts.netloc, timeout=window, context=self.context(), blocksize=SEND_BLOCK
            )
        else:
            conn = http.client.HTTPConnection(parts.netloc, timeout=window, blocksize=SEND_BLOCK)
        conn.response_class = _response_class(self.limits)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        log.debug(f"{method} {url}")
        try:
            conn.request(method, target, body=body, headers=headers)
            raw = conn.getresponse()
        except ssl.SSLCertVerificationError as exc:
            conn.close()
            raise RegistryError(
                f"TLS verification of {parts.netloc} failed ({exc.verify_message}): pass "
                "--cert-dir with its CA certificate, or --tls-verify=false"
            ) from exc
        except ConnectionRefusedError as exc:
            conn.close()
            raise RegistryError(f"cannot connect to {parts.netloc}: connection refused") from exc
        except socket.gaierror as exc:
            conn.close()
            raise RegistryError(f"cannot resolve {parts.hostname}: {exc.strerror}") from exc
        except SlowTransfer as exc:
            conn.close()
            raise RegistryError(f"{method} {url}: {exc}: dropped") from exc
        except TimeoutError as exc:
            # Responses are metered (SlowTransfer): a timeout is in connecting or sending.
            doing = "accepted no data" if conn.sock is not None else "did not accept the connection"
            conn.close()
            raise RegistryError(
                f"{method} {url}: the registry {doing} for {window:g} s: dropped"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise RegistryError(
                f"{method} {url}: connection failed or dropped ({_reason(exc, window)})"
            ) from exc
        return Response(conn, raw, url)

    def _probe(self) -> None:
        """Find the scheme (https, or http where allowed) and the auth challenge: GET /v2/."""
        schemes = ["https"]
        if not self.tls.verify or is_loopback(self.registry):
            schemes.append("http")
        for scheme in schemes:
            url = f"{scheme}://{self.registry}/v2/"
            try:
                resp = self._send("GET", url, {}, None)
            except RegistryError as exc:
                cause = exc.__cause__
                plain_http = isinstance(
                    cause, ssl.SSLError | ConnectionResetError
                ) and not isinstance(cause, ssl.SSLCertVerificationError)
                if scheme == "https" and plain_http and len(schemes) > 1:
                    continue  # not a TLS server: try plain http
                if plain_http and cause is not None:
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
        query = [("service", challenge.get("service") or "")] if challenge.get("service") else []
        query += [("scope", s) for s in scopes]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        withheld = self.creds is not None and not self._may_see_creds(realm)
        headers = (
            {"Authorization": self.creds.basic()} if self.creds is not None and not withheld else {}
        )
        with self._send("GET", url, headers, None) as resp:
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
            try:
                doc = json.loads(resp.read())
                return str(doc.get("token") or doc["access_token"])
            except (ValueError, KeyError, AttributeError) as exc:
                raise RegistryError(f"token service {realm} sent no token") from exc

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
        a 401 refreshes the token once (a file body must be seekable to be sent again).
        The caller reads and closes the response."""
        url = path if "://" in path else self.url(path)
        start = body.tell() if body is not None and not isinstance(body, bytes) else 0
        for attempt in range(2):
            send = dict(headers or {})
            same_host = urllib.parse.urlsplit(url).netloc == self.registry
            if same_host:
                send.update(self._auth_header(scopes))
            resp = self._send(method, url, send, body)
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

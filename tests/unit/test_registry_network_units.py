"""The registry client on real networks, root-free on loopback: proxies from the environment
($HTTPS_PROXY, $HTTP_PROXY, $NO_PROXY), credential helpers, kept-alive connections, retries
on 429/5xx and dropped connections, downloads resumed with Range, chunked uploads resumed
where they stopped or started over.

The helpers here are shared with tests/integration/test_registry_network.py:
`CountingProxy` (an HTTP proxy that tunnels CONNECT and forwards absolute-URI requests,
resolving names from its own table, counting what went through), `FlakyFront` (a front
that fails chosen requests: drops them, answers 429/503, cuts bodies, loses answers),
`FakeRegistry` (an in-process registry with chunked uploads), `helper_script`."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import select
import socket
import stat
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sysbake import log
from sysbake.oci import model as oci
from sysbake.oci.store import Store
from sysbake.registry import auth
from sysbake.registry.auth import Credentials, RegistryError, lookup_credentials
from sysbake.registry.client import (
    Proxies,
    Proxy,
    Retry,
    Session,
    bypasses,
    parse_proxy,
    upload_chunk_size,
)
from sysbake.registry.transfer import ConnectOptions, Reference, TlsOptions, pull, push
from tests.unit.conftest import files_tar, noise, put_image, put_layer

# -- an HTTP proxy that counts ------------------------------------------------------------------


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """A request or response head (up to the blank line) and the bytes read past it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return b"", data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until either side closes."""
    try:
        while True:
            ready, _, _ = select.select([a, b], [], [], 30)
            if not ready:
                return
            for src in ready:
                data = src.recv(65536)
                if not data:
                    return
                (b if src is a else a).sendall(data)
    except OSError:
        return


class _Server:
    """A TCP server on 127.0.0.1 handling each connection in a thread of its own."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> Any:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.listener.close()
        for sock in list(self._open):
            with contextlib.suppress(OSError):
                sock.close()
        self._thread.join(10)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._open.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            with client:
                self.handle(client)
        except OSError:
            pass

    def handle(self, client: socket.socket) -> None:
        raise NotImplementedError


class CountingProxy(_Server):
    """An HTTP proxy: CONNECT tunnels and absolute-URI requests, to the hosts of `hosts`
    (name -> IP: only it resolves them) or to IP literals. `seen` lists ("CONNECT",
    "host:port") and (METHOD, URL) for each connection's first request; with `auth`, a
    request without that Proxy-Authorization gets 407."""

    def __init__(self, hosts: dict[str, str] | None = None, auth: str | None = None) -> None:
        super().__init__()
        self.hosts = hosts or {}
        self.auth = auth
        self.seen: list[tuple[str, str]] = []
        self.url = f"http://{self.address}"

    def handle(self, client: socket.socket) -> None:
        head, rest = _read_head(client)
        if not head:
            return
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])
        }
        self.seen.append((method, target))
        if self.auth is not None and headers.get("proxy-authorization") != self.auth:
            client.sendall(
                b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
            )
            return
        netloc = target if method == "CONNECT" else urllib.parse.urlsplit(target).netloc
        host, _, port = netloc.rpartition(":")
        address = self.hosts.get(host, host)
        try:
            upstream = socket.create_connection((address.strip("[]"), int(port)), timeout=10)
        except (OSError, ValueError):
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        with upstream:
            if method == "CONNECT":
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                kept = [ln for ln in lines[1:] if not ln.lower().startswith("proxy-authorization")]
                upstream.sendall("\r\n".join([lines[0], *kept]).encode("latin-1") + rest)
            _pipe(client, upstream)

    def connects(self) -> list[str]:
        return [target for method, target in self.seen if method == "CONNECT"]

    def forwarded(self) -> list[str]:
        return [target for method, target in self.seen if method != "CONNECT"]


# -- a front that fails chosen requests ---------------------------------------------------------


@dataclass
class Rule:
    """Do `action` to the next `times` requests of `method` whose path matches `path`:
    "drop" (hang up before forwarding), "status" (answer `status` with `retry_after`),
    "cut" (forward half the body, then hang up on both), "lose" (forward, then hang up
    before the answer), "cut-answer" (relay half the answer's body, then hang up)."""

    method: str
    path: str
    action: str
    times: int = 1
    status: int = 503
    retry_after: str | None = None


@dataclass
class Seen:
    method: str
    path: str
    action: str
    body: int  # bytes of the request body forwarded
    headers: dict[str, str] = field(default_factory=dict)


class FlakyFront(_Server):
    """A front to the registry at `backend` ("host:port") that clients take for it."""

    def __init__(self, backend: str, rules: list[Rule] | None = None) -> None:
        super().__init__()
        host, _, port = backend.rpartition(":")
        self.backend = (host, int(port))
        self.rules = rules or []
        self.seen: list[Seen] = []
        self.connections = 0
        self._lock = threading.Lock()

    def _rule(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.times > 0 and rule.method == method and re.search(rule.path, path):
                    rule.times -= 1
                    return rule
        return None

    def handle(self, client: socket.socket) -> None:
        self.connections += 1
        buffered = b""
        while True:
            head, buffered = _read_head_from(client, buffered)
            if not head:
                return
            if not re.match(rb"[A-Z]+ ", head):  # a TLS hello, say: as Go's servers answer it
                client.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\nnot HTTP\n")
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (h.partition(":") for h in lines[1:] if h)
            }
            length = int(headers.get("content-length") or 0)
            while len(buffered) < length:
                chunk = client.recv(65536)
                if not chunk:
                    return
                buffered += chunk
            body, buffered = buffered[:length], buffered[length:]
            path = urllib.parse.urlsplit(target).path
            rule = self._rule(method, path)
            action = rule.action if rule else "forward"
            if not self._act(client, head, body, action, rule):
                self.seen.append(Seen(method, path, action, _forwarded(action, body), headers))
                return
            self.seen.append(Seen(method, path, action, _forwarded(action, body), headers))

    def _act(
        self, client: socket.socket, head: bytes, body: bytes, action: str, rule: Rule | None
    ) -> bool:
        """Handle one request; False when the client connection is to be closed."""
        if action == "drop":
            return False
        if action == "status":
            assert rule is not None
            text = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "flaky"}]}).encode()
            extra = f"Retry-After: {rule.retry_after}\r\n" if rule.retry_after is not None else ""
            client.sendall(
                f"HTTP/1.1 {rule.status} Flaky\r\nContent-Length: {len(text)}\r\n{extra}"
                "Content-Type: application/json\r\n\r\n".encode()
                + text
            )
            return True
        with socket.create_connection(self.backend, timeout=30) as upstream:
            if action == "cut":
                upstream.sendall(head + body[: len(body) // 2])
                return False
            upstream.sendall(_closing(head) + body)
            answer = b""
            while chunk := upstream.recv(65536):
                answer += chunk
        if action == "lose":
            return False
        answer_head, _, answer_body = answer.partition(b"\r\n\r\n")
        keep = re.search(rb"(?im)^(content-length|transfer-encoding):", answer_head) is not None
        if keep:
            answer_head = re.sub(rb"(?im)^connection: *close\r\n?", b"", answer_head + b"\r\n")
            answer_head = answer_head.rstrip(b"\r\n")
        if action == "cut-answer":
            client.sendall(answer_head + b"\r\n\r\n" + answer_body[: len(answer_body) // 2])
            return False
        client.sendall(answer_head + b"\r\n\r\n" + answer_body)
        return keep

    def actions(self, method: str, pattern: str = "") -> list[str]:
        return [s.action for s in self.seen if s.method == method and re.search(pattern, s.path)]


def _read_head_from(sock: socket.socket, buffered: bytes) -> tuple[bytes, bytes]:
    data = buffered
    while b"\r\n\r\n" not in data:
        if data and not re.match(rb"[A-Z]", data):
            return data, b""  # not HTTP: the caller answers it
        chunk = sock.recv(65536)
        if not chunk:
            return b"", b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _closing(head: bytes) -> bytes:
    """`head` asking the backend to close after its answer (read to its end)."""
    lines = [ln for ln in head.split(b"\r\n") if ln and not ln.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def _forwarded(action: str, body: bytes) -> int:
    if action in ("drop", "status"):
        return 0
    return len(body) // 2 if action == "cut" else len(body)


# -- an in-process registry with chunked uploads ------------------------------------------------

TOKEN = "access-" + uuid.uuid4().hex
IDENTITY = "identity-" + uuid.uuid4().hex


@dataclass
class RegistryState:
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    uploads: dict[str, bytearray] = field(default_factory=dict)
    chunked: bool = True  # PATCH with Content-Range accepted
    ranges: bool = True  # Range honoured on blob GETs
    bearer: bool = False  # tokens from /token: Basic ann:secret, or the identity token
    connections: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)
    posts: int = 0
    grants: list[str] = field(default_factory=list)


class RegistryHandler(BaseHTTPRequestHandler):
    state: RegistryState
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.state.connections += 1

    def handle(self) -> None:
        # A TLS hello on this plain-http port gets what Go's servers answer, at once.
        with contextlib.suppress(OSError):
            if self.connection.recv(1, socket.MSG_PEEK) == b"\x16":
                self.wfile.write(b"HTTP/1.0 400 Bad Request\r\n\r\nnot TLS\n")
                return
        super().handle()

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes | None:
        """The request body, None when the client hung up before sending all of it."""
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else b""
        if len(data) < length:
            self.close_connection = True
            return None
        return data

    def _route(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        self.state.requests.append((self.command, url.path))
        if url.path == "/token":
            return self._token(url)
        if self.state.bearer and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            realm = f"http://{self.headers['Host']}/token"
            self._body()
            return self._send(
                401, b"{}", {"WWW-Authenticate": f'Bearer realm="{realm}",service="t"'}
            )
        if url.path == "/v2/":
            return self._send(200, b"{}")
        repo, _, rest = url.path.removeprefix("/v2/").partition("/blobs/")
        if rest.startswith("uploads/"):
            return self._upload(repo, rest.removeprefix("uploads/"), url.query)
        if rest:
            return self._blob(rest)
        repo, _, ref = url.path.removeprefix("/v2/").partition("/manifests/")
        if self.command == "PUT":
            body = self._body() or b""
            for key in (ref, oci.sha256_digest(body)):
                self.state.manifests[(repo, key)] = (body, self.headers["Content-Type"])
            return self._send(201, headers={"Docker-Content-Digest": oci.sha256_digest(body)})
        if (repo, ref) not in self.state.manifests:
            return self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}')
        data, media_type = self.state.manifests[(repo, ref)]
        return self._send(200, data, {"Content-Type": media_type})

    def _token(self, url: urllib.parse.SplitResult) -> None:
        if self.command == "POST":
            form = urllib.parse.parse_qs((self._body() or b"").decode())
            self.state.grants.append(form.get("grant_type", [""])[0])
            if form.get("refresh_token") == [IDENTITY]:
                return self._send(200, json.dumps({"access_token": TOKEN}).encode())
            return self._send(401)
        good = "Basic " + base64.b64encode(b"ann:secret").decode()
        if self.headers.get("Authorization") != good:
            return self._send(401)
        return self._send(200, json.dumps({"token": TOKEN}).encode())

    def _blob(self, digest: str) -> None:
        data = self.state.blobs.get(digest)
        if data is None:
            return self._send(404)
        wanted = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if wanted and self.state.ranges and self.command == "GET":
            start = int(wanted[1])
            return self._send(
                206, data[start:], {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            )
        return self._send(200, data)

    def _upload(self, repo: str, upload: str, query: str) -> None:
        uploads = self.state.uploads
        if self.command == "POST":
            self._body()
            self.state.posts += 1
            new = uuid.uuid4().hex
            uploads[new] = bytearray()
            return self._send(
                202, headers={"Location": f"/v2/{repo}/blobs/uploads/{new}", "Range": "0-0"}
            )
        if upload not in uploads:
            self._body()
            return self._send(404, b'{"errors":[{"code":"BLOB_UPLOAD_UNKNOWN","message":"gone"}]}')
        held = uploads[upload]
        where = {
            "Location": f"/v2/{repo}/blobs/uploads/{upload}",
            "Range": f"0-{max(len(held) - 1, 0)}",
        }
        if self.command == "GET":
            return self._send(204, headers=where)
        if self.command == "PATCH" and not self.state.chunked:
            self._body()
            return self._send(405)
        start = (self.headers.get("Content-Range") or "").partition("-")[0]
        if start and int(start) != len(held):
            self._body()
            return self._send(416, headers=where)
        body = self._body()
        if body is None:  # as docker's registry does: a broken body spoils the upload
            del uploads[upload]
            return None
        held += body
        if self.command == "PATCH":
            where["Range"] = f"0-{len(held) - 1}"
            return self._send(202, headers=where)
        digest = urllib.parse.parse_qs(query)["digest"][0]
        if oci.sha256_digest(bytes(held)) != digest:
            return self._send(400, b'{"errors":[{"code":"DIGEST_INVALID","message":"bad"}]}')
        self.state.blobs[digest] = bytes(held)
        del uploads[upload]
        return self._send(201, headers={"Docker-Content-Digest": digest})

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _route


@contextlib.contextmanager
def fake_registry(state: RegistryState | None = None) -> Iterator[tuple[str, RegistryState]]:
    state = state or RegistryState()
    handler = type("Bound", (RegistryHandler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def registry() -> Iterator[tuple[str, RegistryState]]:
    with fake_registry() as found:
        yield found


_DELAY = Retry.delay  # the real backoff, before quick_retries replaces it


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Retries without the waits, no proxy from the test's environment, progress lines
    shown (another test's -q may have silenced them)."""
    monkeypatch.setattr(Retry, "delay", lambda self, attempt: 0.0)
    log.configure()
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    yield
    log.configure()


def _image(store: Store, size: int = 300 << 10, ref: str = "web:1") -> str:
    """An image with one incompressible layer of about `size` bytes; its manifest digest."""
    layer = put_layer(store, files_tar({"etc/blob": noise(size)}), compressed=False)
    return put_image(store, layer, ref=ref).manifest.digest


def _stores(tmp_path: Path) -> tuple[Store, Store]:
    return Store(tmp_path / "a").ensure(), Store(tmp_path / "b").ensure()


# -- proxies: configuration ---------------------------------------------------------------------


def test_proxies_come_from_the_environment_as_go_reads_them() -> None:
    env = {
        "HTTPS_PROXY": "http://upper.example:3128",
        "https_proxy": "http://lower.example:3128",
        "http_proxy": "plain.example",
        "no_proxy": "internal.example, .corp.example ,10.0.0.0/8",
    }
    found = Proxies.from_env(env)
    assert found.https == Proxy("upper.example", 3128, "", "$HTTPS_PROXY")
    assert found.http == Proxy("plain.example", 80, "", "$http_proxy")
    assert found.no_proxy == ("internal.example", ".corp.example", "10.0.0.0/8")
    assert found.for_url("https://reg.example/v2/") == found.https
    assert found.for_url("http://reg.example:5000/v2/") == found.http
    assert found.for_url("https://internal.example/v2/") is None
    # https never falls back to HTTP_PROXY, as in docker and podman.
    assert Proxies.from_env({"HTTP_PROXY": "p:1"}).for_url("https://reg.example/") is None
    assert Proxies.from_env({}) == Proxies()


def test_a_proxy_url_may_carry_credentials_for_the_proxy() -> None:
    proxy = parse_proxy("http://ann%40corp:p%3Ass@proxy.example:8080", "$HTTPS_PROXY")
    assert (proxy.host, proxy.port) == ("proxy.example", 8080)
    assert proxy.headers() == {"Proxy-Authorization": Credentials("ann@corp", "p:ss").basic()}
    assert parse_proxy("[::1]:3128", "$X").netloc == "[::1]:3128"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("socks5://proxy.example:1080", r"\$HTTPS_PROXY='socks5://.*only http:// proxies"),
        ("https://proxy.example", r"only http:// proxies are supported \(not https://\)"),
        ("http://proxy.example:99999", r"expected http://HOST\[:PORT\]"),
        ("http://:3128", r"expected http://HOST\[:PORT\]"),
    ],
)
def test_unusable_proxies_are_named(value: str, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        Proxies.from_env({"HTTPS_PROXY": value})


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "direct"),
    [
        ("reg.example", "443", (), False),
        ("127.0.0.1", "5000", (), True),  # loopback: never through a proxy
        ("127.8.9.10", "5000", (), True),
        ("::1", "5000", (), True),
        ("localhost", "5000", (), True),
        ("reg.example", "443", ("*",), True),
        ("reg.example", "443", ("reg.example",), True),
        ("a.b.reg.example", "443", ("reg.example",), True),
        ("notreg.example", "443", ("reg.example",), False),
        ("reg.example", "443", (".reg.example",), False),  # subdomains only
        ("a.reg.example", "443", (".reg.example",), True),
        ("a.reg.example", "443", ("*.reg.example",), True),
        ("reg.example", "5000", ("reg.example:5000",), True),
        ("reg.example", "443", ("reg.example:5000",), False),
        ("10.1.2.3", "443", ("10.0.0.0/8",), True),
        ("11.1.2.3", "443", ("10.0.0.0/8",), False),
        ("reg.example", "443", ("10.0.0.0/8",), False),  # names are never resolved for it
        ("10.1.2.3", "443", ("10.1.2.3",), True),
        ("10.1.2.3", "5000", ("10.1.2.3:443",), False),
        ("fd00::5", "443", ("fd00::/8",), True),
        ("fd00::5", "443", ("[fd00::5]:443",), True),
        ("fd00::5", "443", ("fd00::5",), True),
        ("reg.example", "443", ("", " ", "/", "nonsense/99"), False),
    ],
)
def test_no_proxy_names_domains_ips_cidrs_and_ports(
    host: str, port: str, no_proxy: tuple[str, ...], direct: bool
) -> None:
    assert bypasses(host, port, no_proxy) is direct


def test_the_default_port_of_the_scheme_is_matched() -> None:
    proxies = Proxies.from_env({"HTTPS_PROXY": "p:1", "NO_PROXY": "reg.example:443"})
    assert proxies.for_url("https://reg.example/v2/") is None
    assert proxies.for_url("https://reg.example:5000/v2/") is not None


# -- proxies: traffic ---------------------------------------------------------------------------

NAME = "registry.sysbake.test"  # resolved by the test's proxy only


def test_push_and_pull_go_through_the_proxy_by_name(
    registry: tuple[str, RegistryState], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, state = registry
    port = address.rpartition(":")[2]
    a, b = _stores(tmp_path)
    digest = _image(a)
    with CountingProxy({NAME: "127.0.0.1"}) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        options = ConnectOptions(tls=TlsOptions(verify=False))  # plain http by name
        ref = Reference.parse(f"{NAME}:{port}/web:1")
        assert push(a, "web:1", ref, options).digest == digest
        assert pull(b, ref, options).image.manifest.digest == digest
    # https was tried first, through a tunnel; then plain http, as absolute-URI requests.
    assert proxy.connects() == [f"{NAME}:{port}", f"{NAME}:{port}"]
    assert all(url.startswith(f"http://{NAME}:{port}/v2/") for url in proxy.forwarded())
    assert proxy.forwarded()
    # Kept alive: far fewer connections than requests reached the registry.
    assert state.connections <= 4 < len(state.requests)


def test_no_proxy_and_loopback_go_direct(
    registry: tuple[str, RegistryState], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, _ = registry
    port = address.rpartition(":")[2]
    a, _ = _stores(tmp_path)
    _image(a)
    with CountingProxy({NAME: "127.0.0.1"}) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        push(a, "web:1", Reference.parse(f"{address}/web:1"), ConnectOptions())
        monkeypatch.setenv("NO_PROXY", f"example.invalid,.sysbake.test:{port}")
        options = ConnectOptions(tls=TlsOptions(verify=False))
        with pytest.raises(RegistryError, match=f"cannot resolve {NAME}"):
            push(a, "web:1", Reference.parse(f"{NAME}:{port}/web:1"), options)
    assert proxy.seen == []


def test_a_proxy_that_wants_credentials_says_so(
    registry: tuple[str, RegistryState], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, _ = registry
    port = address.rpartition(":")[2]
    a, b = _stores(tmp_path)
    _image(a)
    good = Credentials("pat", "pw").basic()
    ref = Reference.parse(f"{NAME}:{port}/web:1")
    options = ConnectOptions(tls=TlsOptions(verify=False))
    with CountingProxy({NAME: "127.0.0.1"}, auth=good) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        with pytest.raises(
            RegistryError, match=rf"the proxy {proxy.address} \(\$HTTPS_PROXY\) requires auth"
        ):
            push(a, "web:1", ref, options)
        monkeypatch.setenv("HTTPS_PROXY", f"http://pat:pw@{proxy.address}")
        monkeypatch.setenv("HTTP_PROXY", f"http://pat:pw@{proxy.address}")
        push(a, "web:1", ref, options)
        pull(b, ref, options)


def test_a_proxy_that_is_not_there_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        monkeypatch.setenv("HTTPS_PROXY", f"127.0.0.1:{port}")
        store = Store(tmp_path / "s").ensure()
        with pytest.raises(
            RegistryError,
            match=rf"cannot connect to the proxy 127\.0\.0\.1:{port} \(\$HTTPS_PROXY\): "
            "connection refused",
        ):
            pull(store, Reference.parse("reg.example/web:1"), ConnectOptions())


# -- retries ------------------------------------------------------------------------------------


def test_retry_settings_come_from_the_environment() -> None:
    assert Retry.from_env({}) == Retry(attempts=5)
    assert Retry.from_env({"SYSBAKE_REGISTRY_RETRIES": "0"}).attempts == 1
    with pytest.raises(RegistryError, match=r"\$SYSBAKE_REGISTRY_RETRIES='x'"):
        Retry.from_env({"SYSBAKE_REGISTRY_RETRIES": "x"})
    with pytest.raises(RegistryError, match="expected 0 to 100 tries"):
        Retry.from_env({"SYSBAKE_REGISTRY_RETRIES": "2.5"})
    assert upload_chunk_size({}) == 32 << 20
    assert upload_chunk_size({"SYSBAKE_REGISTRY_CHUNK": "65536"}) == 65536


def test_backoff_doubles_within_bounds() -> None:
    retry = Retry(attempts=9, base=0.5, longest=3.0)
    for attempt, full in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (8, 3.0)):
        assert full / 2 <= _DELAY(retry, attempt) <= full


def test_transient_failures_are_tried_again(
    registry: tuple[str, RegistryState], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    address, _ = registry
    a, b = _stores(tmp_path)
    digest = _image(a)
    rules = [
        Rule("GET", r"^/v2/$", "drop", times=2),  # the first two connections hang up
        Rule("HEAD", r"/blobs/", "status", status=429, retry_after="0"),
        Rule("PUT", r"/manifests/", "status", status=502, times=2),
        Rule("GET", r"/manifests/", "status", status=503, retry_after="0"),
        Rule("GET", r"/blobs/sha256:", "drop"),
    ]
    with FlakyFront(address, rules) as front:
        ref = Reference.parse(f"{front.address}/web:1")
        assert push(a, "web:1", ref, ConnectOptions()).digest == digest
        assert pull(b, ref, ConnectOptions()).image.manifest.digest == digest
    assert all(rule.times == 0 for rule in rules)
    assert front.actions("PUT", "/manifests/") == ["status", "status", "forward"]
    assert "trying again" in capfd.readouterr().err


def test_retries_are_bounded_and_say_what_failed(
    registry: tuple[str, RegistryState], tmp_path: Path
) -> None:
    address, _ = registry
    a, _ = _stores(tmp_path)
    _image(a)
    with FlakyFront(address, [Rule("GET", r"/manifests/", "status", times=99)]) as front:
        push(a, "web:1", Reference.parse(f"{front.address}/web:1"), ConnectOptions())
        store = Store(tmp_path / "c").ensure()
        with pytest.raises(RegistryError, match="UNAVAILABLE: flaky"):
            pull(store, Reference.parse(f"{front.address}/web:1"), ConnectOptions())
    assert front.actions("GET", "/manifests/") == ["status"] * Retry().attempts


def test_a_long_retry_after_is_not_waited_for(
    registry: tuple[str, RegistryState], tmp_path: Path
) -> None:
    address, _ = registry
    rule = Rule("GET", r"^/v2/$", "status", status=429, retry_after="3600", times=99)
    with FlakyFront(address, [rule]) as front:
        store = Store(tmp_path / "s").ensure()
        with pytest.raises(RegistryError, match="answered HTTP 429"):
            pull(store, Reference.parse(f"{front.address}/web:1"), ConnectOptions())
    assert front.actions("GET") == ["status"]


def test_a_refused_connection_is_not_tried_again(tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        session = Session(f"127.0.0.1:{port}", retry=Retry(attempts=5))
        with pytest.raises(RegistryError, match="connection refused") as err:
            session.check_login()
    assert "trying again" not in str(err.value)


def test_a_cut_download_resumes_with_range(
    registry: tuple[str, RegistryState], tmp_path: Path
) -> None:
    address, _ = registry
    a, b = _stores(tmp_path)
    digest = _image(a)
    layer = a.resolve("web:1").layers[0]
    push(a, "web:1", Reference.parse(f"{address}/web:1"), ConnectOptions())
    with FlakyFront(address, [Rule("GET", layer.blob.digest, "cut-answer")]) as front:
        result = pull(b, Reference.parse(f"{front.address}/web:1"), ConnectOptions())
    assert result.image.manifest.digest == digest
    assert (
        b.blob_path(layer.blob.digest).read_bytes() == a.blob_path(layer.blob.digest).read_bytes()
    )
    ranged = [s.headers.get("range") for s in front.seen if layer.blob.digest in s.path]
    assert ranged[0] is None and re.fullmatch(r"bytes=\d+-", ranged[1] or "")
    assert int((ranged[1] or "=0-").split("=")[1][:-1]) > 0


def test_a_server_ignoring_range_has_its_first_bytes_skipped(tmp_path: Path) -> None:
    with fake_registry(RegistryState(ranges=False)) as (address, _):
        a, b = _stores(tmp_path)
        digest = _image(a)
        layer = a.resolve("web:1").layers[0]
        push(a, "web:1", Reference.parse(f"{address}/web:1"), ConnectOptions())
        with FlakyFront(address, [Rule("GET", layer.blob.digest, "cut-answer")]) as front:
            result = pull(b, Reference.parse(f"{front.address}/web:1"), ConnectOptions())
    assert result.image.manifest.digest == digest
    assert len([s for s in front.seen if layer.blob.digest in s.path]) == 2


# -- uploads ------------------------------------------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("SYSBAKE_REGISTRY_CHUNK", str(64 << 10))
    return 64 << 10


def _patches(front: FlakyFront) -> list[Seen]:
    return [s for s in front.seen if s.method == "PATCH"]


def test_large_blobs_go_in_chunks(
    registry: tuple[str, RegistryState], tmp_path: Path, small_chunks: int
) -> None:
    address, state = registry
    a, b = _stores(tmp_path)
    digest = _image(a)
    layer = a.resolve("web:1").layers[0]
    with FlakyFront(address) as front:
        push(a, "web:1", Reference.parse(f"{front.address}/web:1"), ConnectOptions())
    chunks = -(-layer.blob.size // small_chunks)
    assert [s.body for s in _patches(front)] == [small_chunks] * (chunks - 1) + [
        layer.blob.size - small_chunks * (chunks - 1)
    ]
    assert state.blobs[layer.blob.digest] == a.blob_path(layer.blob.digest).read_bytes()
    assert pull(b, Reference.parse(f"{address}/web:1"), ConnectOptions()).image.manifest.digest == (
        digest
    )


def test_a_dropped_chunk_resumes_where_the_registry_stands(
    registry: tuple[str, RegistryState], tmp_path: Path, small_chunks: int
) -> None:
    address, state = registry
    a, _ = _stores(tmp_path)
    _image(a)
    layer = a.resolve("web:1").layers[0]
    rules = [
        Rule("PATCH", "/uploads/", "drop"),  # never reached the registry
        Rule("PATCH", "/uploads/", "lose"),  # reached it; its answer was lost
        Rule("PATCH", "/uploads/", "status", status=503, retry_after="0"),
    ]
    with FlakyFront(address, rules) as front:
        push(a, "web:1", Reference.parse(f"{front.address}/web:1"), ConnectOptions())
    assert all(rule.times == 0 for rule in rules)
    assert state.posts == 2  # the layer's upload and the config's: never started over
    assert sum(s.body for s in _patches(front)) == layer.blob.size  # nothing sent twice
    # Where the upload stood was asked after the lost answer and the 503 at least (a
    # request dropped on a kept-alive connection is sent again on a new one at once).
    statuses = [s for s in front.seen if s.method == "GET" and "/uploads/" in s.path]
    assert len(statuses) >= 2
    assert state.blobs[layer.blob.digest] == a.blob_path(layer.blob.digest).read_bytes()


def test_a_chunk_cut_midway_starts_the_blob_over(
    registry: tuple[str, RegistryState], tmp_path: Path, small_chunks: int
) -> None:
    address, state = registry
    a, _ = _stores(tmp_path)
    _image(a)
    layer = a.resolve("web:1").layers[0]
    rules = [Rule("PATCH", "/uploads/", "forward", times=2), Rule("PATCH", "/uploads/", "cut")]
    with FlakyFront(address, rules) as front:
        push(a, "web:1", Reference.parse(f"{front.address}/web:1"), ConnectOptions())
    assert state.posts == 3  # the layer twice (its first upload was spoilt), the config
    assert [s.action for s in _patches(front)][:3] == ["forward", "forward", "cut"]
    assert state.blobs[layer.blob.digest] == a.blob_path(layer.blob.digest).read_bytes()


def test_a_lost_answer_to_the_last_put_is_checked_not_sent_again(
    registry: tuple[str, RegistryState], tmp_path: Path
) -> None:
    address, state = registry
    a, _ = _stores(tmp_path)
    _image(a)
    with FlakyFront(address, [Rule("PUT", "/uploads/", "lose")]) as front:
        push(a, "web:1", Reference.parse(f"{front.address}/web:1"), ConnectOptions())
    assert front.actions("PUT", "/uploads/") == ["lose", "forward"]  # config: one try
    assert state.posts == 2


def test_a_registry_without_chunks_gets_one_put(tmp_path: Path, small_chunks: int) -> None:
    with fake_registry(RegistryState(chunked=False)) as (address, state):
        a, _ = _stores(tmp_path)
        _image(a)
        layer = a.resolve("web:1").layers[0]
        with FlakyFront(address) as front:
            push(a, "web:1", Reference.parse(f"{front.address}/web:1"), ConnectOptions())
    assert front.actions("PATCH") == ["forward"]  # refused once, then never asked again
    puts = [s for s in front.seen if s.method == "PUT" and "/uploads/" in s.path]
    assert [s.body for s in puts] == [layer.blob.size, a.resolve("web:1").config_descriptor.size]
    assert state.blobs[layer.blob.digest] == a.blob_path(layer.blob.digest).read_bytes()


def test_uploads_that_never_succeed_end_with_one_line(
    registry: tuple[str, RegistryState], tmp_path: Path
) -> None:
    address, _ = registry
    a, _ = _stores(tmp_path)
    _image(a)
    failing = pytest.raises(
        RegistryError,
        match=r"starting the upload of blob sha256:\w+: UNAVAILABLE: flaky \(5 tries\)",
    )
    with FlakyFront(address, [Rule("POST", "/uploads/", "status", times=99)]) as front, failing:
        push(a, "web:1", Reference.parse(f"{front.address}/web:1"), ConnectOptions())
    assert front.actions("POST") == ["status"] * 5


# -- credential helpers -------------------------------------------------------------------------


def helper_script(
    directory: Path, name: str, answers: dict[str, dict[str, str]], log: Path
) -> Path:
    """docker-credential-NAME in `directory`: logs each server it is asked about to `log`
    and answers from `answers` (server -> {"Username", "Secret"}), else "not found"."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"docker-credential-{name}"
    cases = "".join(
        f"  {server!r}) printf '%s' {json.dumps({'ServerURL': server, **doc})!r} ;;\n"
        for server, doc in answers.items()
    )
    path.write_text(
        "#!/bin/sh\n"
        '[ "$1" = get ] || exit 2\n'
        "server=$(cat)\n"
        f'printf "%s\\n" "$server" >> {str(log)!r}\n'
        'case "$server" in\n'
        f"{cases}"
        "  *) echo 'credentials not found in native keychain'; exit 1 ;;\n"
        "esac\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A bin dir on PATH for helper scripts, and the log they write."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir, tmp_path / "helper.log"


def _write(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def test_cred_helpers_come_before_auths_and_creds_store_after(
    tmp_path: Path, helpers: tuple[Path, Path]
) -> None:
    bin_dir, log = helpers
    helper_script(bin_dir, "one", {"reg.example": {"Username": "from-one", "Secret": "s1"}}, log)
    helper_script(
        bin_dir, "store", {"other.example": {"Username": "from-store", "Secret": "s2"}}, log
    )
    inline = base64.b64encode(b"inline:pw").decode()
    config = _write(
        tmp_path / "config.json",
        {
            "credHelpers": {"reg.example": "one", "https://third.example": "one"},
            "credsStore": "store",
            "auths": {"reg.example": {"auth": inline}, "inline.example": {"auth": inline}},
        },
    )
    files = [config]
    assert lookup_credentials("reg.example", "x", files) == Credentials("from-one", "s1")
    assert lookup_credentials("inline.example", "x", files) == Credentials("inline", "pw")
    assert lookup_credentials("other.example", "x", files) == Credentials("from-store", "s2")
    assert lookup_credentials("third.example", "x", files) is None  # "one" does not know it
    assert log.read_text().splitlines() == [
        "reg.example",
        "other.example",
        "third.example",
        "third.example",
    ]


def test_the_first_file_that_knows_the_registry_wins(
    tmp_path: Path, helpers: tuple[Path, Path]
) -> None:
    bin_dir, log = helpers
    helper_script(bin_dir, "podman", {"reg.example": {"Username": "p", "Secret": "1"}}, log)
    helper_script(bin_dir, "docker", {"reg.example": {"Username": "d", "Secret": "2"}}, log)
    podman = _write(tmp_path / "auth.json", {"credHelpers": {"reg.example": "podman"}})
    docker = _write(tmp_path / "config.json", {"credsStore": "docker"})
    assert lookup_credentials("reg.example", "x", [podman, docker]) == Credentials("p", "1")
    assert lookup_credentials("reg.example", "x", [tmp_path / "none.json", docker]) == (
        Credentials("d", "2")
    )


def test_helpers_that_fail_or_are_missing(
    tmp_path: Path, helpers: tuple[Path, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    bin_dir, _ = helpers
    broken = bin_dir / "docker-credential-broken"
    broken.write_text("#!/bin/sh\necho 'keyring locked' >&2\nexit 3\n")
    broken.chmod(0o755)
    liar = bin_dir / "docker-credential-liar"
    liar.write_text("#!/bin/sh\necho 'not json'\n")
    liar.chmod(0o755)
    for helper, message in (
        (
            "broken",
            r"credHelpers\.reg\.example: docker-credential-broken get failed \(exit 3\): "
            "keyring locked",
        ),
        ("liar", "docker-credential-liar get: expected a JSON object with Username and Secret"),
        ("absent", r"docker-credential-absent is not on \$PATH: install it, or remove the entry"),
        ("../../bin/sh", r"'\.\./\.\./bin/sh' is not a credential helper name"),
    ):
        config = _write(tmp_path / f"{len(helper)}.json", {"credHelpers": {"reg.example": helper}})
        with pytest.raises(RegistryError, match=message):
            lookup_credentials("reg.example", "x", [config])
    # A default store that is not installed only warns: docker's files often name one.
    config = _write(tmp_path / "store.json", {"credsStore": "desktop"})
    assert lookup_credentials("reg.example", "x", [config]) is None
    assert "docker-credential-desktop is not on $PATH" in capfd.readouterr().err
    with pytest.raises(RegistryError, match="key 'credHelpers' must be an object"):
        lookup_credentials("reg.example", "x", [_write(tmp_path / "bad.json", {"credHelpers": []})])


def test_a_helper_lets_push_and_pull_run_without_login(
    tmp_path: Path, helpers: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir, log = helpers
    with fake_registry(RegistryState(bearer=True)) as (address, _):
        helper_script(
            bin_dir, "testhelper", {address: {"Username": "ann", "Secret": "secret"}}, log
        )
        monkeypatch.setenv(
            "REGISTRY_AUTH_FILE",
            str(_write(tmp_path / "auth.json", {"credHelpers": {address: "testhelper"}})),
        )
        a, b = _stores(tmp_path)
        digest = _image(a, 1000)
        ref = Reference.parse(f"{address}/web:1")
        assert push(a, "web:1", ref, ConnectOptions()).digest == digest
        assert pull(b, ref, ConnectOptions()).image.manifest.digest == digest
    assert log.read_text().splitlines() == [address, address]


def test_an_identity_token_is_exchanged_for_access(
    tmp_path: Path, helpers: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir, log = helpers
    with fake_registry(RegistryState(bearer=True)) as (address, state):
        token_user = {"Username": auth.IDENTITY_TOKEN_USER, "Secret": IDENTITY}
        helper_script(bin_dir, "testhelper", {address: token_user}, log)
        config = _write(tmp_path / "docker" / "config.json", {"credsStore": "testhelper"})
        a, _ = _stores(tmp_path)
        _image(a, 1000)
        options = ConnectOptions(auth_file=config)
        push(a, "web:1", Reference.parse(f"{address}/web:1"), options)
    assert state.grants and set(state.grants) == {"refresh_token"}
    assert hashlib.sha256(IDENTITY.encode()).hexdigest() not in json.dumps(state.requests)

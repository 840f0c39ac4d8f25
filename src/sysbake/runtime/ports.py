"""Published ports (`run -p [HOST_IP:][HOST_PORT:]CONTAINER_PORT[/tcp|udp]`): the parser, and
the forwarder that carries them from the host into the container's network namespace.

A container of `--network none` has its own network namespace with a loopback only, so
nothing on the host can reach its services. For each published port the process that
creates the container binds the host socket (127.0.0.1 unless the user names an address;
a bind failure is an error of `run`, before anything starts) and hands it to a small
forwarder forked for the container: it enters the container's network namespace and, for
each connection accepted (or datagram received) on the host socket, opens one to
127.0.0.1 (else ::1) at the container port there and relays the bytes both ways.

The forwarder lives as long as PID 1 (a pidfd wakes it when it ends) and holds
`ports.lock` for its life; stop, kill, rm and the removal of orphans end it at once
(`stop_forwarder`), so the host ports are free when they return. It is imported only
when a container publishes ports (sysbake.commands: start-up).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import os
import re
import select
import signal
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from sysbake.errors import RuntimeFailure
from sysbake.fsutil import lock_held

LOCK = "ports.lock"  # flocked by the forwarder for its whole life
PID = "ports.pid"  # its pid (meaningful while the lock is held)
DEFAULT_HOST_IP = "127.0.0.1"
PROTOCOLS = ("tcp", "udp")
_CLONE_NEWNET = 0x40000000
_SPEC = re.compile(
    r"(?:(?P<ip>\[[0-9A-Fa-f:.]+\]|[0-9]+(?:\.[0-9]+){3}):)?"
    r"(?:(?P<host>[0-9]*(?:-[0-9]+)?):)?"
    r"(?P<container>[0-9]+(?:-[0-9]+)?)"
    r"(?:/(?P<proto>[A-Za-z]+))?"
)
EXPECTED = "[HOST_IP:][HOST_PORT:]CONTAINER_PORT[/tcp|udp], ports 1-65535 or equal ranges"
_UDP_IDLE = 60.0  # seconds a UDP client's flow is kept without traffic


class Publish(NamedTuple):
    """One published port: the host address and port (0: any free port) and the
    container's port and protocol."""

    host_ip: str
    host_port: int
    container_port: int
    protocol: str = "tcp"

    def __str__(self) -> str:
        """The canonical spec, which `parse` reads back: "127.0.0.1:8080:80/tcp"."""
        return f"{_bracketed(self.host_ip)}:{self.host_port}:{self.container_port}/{self.protocol}"

    def describe(self) -> str:
        """As docker's PORTS column: "127.0.0.1:8080->80/tcp"."""
        return f"{_bracketed(self.host_ip)}:{self.host_port}->{self.container_port}/{self.protocol}"


def _bracketed(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def parse(text: str) -> list[Publish]:
    """The ports of one `-p` value; RuntimeFailure ("-p TEXT: expected ...") otherwise."""
    found = _SPEC.fullmatch(text.strip())
    if found is None:
        raise _refused(text)
    ip = (found["ip"] or DEFAULT_HOST_IP).strip("[]")
    try:
        ip = str(ipaddress.ip_address(ip))
    except ValueError:
        raise RuntimeFailure(f"-p {text}: {ip!r} is not an IP address") from None
    protocol = (found["proto"] or "tcp").lower()
    if protocol not in PROTOCOLS:
        raise RuntimeFailure(f"-p {text}: protocol {protocol!r}: expected tcp or udp")
    inside = _ports(text, found["container"])
    host = _ports(text, found["host"], 0) if found["host"] else [0] * len(inside)
    if len(host) != len(inside):
        raise RuntimeFailure(f"-p {text}: expected host and container ranges of equal length")
    return [Publish(ip, h, c, protocol) for h, c in zip(host, inside, strict=True)]


def _ports(text: str, value: str, lowest: int = 1) -> list[int]:
    """The ports of "N" or "N-M"; a host port may be 0 (any free port), alone."""
    first, _, last = value.partition("-")
    low, high = int(first), int(last or first)
    if not (lowest <= low <= high <= 65535) or (high == 0 and last):
        raise _refused(text)
    if low == 0 and high != 0:
        raise _refused(text)
    return list(range(low, high + 1))


def _refused(text: str) -> RuntimeFailure:
    return RuntimeFailure(f"-p {text}: expected {EXPECTED}")


def parse_all(values: Sequence[str]) -> tuple[Publish, ...]:
    """Every `-p` value's ports; the same host address, port and protocol twice is refused."""
    ports = tuple(p for value in values for p in parse(value))
    seen: set[tuple[str, int, str]] = set()
    for port in ports:
        key = (port.host_ip, port.host_port, port.protocol)
        if port.host_port and key in seen:
            raise RuntimeFailure(f"-p: host port {port.host_ip}:{port.host_port} given twice")
        seen.add(key)
    return ports


# -- the host side ---------------------------------------------------------------------------


def bind(ports: Sequence[Publish]) -> list[tuple[Publish, socket.socket]]:
    """A bound (and, for TCP, listening) host socket for each port, with the port filled
    in where any was asked for. RuntimeFailure naming the port when one cannot be bound
    (none is left open)."""
    bound: list[tuple[Publish, socket.socket]] = []
    try:
        for port in ports:
            bound.append(_bind_one(port))
    except BaseException:
        for _, sock in bound:
            sock.close()
        raise
    return bound


def _bind_one(port: Publish) -> tuple[Publish, socket.socket]:
    family = socket.AF_INET6 if ":" in port.host_ip else socket.AF_INET
    kind = socket.SOCK_STREAM if port.protocol == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((port.host_ip, port.host_port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
    except OSError as exc:
        sock.close()
        where = f"{_bracketed(port.host_ip)}:{port.host_port}/{port.protocol}"
        raise RuntimeFailure(f"-p {port}: cannot listen on {where}: {exc.strerror}") from None
    return port._replace(host_port=sock.getsockname()[1]), sock


def forwarder_alive(cdir: Path) -> bool:
    """Whether the forwarder of the container in `cdir` runs (holds its lock)."""
    return lock_held(cdir / LOCK)


def stop_forwarder(cdir: Path, timeout: float = 5.0) -> None:
    """End the container's forwarder, if it runs, and wait until it has (its host ports
    are then free). Idempotent."""
    if not forwarder_alive(cdir):
        return
    try:
        pid = int((cdir / PID).read_text().strip())
        pidfd = os.pidfd_open(pid)
    except (OSError, ValueError):
        return
    try:
        # Still the forwarder once the pidfd is open: its lock is only released at its end.
        if forwarder_alive(cdir):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            waiter = select.poll()
            waiter.register(pidfd, select.POLLIN)
            waiter.poll(timeout * 1000)
    finally:
        os.close(pidfd)


def start_forwarder(cdir: Path, bound: Sequence[tuple[Publish, socket.socket]], pid: int) -> None:
    """Fork the forwarder of the container whose PID 1 has host pid `pid`, detached, with
    the sockets of `bound` (closed here once it has them); returns once it forwards.
    RuntimeFailure if it could not enter the container's network namespace."""
    pidfd = os.pidfd_open(pid)
    netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    ready_r, ready_w = os.pipe()
    try:
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the forked child
            try:
                os.close(ready_r)
                os.setsid()
                if os.fork() == 0:
                    _forwarder(cdir, bound, pidfd, netns, ready_w)
            finally:
                os._exit(0)
        os.close(ready_w)
        os.waitpid(child, 0)
        with os.fdopen(ready_r, "rb") as r:
            verdict = r.read().decode(errors="replace")
    finally:
        for fd in (pidfd, netns):
            os.close(fd)
        for _, sock in bound:
            sock.close()
    if verdict != "ok":
        raise RuntimeFailure(f"publishing ports: {verdict or 'the forwarder died'}")


# -- the forwarder (a forked child) ----------------------------------------------------------


def _forwarder(  # pragma: no cover - runs in the forked child
    cdir: Path,
    bound: Sequence[tuple[Publish, socket.socket]],
    pidfd: int,
    netns: int,
    ready: int,
) -> None:
    keep = {pidfd, netns, ready, *(sock.fileno() for _, sock in bound)}
    try:
        _detach(keep)
        lock = os.open(cdir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(lock, fcntl.LOCK_EX)
        (cdir / PID).write_text(f"{os.getpid()}\n")
        libc = ctypes.CDLL(None, use_errno=True)
        # Sockets made from now on are the container's; the bound ones stay the host's.
        if libc.setns(netns, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "entering the container's network namespace")
        os.close(netns)
        os.write(ready, b"ok")
        os.close(ready)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(ready, str(exc).encode())
        os._exit(1)
    _serve(bound, pidfd)
    os._exit(0)


def _detach(keep: set[int]) -> None:  # pragma: no cover - runs in the forked child
    # Nothing of the launching process may stay open: its flocks and pipes, its terminal.
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2 and int(name) not in keep:
            with contextlib.suppress(OSError):
                os.close(int(name))
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir("/")


def _serve(bound: Sequence[tuple[Publish, socket.socket]], pidfd: int) -> None:
    """Relay until PID 1 ends: TCP connections in a thread each, UDP in one per port."""
    tcp = {sock.fileno(): (port, sock) for port, sock in bound if port.protocol == "tcp"}
    for port, sock in bound:
        if port.protocol == "udp":
            threading.Thread(target=_udp, args=(port, sock), daemon=True).start()
    waiter = select.poll()
    waiter.register(pidfd, select.POLLIN)
    for fd in tcp:
        waiter.register(fd, select.POLLIN)
    while True:
        for fd, _ in waiter.poll():
            if fd == pidfd:
                return
            port, listener = tcp[fd]
            with contextlib.suppress(OSError):
                client, _ = listener.accept()
                threading.Thread(target=_tcp, args=(port, client), daemon=True).start()


def _connect_inside(port: Publish) -> socket.socket:
    """A socket to the container port on the container's loopback (IPv4, else IPv6)."""
    kind = socket.SOCK_STREAM if port.protocol == "tcp" else socket.SOCK_DGRAM
    error: OSError | None = None
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, kind)
        try:
            sock.connect((address, port.container_port))
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    assert error is not None
    raise error


def _tcp(port: Publish, client: socket.socket) -> None:
    with client:
        try:
            inside = _connect_inside(port)
        except OSError:
            return  # nothing listens inside: the client sees the connection close
        with inside:
            other = threading.Thread(target=_pump, args=(inside, client), daemon=True)
            other.start()
            _pump(client, inside)
            other.join()


def _pump(source: socket.socket, dest: socket.socket) -> None:
    """Copy `source` to `dest` until EOF, then pass the EOF on (a half-close)."""
    try:
        while data := source.recv(65536):
            dest.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dest.shutdown(socket.SHUT_WR)


def _udp(port: Publish, host: socket.socket) -> None:
    """Relay datagrams: one connected socket inside per client address, replies back to it."""
    flows: dict[tuple[Any, ...], socket.socket] = {}
    clients: dict[int, tuple[Any, ...]] = {}
    while True:
        ready, _, _ = select.select([host, *flows.values()], [], [], _UDP_IDLE)
        if not ready:
            for sock in flows.values():
                sock.close()
            flows.clear()
            clients.clear()
            continue
        for sock in ready:
            with contextlib.suppress(OSError):
                if sock is host:
                    data, address = host.recvfrom(65536)
                    if address not in flows:
                        flows[address] = _connect_inside(port)
                        clients[flows[address].fileno()] = address
                    flows[address].send(data)
                else:
                    host.sendto(sock.recv(65536), clients[sock.fileno()])

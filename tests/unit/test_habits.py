"""docker/podman habits (issue 14 parts 2 and 6): --format templates and JSON lines,
docker's wording of durations and states, -p specs, where `cp` puts things (and that it
never reaches the host through a container's symlinks), exec's users and exit codes,
`diff`, `build -t/-f`, container IDs, the forwarder, grouped help, completion and man
pages."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sysbake import cli
from sysbake.commands import COMMANDS, build, formats, runtime
from sysbake.commands import help as help_cmd
from sysbake.errors import ConfigError, RuntimeFailure
from sysbake.project.load import load_project
from sysbake.rootfs import Root
from sysbake.runtime import container_dir as cd
from sysbake.runtime import containers, files, inside, ports
from tests.unit.test_rootfs import _in_a_chroot

ROOT = os.geteuid() == 0

# -- --format ------------------------------------------------------------------------------

ROW = {"ID": "abc", "Names": "web", "Ports": ["80/tcp", "443/tcp"], "State": {"Status": "up"}}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{.ID}}", "abc"),
        ("{{ .Names }}:{{.ID}}", "web:abc"),
        ("{{.id}}", "abc"),  # fields match case-insensitively, as users type them
        ("{{.State.Status}}", "up"),
        ("{{json .State}}", '{"Status": "up"}'),
        ("{{upper .Names}}", "WEB"),
        ('{{join .Ports ", "}}', "80/tcp, 443/tcp"),
        ("{{.Ports}}", "[80/tcp 443/tcp]"),
        ("{{.State}}", "map[Status:up]"),
        ("{{.ID}}\\t{{.Names}}", "abc\tweb"),  # a shell passes \t literally
        ("no fields", "no fields"),
    ],
)
def test_templates_substitute_fields(template: str, expected: str) -> None:
    assert formats.render(formats.parse(template), ROW) == expected


@pytest.mark.parametrize(
    ("template", "error"),
    [
        ("{{.Nope}}", "no field .Nope (fields: ID, Names, Ports, State)"),
        ("{{.ID.More}}", ".ID has no fields"),
        ("{{printf .ID}}", "expected 'json', 'table'"),
        ("{{.ID | len}}", "expected 'json', 'table'"),
        ("{{index .Ports 1}}", "expected 'json', 'table'"),
        ("{{.ID", "an unclosed {{"),
        ("{{join .Ports}}", "expected {{join .Field"),
    ],
)
def test_anything_but_a_field_is_refused_not_evaluated(template: str, error: str) -> None:
    with pytest.raises(formats.FormatError) as caught:
        formats.render(formats.parse(template), ROW)
    assert error in str(caught.value)
    assert caught.value.exit_code == 2


def test_json_lines_and_tables() -> None:
    rows = [{"ID": "a", "Names": "one"}, {"ID": "bbbbbb", "Names": "two"}]
    lines = formats.write_rows("json", rows)
    assert [json.loads(line) for line in lines] == rows
    table = formats.write_rows("table {{.ID}}\t{{.Names}}", rows, {"ID": "CONTAINER ID"})
    assert table == ["CONTAINER ID   NAMES", "a              one", "bbbbbb         two"]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.2, "Less than a second"),
        (1, "1 second"),
        (59, "59 seconds"),
        (61, "About a minute"),
        (150, "2 minutes"),
        (3599, "59 minutes"),
        (3600, "About an hour"),
        (5 * 3600, "5 hours"),
        (47 * 3600, "47 hours"),
        (3 * 86400, "3 days"),
        (20 * 86400, "2 weeks"),
        (90 * 86400, "3 months"),
        (800 * 86400, "2 years"),
    ],
)
def test_durations_read_as_docker_writes_them(seconds: float, text: str) -> None:
    assert formats.human_duration(seconds) == text


def test_container_status_reads_as_docker_writes_it() -> None:
    now = 10_000.0
    assert formats.container_status("running", None, now - 120, now) == "Up 2 minutes"
    assert formats.container_status("exited", 0, now - 180, now) == "Exited (0) 3 minutes ago"
    assert formats.container_status("exited", 137, None, now) == "Exited (137)"
    assert formats.container_status("created", None, None, now) == "Created"


# -- -p ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("8080:80", ["127.0.0.1:8080:80/tcp"]),
        ("127.0.0.1:18080:80", ["127.0.0.1:18080:80/tcp"]),
        ("0.0.0.0:53:53/udp", ["0.0.0.0:53:53/udp"]),
        ("[::1]:8443:443/TCP", ["[::1]:8443:443/tcp"]),
        ("80", ["127.0.0.1:0:80/tcp"]),  # any free host port
        ("127.0.0.1::80", ["127.0.0.1:0:80/tcp"]),
        ("8000-8001:80-81", ["127.0.0.1:8000:80/tcp", "127.0.0.1:8001:81/tcp"]),
    ],
)
def test_publish_specs(spec: str, expected: list[str]) -> None:
    parsed = ports.parse(spec)
    assert [str(p) for p in parsed] == expected
    assert [ports.parse(str(p)) for p in parsed] == [[p] for p in parsed]  # round trip


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("80:0", "expected [HOST_IP:]"),
        ("70000:80", "expected [HOST_IP:]"),
        ("8080:80/sctp", "protocol 'sctp': expected tcp or udp"),
        ("999.1.1.1:80:80", "'999.1.1.1' is not an IP address"),
        ("8000-8002:80-81", "ranges of equal length"),
        ("web:80", "expected [HOST_IP:]"),
        ("", "expected [HOST_IP:]"),
    ],
)
def test_bad_publish_specs_get_one_line(spec: str, error: str) -> None:
    with pytest.raises(RuntimeFailure) as caught:
        ports.parse(spec)
    assert str(caught.value).startswith(f"-p {spec}: ") and error in str(caught.value)


def test_the_same_host_port_twice_is_refused() -> None:
    with pytest.raises(RuntimeFailure, match="given twice"):
        ports.parse_all(["8080:80", "127.0.0.1:8080:81"])
    assert len(ports.parse_all(["8080:80", "8080:80/udp", "80", "80"])) == 4


def test_a_port_in_use_is_an_error_and_nothing_stays_bound() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        free = ports.parse("127.0.0.1::81")[0]
        with pytest.raises(RuntimeFailure, match=f"cannot listen on 127.0.0.1:{busy}/tcp"):
            ports.bind([free, ports.Publish("127.0.0.1", busy, 80)])
    bound = ports.bind([free])
    try:
        assert bound[0][0].host_port == bound[0][1].getsockname()[1] != 0
    finally:
        bound[0][1].close()


@pytest.mark.skipif(not ROOT, reason="entering a network namespace needs root")
def test_the_forwarder_relays_and_ends_with_pid1(tmp_path: Path) -> None:
    """The forwarder of a "container" whose PID 1 is a sleep in this network namespace:
    TCP and UDP reach a server on loopback, and it is gone once PID 1 is, its port free."""
    with socket.socket() as server, socket.socket(type=socket.SOCK_DGRAM) as echo:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        echo.bind(("127.0.0.1", 0))
        threading.Thread(target=_serve_once, args=(server, echo), daemon=True).start()
        pid1 = subprocess.Popen(["sleep", "60"])
        try:
            wanted = [
                ports.Publish("127.0.0.1", 0, server.getsockname()[1]),
                ports.Publish("127.0.0.1", 0, echo.getsockname()[1], "udp"),
            ]
            bound = ports.bind(wanted)
            tcp, udp = (port.host_port for port, _ in bound)
            ports.start_forwarder(tmp_path, bound, pid1.pid)
            assert ports.forwarder_alive(tmp_path)
            with socket.create_connection(("127.0.0.1", tcp), timeout=10) as client:
                client.sendall(b"ping")
                client.shutdown(socket.SHUT_WR)
                assert _read_all(client) == b"pong:ping"
            with socket.socket(type=socket.SOCK_DGRAM) as client:
                client.settimeout(10)
                client.sendto(b"hi", ("127.0.0.1", udp))
                assert client.recv(100) == b"echo:hi"
        finally:
            pid1.kill()
            pid1.wait()
        ports.stop_forwarder(tmp_path)
        assert not ports.forwarder_alive(tmp_path)
        with socket.socket() as again:
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", tcp))  # free again


def _serve_once(server: socket.socket, echo: socket.socket) -> None:
    conn, _ = server.accept()
    with conn:
        conn.sendall(b"pong:" + _read_all(conn))
    data, peer = echo.recvfrom(100)
    echo.sendto(b"echo:" + data, peer)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1000):
        chunks.append(chunk)
    return b"".join(chunks)


# -- cp ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "is_dir", "dest", "kind", "expected"),
    [
        ("/etc/hosts", False, "/tmp/x", None, ("/tmp/x", False)),
        ("/etc/hosts", False, "/tmp", "dir", ("/tmp/hosts", False)),
        ("/etc/hosts", False, "/tmp/x", "file", ("/tmp/x", False)),
        ("/etc", True, "/tmp/new", None, ("/tmp/new", True)),
        ("/etc", True, "/tmp", "dir", ("/tmp/etc", True)),
        ("/etc/", True, "/tmp/", "dir", ("/tmp/etc", True)),
        ("/etc/.", True, "/tmp", "dir", ("/tmp", True)),  # contents only
        ("/", True, "/tmp", "dir", ("/tmp", True)),
    ],
)
def test_cp_places_things_as_docker_cp(
    source: str, is_dir: bool, dest: str, kind: str | None, expected: tuple[str, bool]
) -> None:
    assert files.target(source, is_dir, dest, kind) == files.Target(*expected)


@pytest.mark.parametrize(
    ("source", "is_dir", "dest", "kind", "error"),
    [
        ("/etc", True, "/tmp/x", "file", "cannot copy the directory /etc onto the file"),
        ("/etc/hosts", False, "/tmp/missing/", None, "no such directory"),
    ],
)
def test_cp_refuses_what_docker_cp_refuses(
    source: str, is_dir: bool, dest: str, kind: str | None, error: str
) -> None:
    with pytest.raises(files.CopyError, match=error):
        files.target(source, is_dir, dest, kind)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("web:/etc/hosts", ("web", "/etc/hosts")),
        ("web:", ("web", "/")),
        ("/host/a:b", (None, "/host/a:b")),
        ("./a:b", (None, "./a:b")),
        ("plain", (None, "plain")),
    ],
)
def test_cp_operands(text: str, expected: tuple[str | None, str]) -> None:
    assert runtime._cp_operand(text) == expected


def _container_tree(top: Path) -> None:
    """A container's files holding what a hostile image would: symlinks to host paths
    (absolute and climbing), a setuid file, a FIFO."""
    (top / "data/sub").mkdir(parents=True)
    (top / "etc").mkdir()
    (top / "etc/hostname").write_bytes(b"inside\n")
    (top / "data/sub/tool").write_bytes(b"#!/bin/sh\n")
    (top / "data/sub/tool").chmod(0o4755)
    os.symlink("/host", top / "evil")
    os.symlink("/host/secret", top / "data/abs")
    os.symlink("../../../../host/secret", top / "data/up")
    os.mkfifo(top / "data/fifo")


@pytest.mark.skipif(not ROOT, reason="chroot needs root here")
def test_cp_never_reaches_the_host_through_the_containers_symlinks() -> None:
    """In a sandbox (a chroot: even a broken copy can only reach it) where /host stands
    for the host and /c for a container: copies out and in through the container's
    symlinks to /host stay inside the container, and leave /host untouched."""
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        (top / "host").mkdir()
        (top / "host/secret").write_bytes(b"host secret\n")
        (top / "c").mkdir()
        _container_tree(top / "c")
        (top / "c/host").mkdir()  # the container's own /host
        (top / "out").mkdir()
        (top / "mine").write_bytes(b"from the host\n")

        def body() -> None:
            with Root("/c") as root:
                # out: through /evil (-> /host) is the container's /host: absent.
                with contextlib.suppress(files.CopyError):
                    files.copy_out(root, "/evil/secret", Path("/out/secret"))
                assert not os.path.exists("/out/secret")
                files.copy_out(root, "/data", Path("/out/data"))
                # in: through /evil lands in the container, never in /host.
                files.copy_in(root, Path("/mine"), "/evil/planted")

        assert _in_a_chroot(top, body) == 0
        assert sorted(os.listdir(top / "host")) == ["secret"]
        assert (top / "host/secret").read_bytes() == b"host secret\n"
        assert (top / "c/host/planted").read_bytes() == b"from the host\n"
        out = top / "out/data"
        assert os.readlink(out / "abs") == "/host/secret"  # a symlink, never followed
        assert os.readlink(out / "up") == "../../../../host/secret"
        assert not (out / "fifo").exists() and not (out / "fifo").is_symlink()
        tool = (out / "sub/tool").stat()
        assert stat.S_IMODE(tool.st_mode) == 0o755  # setuid stripped
        assert (out / "sub/tool").read_bytes() == b"#!/bin/sh\n"


@pytest.mark.skipif(not ROOT, reason="chroot needs root here")
def test_cp_out_never_writes_through_a_host_symlink_below_the_destination() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        (top / "host").mkdir()
        (top / "c/data/etc").mkdir(parents=True)
        (top / "c/data/etc/passwd").write_bytes(b"container\n")
        (top / "out/data").mkdir(parents=True)
        os.symlink("/host", top / "out/data/etc")  # planted where the copy will go

        def body() -> None:
            with Root("/c") as root:
                files.copy_out(root, "/data/.", Path("/out/data"))

        assert _in_a_chroot(top, body) == 1  # refused: not followed
        assert os.listdir(top / "host") == []


def test_cp_in_and_out_of_a_tree(tmp_path: Path) -> None:
    c = tmp_path / "c"
    (c / "srv").mkdir(parents=True)
    src = tmp_path / "src"
    (src / "deep").mkdir(parents=True)
    (src / "deep/file").write_bytes(b"x")
    os.symlink("deep/file", src / "link")
    with Root(c) as root:
        assert files.copy_in(root, src, "/srv") == "/srv/src"
        assert files.copy_in(root, src / "link", "/srv/l") == "/srv/l"
        assert files.copy_in(root, src / "link", "/srv/f", follow=True) == "/srv/f"
        with pytest.raises(files.CopyError, match="no such directory in the container"):
            files.copy_in(root, src, "/missing/dir/x")
        with pytest.raises(files.CopyError, match="no such file or directory"):
            files.copy_in(root, tmp_path / "absent", "/srv")
        assert (c / "srv/src/deep/file").read_bytes() == b"x"
        assert os.readlink(c / "srv/l") == "deep/file"
        assert (c / "srv/f").read_bytes() == b"x"
        back = tmp_path / "back"
        back.mkdir()
        assert files.copy_out(root, "/srv/src", back) == back / "src"
        assert (back / "src/deep/file").read_bytes() == b"x"
        with pytest.raises(files.CopyError, match="no such file or directory in the container"):
            files.copy_out(root, "/nope", back)


# -- diff ----------------------------------------------------------------------------------


@pytest.mark.skipif(not ROOT, reason="whiteouts are character devices: mknod needs root")
def test_changes_name_additions_changes_and_deletions(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc/keep").write_bytes(b"1")
    (lower / "etc/gone").write_bytes(b"1")
    (upper / "etc").mkdir(parents=True)
    (upper / "etc/keep").write_bytes(b"2")
    (upper / "etc/new").write_bytes(b"3")
    os.mknod(upper / "etc/gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    assert [str(c) for c in files.changes(upper, [lower])] == [
        "C /etc",
        "D /etc/gone",
        "C /etc/keep",
        "A /etc/new",
    ]


# -- exec ----------------------------------------------------------------------------------


def _etc(top: Path) -> None:
    (top / "etc").mkdir(parents=True)
    (top / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nann:x:1000:1000::/home/ann:/bin/sh\n"
    )
    (top / "etc/group").write_text("root:x:0:\nann:x:1000:\nwheel:x:10:ann,bob\n")
    (top / "usr/bin").mkdir(parents=True)
    (top / "usr/bin/tool").write_bytes(b"#!/bin/sh\n")
    (top / "usr/bin/tool").chmod(0o755)
    (top / "usr/bin/data").write_bytes(b"")
    (top / "usr/bin/data").chmod(0o644)
    (top / "usr/bin/dir").mkdir()


def test_exec_users_are_the_containers(tmp_path: Path) -> None:
    _etc(tmp_path)
    with Root(tmp_path) as root:
        assert inside.find_user(root, "ann", "c") == inside.User(1000, 1000, (10,), "/home/ann")
        assert inside.find_user(root, "1000:wheel", "c") == inside.User(1000, 10, (), "/home/ann")
        assert inside.find_user(root, "4242", "c") == inside.User(4242, 0, (), "/")
        assert inside.find_user(root, "root", "c").home == "/root"
        for spec, error in (("bob", "no user 'bob'"), ("ann:staff", "no group 'staff'")):
            with pytest.raises(inside.ExecRefused, match=error) as caught:
                inside.find_user(root, spec, "c")
            assert caught.value.exit_code == 126


def test_exec_exit_codes_127_and_126(tmp_path: Path) -> None:
    _etc(tmp_path)
    path = "/usr/local/bin:/usr/bin"
    with Root(tmp_path) as root:
        inside.check_command(root, "tool", path, "/", "c")
        inside.check_command(root, "/usr/bin/tool", path, "/", "c")
        inside.check_command(root, "bin/tool", path, "/usr", "c")
        cases = [("nosuch", 127), ("/usr/bin/nosuch", 127), ("data", 126), ("/usr/bin/dir", 126)]
        for command, code in cases:
            with pytest.raises(inside.ExecRefused) as caught:
                inside.check_command(root, command, path, "/", "c")
            assert caught.value.exit_code == code, command


def test_exec_argv_carries_user_groups_and_dir(tmp_path: Path) -> None:
    container = _container(tmp_path, "c1")
    argv = inside.exec_argv(
        container, ["id"], cwd="/tmp", user=inside.User(1000, 1000, (10, 20), "/home/ann")
    )
    assert argv[argv.index("exec") + 1 :] == [
        "--cwd",
        "/tmp",
        "--user",
        "1000:1000",
        "--additional-gids",
        "10,20",
        container.runtime_id,
        "id",
    ]


# -- containers ----------------------------------------------------------------------------


def _container(store: Path, name: str, **changes: Any) -> containers.Container:
    cdir = store / "containers" / name
    cdir.mkdir(parents=True, exist_ok=True)
    fields: dict[str, Any] = {
        "name": name,
        "dir": cdir,
        "runtime": "runc",
        "runtime_id": f"{name}.1234",
        "image": "img:1",
        "image_id": "sha256:" + "0" * 64,
        "created": time.time(),
        "args": ("/lib/systemd/systemd",),
        "stop_signal": 37,
        "network": "none",
    }
    container = containers.Container(**(fields | changes))
    containers._save(container)
    return container


def test_containers_are_found_by_name_or_id_prefix(tmp_path: Path) -> None:
    where = tmp_path / "containers"
    a = _container(tmp_path, "a", id="abc123" + "0" * 58)
    _container(tmp_path, "b", id="abc456" + "0" * 58)
    assert containers.load(where, "a") == a
    assert containers.load(where, "abc1") == a
    with pytest.raises(containers.ContainerNotFound, match="ambiguous"):
        containers.load(where, "abc")
    with pytest.raises(containers.ContainerNotFound, match="no container 'fff'"):
        containers.load(where, "fff")


def test_a_container_recorded_before_ids_gets_one(tmp_path: Path) -> None:
    old = _container(tmp_path, "old")
    doc = json.loads((old.dir / cd.STATE).read_text())
    for key in ("id", "lowerdirs", "ports", "auto_remove", "started"):
        del doc[key]
    (old.dir / cd.STATE).write_text(json.dumps(doc))
    loaded = containers.load(tmp_path / "containers", "old")
    assert len(loaded.id) == 64 and loaded.lowerdirs == ()
    assert containers.load(tmp_path / "containers", loaded.id[:8]).name == "old"
    with pytest.raises(RuntimeFailure, match="made by an older sysbake"):
        containers.start(loaded)


def test_ports_and_inspect_of_a_container(tmp_path: Path) -> None:
    container = _container(
        tmp_path, "web", ports=("127.0.0.1:8080:80/tcp", "[::1]:53:53/udp"), id="f" * 64
    )
    assert containers.describe_port(container.ports[0]) == "127.0.0.1:8080->80/tcp"
    cd.write_exit(container.dir, 137 << 8)  # exited with code 137
    shown = runtime.inspect_container(container)
    assert shown["Id"] == "f" * 64 and shown["Name"] == "web"
    assert shown["State"]["Status"] == "exited" and shown["State"]["ExitCode"] == 137
    assert shown["Config"]["StopSignal"] == "SIGRTMIN+3"
    assert shown["NetworkSettings"]["Ports"] == {
        "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}],
        "53/udp": [{"HostIp": "::1", "HostPort": "53"}],
    }


def _main(store: Path, *argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["--store", str(store), *argv])
    return code, capsys.readouterr().out


def test_ps_quiet_format_and_inspect_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _container(tmp_path, "one", id="1" * 64, ports=("127.0.0.1:8080:80/tcp",))
    cd.write_exit(tmp_path / "containers/one", 0)
    assert _main(tmp_path, "ps", "-a", "-q", capsys=capsys) == (0, "1" * 12 + "\n")
    code, out = _main(tmp_path, "ps", "-a", "--format", "{{.Names}} {{.Ports}}", capsys=capsys)
    assert (code, out) == (0, "one 127.0.0.1:8080->80/tcp\n")
    _, out = _main(tmp_path, "ps", "-a", "--format", "json", capsys=capsys)
    row = json.loads(out)
    assert row["ID"] == "1" * 64 and row["State"] == "exited"
    assert row["Status"].startswith("Exited (0) ")
    _, out = _main(tmp_path, "ps", "-a", capsys=capsys)
    assert out.split("\n")[1].split()[0] == "1" * 12 and " Exited (0) " in out
    _, out = _main(tmp_path, "inspect", "--format", "{{.State.Status}}", "one", capsys=capsys)
    assert out == "exited\n"
    assert cli.main(["--store", str(tmp_path), "ps", "--format", "{{.Bogus}}"]) == 0  # no rows
    assert cli.main(["--store", str(tmp_path), "ps", "-a", "--format", "{{.Bogus}}"]) == 2


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["kill", "-s", "SIGFOO", "x"], "--signal SIGFOO: expected a signal name"),
        (["stop", "-s", "99", "x"], "--signal 99: expected a signal name"),
    ],
)
def test_signals_are_parsed_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], error: str
) -> None:
    _container(tmp_path, "x")
    assert cli.main(["--store", str(tmp_path), *argv]) == 1
    assert error in capsys.readouterr().err


# -- build -t / -f ---------------------------------------------------------------------------

PROJECT = """\
[images.base.bootstrap]
distro = "debian"
suite = "bookworm"
mirror = "http://deb.example.invalid/debian"

[images.web]
from = "base"

[images.other]
from = "base"
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "p").mkdir()
    (tmp_path / "p/web.toml").write_text(PROJECT)
    return tmp_path / "p/web.toml"


def test_build_tags(project: Path) -> None:
    loaded = load_project(project)
    # A -t naming an image of the project builds it (what -t meant before: --target).
    assert build._tags(loaded, [], ["base"]) == (["base"], [("base", "base")])
    assert build._tags(loaded, [], ["base", "web:latest"]) == (
        ["base", "web"],
        [("base", "base"), ("web:latest", "web")],
    )
    # Any other -t tags the target, else the file's last image.
    assert build._tags(loaded, ["web"], ["reg/web:1.0"]) == (["web"], [("reg/web:1.0", "web")])
    assert build._tags(loaded, [], ["mine:2"]) == ([], [("mine:2", "other")])
    with pytest.raises(ConfigError, match="several targets"):
        build._tags(loaded, ["web", "other"], ["mine:2"])
    with pytest.raises(ConfigError, match="-t Bad:Name"):
        build._tags(loaded, [], ["Bad:Name"])


def test_build_file_option(project: Path, tmp_path: Path) -> None:
    assert build._project_file(None, project) == project
    assert build._project_file(project.parent, project) == project
    assert build._project_file(project.parent, None) == project.parent
    with pytest.raises(ConfigError, match="PATH is the project file's directory"):
        build._project_file(tmp_path, project)
    parser = cli.build_parser(["build"])
    args = parser.parse_args(["build", "-f", str(project), "-t", "a:1", "--target", "web"])
    assert (args.file, args.tag, args.target) == (project, ["a:1"], ["web"])
    with pytest.raises(SystemExit):
        parser.parse_args(["build", "-T", "web"])


# -- help, completion, man --------------------------------------------------------------------


def test_top_help_groups_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for title, names in cli.command_groups():
        assert f"\n{title}:\n" in out
        section = out.split(f"\n{title}:\n", 1)[1].split("\n\n", 1)[0]
        assert [line.split()[0] for line in section.splitlines() if line[2:3] != " "] == list(names)


@pytest.fixture(scope="module")
def described() -> help_cmd.Command:
    return help_cmd.describe(cli.build_parser())


def test_the_parsers_are_described_whole(described: help_cmd.Command) -> None:
    assert {c.name for c in described.commands} == {n for names in COMMANDS.values() for n in names}
    run = next(c for c in described.commands if c.name == "run")
    assert ("-p", "--publish") in [o.flags for o in run.options]
    assert [p.kind for p in run.positionals] == ["image", "any"]
    kinds = {c.name: [p.kind for p in c.positionals] for c in described.commands}
    assert kinds["exec"][0] == "container" and kinds["inspect"] == ["container|image"]
    assert kinds["completion"] == ["any"]
    cache = next(c for c in described.commands if c.name == "cache")
    assert {c.name for c in cache.commands} == {"ls", "prune"}


@pytest.mark.parametrize("shell", help_cmd.SHELLS)
def test_completion_scripts_parse_in_their_shells(
    shell: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for name in ("build", "run", "exec", "cp", "history", "completion"):
        assert name in script
    program = shutil.which(shell)
    if program is None:
        pytest.skip(f"{shell} is not installed")
    (tmp_path / "script").write_text(script)
    checked = subprocess.run([program, "-n", str(tmp_path / "script")], capture_output=True)
    assert checked.returncode == 0, checked.stderr.decode()


def _bash_complete(script: Path, line: str, bin_dir: Path) -> list[str]:
    """What bash completes for `line`, with `bin_dir` first on PATH."""
    words = line.split(" ")
    program = f"""
source {script}
COMP_WORDS=({" ".join(repr(w) for w in words)})
COMP_CWORD={len(words) - 1}
_sysbake
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, env=env)
    return done.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completes_commands_options_and_values(
    tmp_path: Path, described: help_cmd.Command
) -> None:
    script = tmp_path / "sysbake.bash"
    script.write_text(help_cmd.bash_script(described))
    bin_dir = tmp_path / "bin"  # a stand-in sysbake that lists one image and one container
    bin_dir.mkdir()
    (bin_dir / "sysbake").write_text(
        '#!/bin/sh\ncase "$1" in images) echo img:1;; ps) echo ctr;; esac\n'
    )
    (bin_dir / "sysbake").chmod(0o755)
    assert _bash_complete(script, "sysbake run ", bin_dir) == ["img:1"]
    assert _bash_complete(script, "sysbake run --name x -p 80 ", bin_dir) == ["img:1"]
    assert _bash_complete(script, "sysbake run -t img:1 ", bin_dir) == []  # COMMAND: anything
    assert _bash_complete(script, "sysbake exec -u bob ", bin_dir) == ["ctr"]
    assert _bash_complete(script, "sysbake inspect ", bin_dir) == ["ctr", "img:1"]
    assert _bash_complete(script, "sysbake rm -f ", bin_dir) == ["ctr"]
    assert _bash_complete(script, "sysbake build --target ", bin_dir) == []
    assert "history" in _bash_complete(script, "sysbake hi", bin_dir)
    assert _bash_complete(script, "sysbake run --pu", bin_dir) == ["--publish"]
    assert sorted(_bash_complete(script, "sysbake completion ", bin_dir)) == ["bash", "fish", "zsh"]
    assert _bash_complete(script, "sysbake export x --format oci-", bin_dir) == ["oci-archive"]
    assert _bash_complete(script, "sysbake cache p", bin_dir) == ["prune"]
    assert _bash_complete(script, "sysbake --store /s cache ls --a", bin_dir) == []


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes_commands_and_values(tmp_path: Path, described: help_cmd.Command) -> None:
    script = tmp_path / "sysbake.fish"
    script.write_text(help_cmd.fish_script(described))

    def complete(line: str) -> list[str]:
        program = f"source {script}; complete -C '{line}'"
        done = subprocess.run(["fish", "-c", program], capture_output=True, text=True)
        return [row.split("\t")[0] for row in done.stdout.splitlines()]

    assert "history" in complete("sysbake hi")
    assert complete("sysbake completion ") == ["bash", "fish", "zsh"]
    assert complete("sysbake export x --format oci-") == ["oci-archive"]
    assert complete("sysbake cache ") == ["ls", "prune"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_defines_a_function_per_command(tmp_path: Path, described: help_cmd.Command) -> None:
    script = tmp_path / "_sysbake"
    script.write_text(help_cmd.zsh_script(described))
    names = ["_sysbake", "_sysbake_run", "_sysbake_cache", "_sysbake_cache_prune"]
    program = (
        f"autoload -Uz compinit && compinit -u -D; source {script}; whence -w {' '.join(names)}"
    )
    done = subprocess.run(["zsh", "-f", "-c", program], capture_output=True, text=True)
    assert [line.split(": ")[1] for line in done.stdout.splitlines()] == ["function"] * 4


def test_man_pages(tmp_path: Path, described: help_cmd.Command) -> None:
    assert cli.main(["man", str(tmp_path / "man1")]) == 0
    pages = sorted(p.name for p in (tmp_path / "man1").iterdir())
    assert "sysbake.1" in pages and "sysbake-run.1" in pages and "sysbake-cache-prune.1" in pages
    assert len(pages) == 1 + len(list(described.walk()))
    run = (tmp_path / "man1/sysbake-run.1").read_text()
    assert run.startswith('.TH SYSBAKE-RUN 1 ""')
    assert "\\fB\\-p\\fR, \\fB\\-\\-publish\\fR \\fI[IP:][HOST:]PORT[/udp]\\fR" in run
    top = (tmp_path / "man1/sysbake.1").read_text()
    assert ".SS Containers" in top and "\\fBsysbake\\-run\\fR(1)" in top
    for page in (tmp_path / "man1").iterdir():  # no line a roff request by accident
        for line in page.read_text().splitlines():
            assert not line.startswith(".") or line.split()[0] in _REQUESTS, (page, line)
    groff = shutil.which("groff")
    if groff is not None:
        checked = subprocess.run(
            [groff, "-man", "-Tutf8", "-ww", "-z", str(tmp_path / "man1/sysbake-run.1")],
            capture_output=True,
        )
        assert checked.returncode == 0 and not checked.stderr, checked.stderr


_REQUESTS = {".TH", ".SH", ".SS", ".TP", ".B", ".I", ".nf", ".fi"}


@contextlib.contextmanager
def _columns(width: str) -> Iterator[None]:
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = width
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def test_generated_text_does_not_depend_on_the_terminal(described: help_cmd.Command) -> None:
    with _columns("40"):
        narrow = help_cmd.describe(cli.build_parser())
    assert narrow == described

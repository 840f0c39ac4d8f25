"""docker/podman habits, for real (issue 14 part 2): `build -t/-f`, `run -p` serving a page
on the host's loopback, `start`/`restart`, `cp` both ways (a hostile symlink in the
container pointing at a host path included), `exec` exit codes 127/126 and -u/-w,
`history` and `diff`, `run --rm`, `kill -s` by name.

The image is the run's example base (the `base_image` fixture) with one `files` step: a
tiny HTTP server in perl (the base has perl) enabled as a systemd unit on port 80.
Containers and images are named hhab-*."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import sysbake

PORT = 18080
PAGE = "served by sysbake through -p\n"
HTTPD = """\
#!/usr/bin/perl
# Answers every request with the file named by its second argument.
use strict; use warnings; use IO::Socket::INET;
my $server = IO::Socket::INET->new(LocalPort => $ARGV[0], Listen => 16, ReuseAddr => 1)
    or die "listen: $!";
while (my $client = $server->accept) {
    while (my $line = <$client>) { last if $line =~ /^\\r?\\n$/; }
    open(my $fh, '<', $ARGV[1]) or die "open: $!";
    local $/; my $body = <$fh>; close $fh;
    print $client "HTTP/1.0 200 OK\\r\\nContent-Length: " . length($body) . "\\r\\n\\r\\n$body";
    close $client;
}
"""
UNIT = """\
[Unit]
Description=hhab test page on port 80
[Service]
ExecStart=/usr/local/bin/hhab-httpd 80 /srv/page.txt
[Install]
WantedBy=multi-user.target
"""
PROJECT = """\
[images.hhab-web]
from = "base:latest"

[[images.hhab-web.provision]]
type = "files"
name = "site"
source = "root"
dest = "/"
"""


@pytest.fixture(scope="module")
def web(shared_store: Path, base_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """hhab-web:1.0, built with -f (a file not named sysbake.toml) and -t."""
    project = tmp_path_factory.mktemp("hhab-project")
    root = project / "root"
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "srv").mkdir()
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (root / "usr/local/bin/hhab-httpd").write_text(HTTPD)
    (root / "usr/local/bin/hhab-httpd").chmod(0o755)
    (root / "srv/page.txt").write_text(PAGE)
    (root / "etc/systemd/system/hhab-httpd.service").write_text(UNIT)
    (wants / "hhab-httpd.service").symlink_to("../hhab-httpd.service")
    (project / "web.toml").write_text(PROJECT)
    built = sysbake(
        "build", "--json", "-f", project / "web.toml", "-t", "hhab-web:1.0", store=shared_store
    )
    assert json.loads(built.stdout)["tags"] == ["hhab-web:1.0"]
    return "hhab-web:1.0"


@pytest.fixture
def names(shared_store: Path) -> Iterator[list[str]]:
    """Container names a test uses: removed afterwards, whatever happened."""
    used: list[str] = []
    yield used
    for name in used:
        sysbake("rm", "-f", name, store=shared_store, check=False)


def _get(port: int, timeout: float = 90.0) -> str:
    """The page on the host's 127.0.0.1:`port`, once the service inside answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as reply:
                return str(reply.read().decode())
        except (OSError, urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _refused(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _leftovers(store: Path, name: str) -> list[str]:
    mounts = Path("/proc/self/mountinfo").read_text()
    return [line for line in mounts.splitlines() if f"/containers/{name}/" in line]


def test_build_tags_with_t_and_reads_f(shared_store: Path, web: str) -> None:
    rows = sysbake("images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}", store=shared_store)
    ids = dict(line.split() for line in rows.stdout.splitlines())
    assert ids["hhab-web:1.0"] == ids["hhab-web:latest"]
    assert sysbake("images", "-q", store=shared_store).stdout.split().count(ids[web]) == 2
    wrong = sysbake("build", "-f", "/nonexistent/web.toml", store=shared_store, check=False)
    assert wrong.returncode == 2 and "no such file or directory" in wrong.stderr


def test_run_p_serves_the_page_on_the_host(shared_store: Path, web: str, names: list[str]) -> None:
    names += ["hhab-pub", "hhab-clash"]
    assert _refused(PORT)
    sysbake(
        "run", "-d", "--name", "hhab-pub", "-p", f"127.0.0.1:{PORT}:80", web, store=shared_store
    )
    assert _get(PORT) == PAGE
    ps = sysbake("ps", "--format", "{{.Names}}|{{.Ports}}|{{.Status}}", store=shared_store)
    row = next(line for line in ps.stdout.splitlines() if line.startswith("hhab-pub|"))
    assert row.split("|")[1] == f"127.0.0.1:{PORT}->80/tcp"
    assert row.split("|")[2].startswith("Up ")
    inspected = json.loads(sysbake("inspect", "hhab-pub", store=shared_store).stdout)
    assert inspected["NetworkSettings"]["Ports"] == {
        "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(PORT)}]
    }
    # The port is taken: a second container is refused before it starts, with nothing left.
    clash = sysbake(
        "run", "-d", "--name", "hhab-clash", "-p", f"127.0.0.1:{PORT}:80", web,
        store=shared_store, check=False,
    )  # fmt: skip
    assert clash.returncode == 1
    assert f"cannot listen on 127.0.0.1:{PORT}/tcp" in clash.stderr
    assert not (shared_store / "containers/hhab-clash").exists()

    sysbake("stop", "hhab-pub", store=shared_store)
    assert _refused(PORT)  # the forwarder is gone with it
    exited = sysbake("ps", "-a", "--format", "{{.Names}} {{.Status}}", store=shared_store)
    assert "hhab-pub Exited (0) " in exited.stdout
    assert _leftovers(shared_store, "hhab-pub") == []

    sysbake("start", "hhab-pub", store=shared_store)  # its port published again
    assert _get(PORT) == PAGE
    sysbake("restart", "hhab-pub", store=shared_store)
    assert _get(PORT) == PAGE
    sysbake("rm", "-f", "hhab-pub", store=shared_store)
    assert _refused(PORT) and _leftovers(shared_store, "hhab-pub") == []
    with socket.socket() as again:  # free for anyone
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", PORT))


def test_cp_both_ways_never_through_a_hostile_symlink(
    shared_store: Path, base_image: str, names: list[str], tmp_path: Path
) -> None:
    """The container holds /evil -> HOST (an absolute path of a host directory) and a
    symlink to a host secret: what cp reads or writes through them is the container's."""
    names.append("hhab-cp")
    # Not under /tmp: the container's /tmp is a tmpfs, gone once it stops, and the stopped
    # container's copy below reads through /evil to the directory of this host path.
    host = Path(tempfile.mkdtemp(prefix="hhab-cp-", dir="/var/tmp"))
    try:
        _cp_both_ways(shared_store, base_image, host, tmp_path)
    finally:
        shutil.rmtree(host)


def _cp_both_ways(shared_store: Path, base_image: str, host: Path, tmp_path: Path) -> None:
    (host / "secret").write_text("host secret\n")
    before = sorted(os.listdir(host))
    sysbake("run", "-d", "--name", "hhab-cp", base_image, store=shared_store)

    def inside(*command: str) -> subprocess.CompletedProcess[str]:
        return sysbake("exec", "hhab-cp", *command, store=shared_store, check=False)

    script = f"mkdir -p {host} /data && echo container > {host}/secret && ln -s {host} /evil"
    script += f" && ln -s {host}/secret /data/link"
    assert inside("sh", "-c", script).returncode == 0
    mine = tmp_path / "mine.txt"
    mine.write_text("from the host\n")
    # In: through /evil, into the container's own directory of that name.
    sysbake("cp", mine, "hhab-cp:/evil/", store=shared_store)
    assert inside("cat", f"{host}/mine.txt").stdout == "from the host\n"
    sysbake("cp", mine, "hhab-cp:/tmp/x", store=shared_store)  # the container's tmpfs
    assert inside("cat", "/tmp/x").stdout == "from the host\n"
    # Out: through /evil reads the container's file; a symlink comes out as a symlink.
    out = tmp_path / "out"
    out.mkdir()
    sysbake("cp", "hhab-cp:/evil/secret", out / "via-evil", store=shared_store)
    assert (out / "via-evil").read_text() == "container\n"
    sysbake("cp", "hhab-cp:/data", out, store=shared_store)
    assert os.readlink(out / "data/link") == f"{host}/secret"
    followed = sysbake("cp", "-L", "hhab-cp:/data/link", out / "f", store=shared_store)
    assert (out / "f").read_text() == "container\n" and followed.returncode == 0
    assert sorted(os.listdir(host)) == before
    assert (host / "secret").read_text() == "host secret\n"
    # A stopped container: its files, without it running.
    sysbake("stop", "hhab-cp", store=shared_store)
    sysbake("cp", "hhab-cp:/evil/mine.txt", out / "after", store=shared_store)
    assert (out / "after").read_text() == "from the host\n"
    assert _leftovers(shared_store, "hhab-cp") == []
    missing = sysbake("cp", "hhab-cp:/nope", out, store=shared_store, check=False)
    assert missing.returncode == 1
    assert (
        missing.stderr.strip()
        == "sysbake: error: /nope: no such file or directory in the container"
    )


def test_exec_exit_codes_user_and_workdir(
    shared_store: Path, base_image: str, names: list[str]
) -> None:
    names.append("hhab-exec")
    sysbake("run", "-d", "--name", "hhab-exec", base_image, store=shared_store)
    missing = sysbake("exec", "hhab-exec", "no-such-command", store=shared_store, check=False)
    assert missing.returncode == 127
    assert "no-such-command: command not found in the container's PATH" in missing.stderr
    not_executable = sysbake("exec", "hhab-exec", "/etc/passwd", store=shared_store, check=False)
    assert not_executable.returncode == 126 and "permission denied" in not_executable.stderr
    assert (
        sysbake(
            "exec", "hhab-exec", "sh", "-c", "exit 7", store=shared_store, check=False
        ).returncode
        == 7
    )
    who = sysbake(
        "exec", "-u", "nobody", "-w", "/tmp", "hhab-exec", "sh", "-c", 'id -un; pwd; echo "$HOME"',
        store=shared_store,
    )  # fmt: skip
    assert who.stdout.split() == ["nobody", "/tmp", "/nonexistent"]
    nobody = sysbake(
        "exec", "-u", "nosuchuser", "hhab-exec", "true", store=shared_store, check=False
    )
    assert nobody.returncode == 126 and "no user 'nosuchuser'" in nobody.stderr


def test_history_and_diff(shared_store: Path, web: str, names: list[str]) -> None:
    history = sysbake("history", "--format", "{{.ID}}|{{.CreatedBy}}", web, store=shared_store)
    rows = [line.split("|") for line in history.stdout.splitlines()]
    image_id = sysbake("inspect", "-f", "{{.Id}}", web, store=shared_store).stdout.strip()
    assert rows[0][0] == image_id.removeprefix("sha256:")[:12] and "files site" in rows[0][1]
    assert len(rows) >= 2 and all(row[0] == "<missing>" for row in rows[1:])
    diff = sysbake("diff", web, store=shared_store).stdout.splitlines()
    for line in ("A /srv/page.txt", "A /usr/local/bin/hhab-httpd", "C /usr/local/bin"):
        assert line in diff
    names.append("hhab-diff")
    sysbake("run", "-d", "--name", "hhab-diff", web, store=shared_store)
    sysbake(
        "exec", "hhab-diff", "sh", "-c", "echo x > /etc/hhab-new; rm /etc/issue", store=shared_store
    )
    changed = sysbake("diff", "hhab-diff", store=shared_store).stdout.splitlines()
    assert "A /etc/hhab-new" in changed and "D /etc/issue" in changed and "C /etc" in changed


def test_rm_kill_and_interactive_runs(shared_store: Path, web: str, names: list[str]) -> None:
    names += ["hhab-rm", "hhab-kill", "hhab-it"]
    sysbake("run", "-d", "--rm", "--name", "hhab-rm", web, store=shared_store)
    stopped = sysbake("stop", "hhab-rm", store=shared_store)
    assert "removed" in stopped.stdout and "stopping hhab-rm (SIGRTMIN+3)" in stopped.stderr
    assert not (shared_store / "containers/hhab-rm").exists()

    sysbake("run", "-d", "--name", "hhab-kill", web, store=shared_store)
    sysbake("kill", "-s", "RTMIN+3", "hhab-kill", store=shared_store)  # systemd's own stop
    deadline = time.monotonic() + 120
    while (
        "exited"
        not in sysbake("inspect", "-f", "{{.State.Status}}", "hhab-kill", store=shared_store).stdout
    ):
        assert time.monotonic() < deadline, "SIGRTMIN+3 did not stop systemd"
        time.sleep(0.5)

    ran = sysbake(
        "run", "-i", "--name", "hhab-it", web, "sh", "-c", "cat /srv/page.txt; exit 3",
        store=shared_store, check=False, input="",
    )  # fmt: skip
    assert ran.returncode == 3 and ran.stdout == PAGE
    assert not (shared_store / "containers/hhab-it").exists()

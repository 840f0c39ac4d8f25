"""Live progress as a user sees it: `build` (a real bootstrap, from the shared .deb cache)
and `export --format rootfs` run on a pseudo-terminal (tmux), where a status line changes
in place; the same commands piped print plain lines with no escape code, and with --json
or `-o -` nothing of the progress reaches stdout."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import SYSBAKE, new_store, sysbake

pytestmark = pytest.mark.integration

PROJECT = """\
[images.hnet-tty.bootstrap]
distro = "debian"
suite = "bookworm"
variant = "minbase"
packages = ["procps", "iproute2"]
"""
IMAGE = "hnet-tty:latest"
# The status lines (see sysbake.progress), not the summary lines printed when work ends.
BOOTSTRAP_STATUS = re.compile(r"packages: \d+ fetched, \d+/\d+ unpacked, \d+/\d+ configured")
BOOTSTRAP_SUMMARY = re.compile(r"\d+ packages: \d+ fetched, \d+ from the \.deb cache")
EXPORT_STATUS = re.compile(r"compressing \(xz\): [\d.]+[kMG]?B of [\d.]+[kMG]?B \(\d+%\)")
ESCAPE = re.compile(r"[\x1b\r]")


class Terminal:
    """A tmux server of this test's own (its socket under the test's temp dir), running
    one command at a time in a 160x50 pane."""

    def __init__(self, root: Path) -> None:
        self.socket = root / "tmux.sock"
        self.done = root / "done"
        self.started = False

    def tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-S", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return result.stdout

    def run(self, argv: list[str]) -> None:
        """Start `argv` in the pane; its exit code lands in `done` when it ends."""
        self.done.unlink(missing_ok=True)
        line = f"{shlex.join(argv)}; echo $? > {shlex.quote(str(self.done))}; sleep 3600"
        if self.started:
            self.tmux("kill-session", "-t", "hnet")
        self.tmux("new-session", "-d", "-s", "hnet", "-x", "160", "-y", "50", line)
        self.started = True

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "hnet")

    def watch(self, status: re.Pattern[str], timeout: float = 900) -> tuple[set[str], str]:
        """The distinct `status` lines seen on the screen while the command ran, and the
        screen once it ended (its exit code checked)."""
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while not self.done.exists():
            assert time.monotonic() < deadline, f"still running:\n{self.screen()}"
            seen.update(m.group(0) for m in status.finditer(self.screen()))
            time.sleep(0.2)
        final = self.screen()
        assert self.done.read_text().strip() == "0", final
        return seen, final


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux missing: install the Debian package 'tmux' (deps/apt.txt)")
    term = Terminal(tmp_path)
    try:
        yield term
    finally:
        if term.started:
            subprocess.run(
                ["tmux", "-S", str(term.socket), "kill-server"], capture_output=True, timeout=30
            )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    (path / "sysbake.toml").write_text(PROJECT)
    return path


def test_build_and_export_show_a_live_status_line_on_a_terminal(
    tmp_path: Path, terminal: Terminal, project: Path
) -> None:
    store = new_store(tmp_path / "store")
    cli = [*SYSBAKE, "--store", str(store)]

    terminal.run([*cli, "build", "-t", IMAGE, str(project)])
    seen, final = terminal.watch(BOOTSTRAP_STATUS)
    assert len(seen) >= 2, f"the status line never changed: {seen}\n{final}"
    assert BOOTSTRAP_SUMMARY.search(final), final
    assert not BOOTSTRAP_STATUS.search(final), f"a status line was left behind:\n{final}"

    out = tmp_path / "rootfs.tar.xz"
    terminal.run([*cli, "export", "--format", "rootfs", "-o", str(out), IMAGE])
    seen, final = terminal.watch(EXPORT_STATUS)
    assert len(seen) >= 2, f"the status line never changed: {seen}\n{final}"
    assert not EXPORT_STATUS.search(final), f"a status line was left behind:\n{final}"
    subprocess.run(["xz", "-t", str(out)], check=True, timeout=300)

    # Piped: plain lines, no escape code; the same summary.
    built = sysbake("build", "--no-cache", "-t", IMAGE, project, store=store)
    assert not ESCAPE.search(built.stderr + built.stdout), built.stderr[-2000:]
    assert BOOTSTRAP_SUMMARY.search(built.stderr), built.stderr[-2000:]
    piped = tmp_path / "piped.tar.zst"  # zstd: quicker than xz, and the same path
    exported = sysbake("export", "--format", "rootfs", "-o", piped, IMAGE, store=store)
    assert not ESCAPE.search(exported.stderr + exported.stdout), exported.stderr[-2000:]

    # --json: stdout is the result alone; stdout as the archive: the archive alone.
    result = sysbake("--json", "build", "-t", IMAGE, project, store=store)
    assert json.loads(result.stdout)["images"][0]["name"] == "hnet-tty"
    assert not BOOTSTRAP_STATUS.search(result.stderr)
    streamed = tmp_path / "stdout.tar.zst"
    with open(streamed, "wb") as sink:
        export = [*cli, "export", "--format", "rootfs", "--compression", "zstd", "-o", "-"]
        done = subprocess.run(
            [*export, IMAGE], stdout=sink, stderr=subprocess.PIPE, timeout=900, check=True
        )
    assert not ESCAPE.search(done.stderr.decode(errors="replace"))
    assert streamed.read_bytes() == piped.read_bytes()  # the archive, and nothing else
    assert os.path.getsize(piped) > 1 << 20

"""Live progress (sysbake.progress): where it shows (terminal, plain lines, nowhere), how
the status line and log lines share a terminal, and the readers of mmdebstrap's, pip's and
Salt's output that feed it. Time is a fake clock here: nothing waits or measures."""

from __future__ import annotations

import io
import os
import re
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from sysbake import log, proc, progress
from sysbake.errors import CommandError

ESC = "\x1b"
ERASE = "\r\x1b[K"


class FakeTerminal(io.StringIO):
    """stderr as a terminal 80 columns wide."""

    def isatty(self) -> bool:
        return True


class Clock:
    """progress's time.monotonic, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def clean_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    monkeypatch.setattr(progress, "_columns", lambda: 80)
    monkeypatch.setenv("TERM", "xterm")
    log.configure()
    yield clock
    log.configure()
    log._live[0] = ""
    progress._shown.clear()
    progress._transfers.clear()


def use_stderr(monkeypatch: pytest.MonkeyPatch, stream: io.StringIO) -> None:
    """`stream` as the stderr of sysbake.log and sysbake.progress (their `sys` module:
    pytest puts its own sys.stderr back when a test starts)."""
    fake_sys = types.SimpleNamespace(stderr=stream)
    monkeypatch.setattr(log, "sys", fake_sys)
    monkeypatch.setattr(progress, "sys", fake_sys)


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> FakeTerminal:
    term = FakeTerminal()
    use_stderr(monkeypatch, term)
    return term


@pytest.fixture
def pipe(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    out = io.StringIO()
    use_stderr(monkeypatch, out)
    return out


def screen(raw: str) -> list[str]:
    """What a terminal shows for `raw`: each line as last rewritten ("\\r" and "erase
    to the end of the line" applied)."""
    lines = [""]
    for part in re.split(r"(\r\x1b\[K|\n)", raw):
        if part == "\n":
            lines.append("")
        elif part == ERASE:
            lines[-1] = ""
        else:
            lines[-1] += part
    return lines


# -- where it shows ---------------------------------------------------------------------------


def test_the_mode_follows_stderr_and_the_quiet_flag(
    monkeypatch: pytest.MonkeyPatch, terminal: FakeTerminal
) -> None:
    assert progress.mode() == "tty"
    monkeypatch.setenv("TERM", "dumb")
    assert progress.mode() == "plain"
    monkeypatch.setenv("TERM", "xterm")
    log.configure(quiet=True)  # -q, or --json without --debug
    assert progress.mode() == "off"
    log.configure()
    use_stderr(monkeypatch, io.StringIO())
    assert progress.mode() == "plain"


def test_a_terminal_sees_one_line_rewritten_in_place(
    terminal: FakeTerminal, clean_state: Clock
) -> None:
    with progress.Status() as status:
        status.update("step 1")
        clean_state.now += 0.05
        status.update("step 2")  # too soon: not drawn
        clean_state.now += 0.1
        status.update("step 3")
        log.info("==> a log line meanwhile")
        clean_state.now += 0.1
        status.update("step 4")
    raw = terminal.getvalue()
    assert "step 2" not in raw
    assert raw.count(ERASE) >= 4
    # The log line went above the status line, which came back below it, then was erased.
    assert screen(raw) == ["==> a log line meanwhile", ""]
    assert "    step 3" in raw.split("==> a log line meanwhile")[1]


def test_a_status_line_never_wraps(terminal: FakeTerminal) -> None:
    with progress.Status() as status:
        status.update("x" * 200)
    drawn = [part for part in terminal.getvalue().split(ERASE) if part]
    assert drawn and all(len(part) <= 79 for part in drawn)
    assert drawn[0].endswith("…")


def test_piped_output_gets_plain_lines_now_and_then_without_escape_codes(
    pipe: io.StringIO, clean_state: Clock
) -> None:
    with progress.Status() as status:
        status.update("early")  # short work prints no status at all
        clean_state.now += progress.PLAIN_EVERY
        status.update("later")
        clean_state.now += 1
        status.update("too soon")
        status.close("finished")
    out = pipe.getvalue()
    assert out == "    later\n    finished\n"
    assert ESC not in out and "\r" not in out


def test_quiet_shows_nothing(pipe: io.StringIO, clean_state: Clock) -> None:
    log.configure(quiet=True)
    with progress.Meter("compressing (xz)", 100) as meter:
        clean_state.now += 60
        meter.add(50)
    status = progress.Status()
    status.update("x", force=True)
    status.close("done")
    assert pipe.getvalue() == ""


def test_an_inner_status_hides_the_outer_one_until_it_ends(
    terminal: FakeTerminal, clean_state: Clock
) -> None:
    with progress.Status() as outer:
        outer.update("outer")
        with progress.Status() as inner:
            clean_state.now += 1
            inner.update("inner")
            clean_state.now += 1
            outer.update("outer again")  # not drawn over the inner one
        assert screen(terminal.getvalue())[-1] == "    outer again"
    assert screen(terminal.getvalue()) == [""]
    assert "outer again" not in terminal.getvalue().split("inner")[1].split(ERASE)[0]


# -- bytes --------------------------------------------------------------------------------------


def test_meters_count_bytes_through_readers_and_writers(terminal: FakeTerminal) -> None:
    meter = progress.Meter("compressing (xz)", 4000)
    sink = io.BytesIO()
    with meter:
        meter.writer(sink).write(b"a" * 1000)
        assert meter.reader(io.BytesIO(b"b" * 500)).read() == b"b" * 500
    assert meter.done == 1500
    assert meter.text() == "compressing (xz): 1.5kB of 4.0kB (37%)"
    assert sink.getvalue() == b"a" * 1000
    assert "compressing (xz): 1.0kB of 4.0kB (25%)" in terminal.getvalue()
    assert progress.Meter("writing", None).text() == "writing: 0B"


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0B"), (999, "999B"), (1000, "1.0kB"), (12_345_678, "12.3MB"), (5 * 10**12, "5000.0GB")],
)
def test_sizes_read_as_docker_prints_them(n: int, text: str) -> None:
    assert progress.size(n) == text


def test_percent_stays_within_0_and_100() -> None:
    assert progress.percent(5, 10) == 50
    assert progress.percent(20, 10) == 100
    assert progress.percent(0, 0) == 100


def test_tree_bytes_counts_the_tree_without_following_links(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "a").write_bytes(b"x" * 1000)
    big = tmp_path / "outside"
    big.write_bytes(b"y" * 100_000)
    (tree / "escape").symlink_to(big)  # a link out of the tree: a header, never its target
    (tree / "dir-link").symlink_to("/")
    os.mkfifo(tree / "fifo")
    # Four headers, one file of two blocks, the end of archive.
    assert progress.tree_bytes(tree) == 1024 + 5 * 512 + 1024


def test_a_shared_file_offset_meters_another_readers_progress(
    terminal: FakeTerminal, tmp_path: Path
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"z" * 10_000)
    meter = progress.Meter("compressing (xz)", 10_000)
    with open(path, "rb") as f, meter:
        with progress.file_position(meter, f.fileno(), every=0.01):
            os.lseek(f.fileno(), 6000, os.SEEK_SET)  # as the decompressor reading it would
        assert meter.done == 6000


# -- pushes and pulls ---------------------------------------------------------------------------


class Desc:
    def __init__(self, digest: str, size: int) -> None:
        self.digest, self.size = digest, size


def test_blobs_report_their_bytes_and_those_of_the_whole_transfer(
    terminal: FakeTerminal, clean_state: Clock
) -> None:
    blobs = [Desc("sha256:" + c * 64, size) for c, size in (("a", 1000), ("b", 3000), ("c", 6000))]
    with progress.transfer("pushing", blobs):
        # The first blob was already there: only the second and third move.
        second = progress.Blob("pushing", blobs[1])
        clean_state.now += 1
        second.add(1500)
        assert screen(terminal.getvalue())[-1] == (
            "    pushing 2/3 bbbbbbbbbbbb: 1.5kB of 3.0kB (50%) · all: 2.5kB of 10.0kB (25%)"
        )
        second.finish("pushed")
        third = progress.Blob("pushing", blobs[2])
        clean_state.now += 1
        third.done = 3000  # an upload resumed, or started over, sets it back
        assert screen(terminal.getvalue())[-1].endswith("all: 7.0kB of 10.0kB (70%)")
    assert screen(terminal.getvalue())[-2].startswith("    bbbbbbbbbbbb: pushed (3.0kB, ")


def test_a_blob_outside_a_transfer_has_a_status_of_its_own(terminal: FakeTerminal) -> None:
    blob = progress.Blob("pulling", Desc("sha256:" + "d" * 64, 2000))
    blob.status.open()
    blob.add(1000)
    assert screen(terminal.getvalue())[-1] == "    pulling dddddddddddd: 1.0kB of 2.0kB (50%)"
    blob.status.close()


# -- mmdebstrap, apt, dpkg, pip -----------------------------------------------------------------

MMDEBSTRAP = """\
I: chroot architecture amd64 is equal to the host's architecture
I: running apt-get update...
Get:1 http://mirror.invalid/debian bookworm InRelease [151 kB]
Get:4 http://mirror.invalid/debian bookworm/main amd64 Packages [8790 kB]
Fetched 9425 kB in 1s (9263 kB/s)
I: downloading packages with apt...
0 upgraded, 3 newly installed, 0 to remove and 0 not upgraded.
Need to get 1200 kB/2900 kB of archives.
Get:1 http://mirror.invalid/debian bookworm/main amd64 libc6 amd64 2.36-9 [1200 kB]
I: extracting archives...
Get:1 http://mirror.invalid/debian/pool/main/libe/libeatmydata/eatmydata_130-2_all.deb [11.2 kB]
I: installing essential packages...
Unpacking base-files (12.4) ...
Unpacking libc6:amd64 (2.36-9) ...
Setting up base-files (12.4) ...
Unpacking dash (0.5.12-2) ...
Setting up libc6:amd64 (2.36-9) ...
Setting up dash (0.5.12-2) ...
I: installing remaining packages inside the chroot...
0 upgraded, 2 newly installed, 0 to remove and 0 not upgraded.
0 upgraded, 2 newly installed, 0 to remove and 0 not upgraded.
Unpacking systemd (252) ...
Unpacking dbus (1.14) ...
Setting up dbus (1.14) ...
"""


def test_bootstrap_packages_are_counted_from_mmdebstraps_output(
    terminal: FakeTerminal, clean_state: Clock
) -> None:
    with progress.AptWatch() as watch:
        for line in MMDEBSTRAP.splitlines():
            clean_state.now += 1
            watch.line(line)
    assert (watch.fetched, watch.unpacked, watch.configured, watch.total) == (1, 5, 4, 5)
    shown = screen(terminal.getvalue())
    assert shown[-2] == (
        "    5 packages: 1 fetched, 4 from the .deb cache, 5 unpacked, 4 configured"
    )
    assert "packages: 1 fetched, 3/5 unpacked, 3/5 configured (installing remaining" in (
        terminal.getvalue()
    )


def test_a_failed_bootstrap_prints_no_summary(pipe: io.StringIO) -> None:
    with pytest.raises(RuntimeError), progress.AptWatch() as watch:
        watch.line("Unpacking base-files (12.4) ...")
        raise RuntimeError("mmdebstrap failed")
    assert "packages" not in pipe.getvalue()


def test_pip_distributions_are_counted(terminal: FakeTerminal, clean_state: Clock) -> None:
    with progress.PipWatch(4) as watch:
        for line in ("Looking in links: /tmp/w", "Processing /tmp/w/salt.tar.gz", "junk"):
            clean_state.now += 1
            watch.line(line)
        clean_state.now += 1
        watch.line("Processing /tmp/w/pyyaml.whl")
    assert watch.done == 2
    assert "pip: 2/4 distributions processed" in terminal.getvalue()


# -- provision steps ----------------------------------------------------------------------------

_RECORD = "2026-01-01 10:00:00,001 [salt.state       :2431][INFO    ][42] "
SALT_LOG = "".join(
    f"{_RECORD}{message}\n"
    for message in (
        "Running state [ops] at time 10:00:00",
        "Executing state user.present for [ops]",
        "Completed state [ops] at time 10:00:00 (duration_in_ms=48.0)",
        "Running state [/srv/site] at time 10:00:00",
        "Executing state file.directory for [/srv/site]",
    )
)


def test_salt_states_done_come_from_its_log(terminal: FakeTerminal, clean_state: Clock) -> None:
    watch = progress.StepWatch("web: site")
    with watch.status:
        for line in SALT_LOG.splitlines():
            clean_state.now += 1
            watch.line(line)
        assert watch.text() == "salt: 1 states done, running file.directory /srv/site"
        watch.line("[WARNING ] a console record, not the step's own output")
        watch.line(_RECORD + "Loading fresh modules for state activity")
        assert watch.last == ""
    assert watch.summary() == "salt: 1 states done"


def test_a_scripts_last_line_is_its_status(terminal: FakeTerminal, clean_state: Clock) -> None:
    watch = progress.StepWatch("web: hello")
    with watch.status:
        for i in range(3):
            clean_state.now += 1
            watch.line(f"line {i}")
    assert "    | line 2" in terminal.getvalue()
    assert watch.summary() is None


def test_followed_files_feed_the_watch_never_through_a_link(
    terminal: FakeTerminal, tmp_path: Path
) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("the host's secret\n")
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "step.err").symlink_to(secret)  # planted by the image's step
    os.mkfifo(conf / "step.fifo")
    out = conf / "step.out"
    watch = progress.StepWatch("web: hello")
    followed = [out, conf / "step.err", conf / "step.fifo", conf / "salt.log"]
    with watch.follow(followed), open(out, "w") as f:
        f.write("first\nsecond\npart")
    assert watch.last == "second"  # "part" has no newline yet
    with watch.follow([conf / "salt.log"]):
        (conf / "salt.log").write_text(SALT_LOG)
    assert watch.states == 1
    assert "secret" not in terminal.getvalue()
    assert progress.read_appended(str(conf / "step.err"), 0) == b""
    assert progress.read_appended(str(conf / "step.fifo"), 0) == b""
    assert progress.read_appended(str(out), 6) == b"second\npart"


def test_quiet_follows_nothing(pipe: io.StringIO, tmp_path: Path) -> None:
    log.configure(quiet=True)
    watch = progress.StepWatch("web: hello")
    (tmp_path / "step.out").write_text("x\n")
    with watch.follow([tmp_path / "step.out"]):
        pass
    assert watch.last == "" and pipe.getvalue() == ""


# -- lines as they come from a command ----------------------------------------------------------


def test_a_commands_lines_come_as_they_are_written_and_stay_captured_apart() -> None:
    lines: list[str] = []
    result = proc.run(
        ["sh", "-c", "echo one; echo two >&2; printf 'three\\r\\n'; printf tail >&2; exit 3"],
        on_line=lines.append,
        check=False,
    )
    assert sorted(lines) == ["one", "tail", "three", "two"]
    assert lines.index("one") < lines.index("three")
    assert (result.returncode, result.stdout, result.stderr) == (3, b"one\nthree\r\n", b"two\ntail")


def test_a_watched_command_fails_as_any_other() -> None:
    with pytest.raises(CommandError, match=r"failed \(exit 2\): oops"):
        proc.run(["sh", "-c", "echo oops >&2; exit 2"], on_line=lambda _: None)
    with pytest.raises(CommandError, match="command not found"):
        proc.run(["/nonexistent/sysbake-test"], on_line=lambda _: None)

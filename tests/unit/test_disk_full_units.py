"""A full disk is one line naming the path, whoever met it: tar, dpkg or apt in a
bootstrap, a step's script or Salt, the store's own writes, or a write nobody wrapped."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from sysbake import cli
from sysbake.build import bootstrap
from sysbake.errors import StoreError
from sysbake.fsutil import no_space_line, raise_disk, raise_if_no_space

TAR = "tar: ./usr/lib/x86_64-linux-gnu/libc.so.6: Cannot write: No space left on device"
DPKG = (
    "dpkg: error processing archive /var/cache/apt/archives/libc6_2.36_amd64.deb "
    "(--unpack):\n cannot copy extracted data for './usr/bin/ldd' to "
    "'/usr/bin/ldd.dpkg-new': failed to write (No space left on device)"
)
APT = (
    "E: Failed to fetch http://deb.example/pool/main/b/bash_5.2.deb  Write error - "
    "write (28: No space left on device) /var/cache/apt/archives/partial/bash_5.2.deb"
)


@pytest.mark.parametrize(
    ("output", "line"),
    [
        (f"I: extracting\n{TAR}\ntar: Exiting with failure status\nE: mmdebstrap failed", TAR),
        (f"Unpacking libc6\n{DPKG}\nErrors were encountered", DPKG.splitlines()[1].strip()),
        (APT, APT[3:]),
        (
            "OSError: [Errno 28] No space left on device: '/etc/big'",
            "OSError: [Errno 28] No space left on device: '/etc/big'",
        ),
        (
            "dd: error writing '/big': Disk quota exceeded",
            "dd: error writing '/big': Disk quota exceeded",
        ),
        ("E: Unable to locate package nosuchpkg", None),
        ("", None),
    ],
)
def test_the_first_line_that_says_the_disk_is_full(output: str, line: str | None) -> None:
    assert no_space_line(output) == line


def test_a_long_line_is_cut_to_what_leads_to_the_message() -> None:
    comment = "x" * 5000 + " [Errno 28] No space left on device: '/srv/big'" + "y" * 5000
    line = no_space_line('{"local": {"file_|-big": {"comment": "' + comment + '"}}}')
    assert line is not None and len(line) < 300
    assert line.startswith("...") and "No space left on device: '/srv/big'" in line


def test_a_bootstrap_that_fills_the_root_names_it(tmp_path: Path) -> None:
    target, debs = tmp_path / "tmp/bootstrap-1/rootfs", tmp_path / "debs"
    message = bootstrap.failure_message(
        "bookworm", f"I: extracting\n{TAR}\nE: failed", target, debs
    )
    assert message == f"bootstrap bookworm: no space left on device writing {target}: {TAR}"
    assert "\n" not in bootstrap.failure_message("bookworm", DPKG, target, debs)


def test_a_bootstrap_whose_downloads_fill_the_deb_cache_names_the_cache(tmp_path: Path) -> None:
    target, debs = tmp_path / "rootfs", tmp_path / "debs"
    message = bootstrap.failure_message("bookworm", APT, target, debs)
    assert message.startswith(f"bootstrap bookworm: no space left on device writing {debs}:")


def test_other_bootstrap_failures_keep_their_explanation(tmp_path: Path) -> None:
    message = bootstrap.failure_message(
        "bookworm",
        "I: resolving\nE: Unable to locate package nosuchpkg\nE: failed",
        tmp_path / "rootfs",
        tmp_path / "debs",
    )
    assert message == "bootstrap bookworm: Unable to locate package nosuchpkg"


def test_a_step_that_fills_the_disk_says_so_in_one_line() -> None:
    output = f"Setting up x\n{DPKG}\nE: Sub-process /usr/bin/dpkg returned an error code\n"
    with pytest.raises(StoreError) as caught:
        raise_if_no_space(output.encode(), "web: packages")
    assert str(caught.value) == (
        "web: packages: no space left on device: cannot copy "
        "extracted data for './usr/bin/ldd' to "
        "'/usr/bin/ldd.dpkg-new': failed to write (No space "
        "left on device)"
    )
    raise_if_no_space(b"E: Unable to locate package x", "web: packages")  # not full


def test_raise_disk_names_the_file_the_error_names(tmp_path: Path) -> None:
    path = tmp_path / "blob-1"
    with pytest.raises(
        StoreError,
        match=rf"^writing a blob \({path}\): no space left on "
        "device$",
    ):
        raise_disk(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)), "writing a blob")
    with pytest.raises(StoreError, match=rf"^writing {path}: no space left on device$"):
        raise_disk(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)), f"writing {path}")


def test_an_unwrapped_full_disk_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sysbake.commands import images

    def full(ctx: object, args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "trees/x"))

    monkeypatch.setattr(images, "cmd_images", full)  # registered by name when parsing
    assert cli.main(["--store", str(tmp_path), "images"]) == 1
    err = capsys.readouterr().err
    assert err == f"sysbake: error: no space left on device writing {tmp_path / 'trees/x'}\n"

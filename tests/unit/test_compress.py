"""Compression streams: round trips, determinism, interop with the CLI tools, failures."""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import subprocess

import pytest

from sysbake.errors import CommandError, LayerError
from sysbake.oci import compress

KINDS = ["none", "gzip", "zstd", "xz"]
TOOLS = {"gzip": ["gzip", "-dc"], "zstd": ["zstd", "-dcq"], "xz": ["xz", "-dcq"]}


def sample(size: int = 1 << 20) -> bytes:
    """Half compressible text, half noise: exercises both paths of every encoder."""
    rng = random.Random(42)
    text = b"".join(b"line %d of a layer tar\n" % i for i in range(size // 40))
    return text[: size // 2] + rng.randbytes(size - size // 2)


def packed(kind: str, data: bytes, level: int | None = None) -> bytes:
    out = io.BytesIO()
    with compress.compressor(kind, out, level=level) as sink:
        for start in range(0, len(data), 100_000):  # many writes, as a tar writer does
            sink.write(data[start : start + 100_000])
    return out.getvalue()


def unpacked(kind: str, blob: bytes, chunk: int = 65536) -> bytes:
    parts = []
    with compress.decompressor(kind, io.BytesIO(blob)) as src:
        while part := src.read(chunk):
            parts.append(part)
    return b"".join(parts)


def children() -> set[int]:
    """Live child processes of this process (all threads)."""
    found: set[int] = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            found |= {int(pid) for pid in f.read().split()}
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind: str) -> None:
    data = sample()
    blob = packed(kind, data)
    assert unpacked(kind, blob) == data
    assert compress.sniff(blob[:8]) == kind
    if kind != "none":
        assert len(blob) < len(data)


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic(kind: str) -> None:
    data = sample()
    assert (
        hashlib.sha256(packed(kind, data)).digest() == hashlib.sha256(packed(kind, data)).digest()
    )


@pytest.mark.parametrize("kind", ["gzip", "zstd", "xz"])
def test_readable_by_the_standard_tools(kind: str) -> None:
    data = sample(1 << 20)
    result = subprocess.run(TOOLS[kind], input=packed(kind, data), capture_output=True, check=True)
    assert result.stdout == data


def test_gzip_has_no_name_and_zero_mtime() -> None:
    blob = packed("gzip", b"hello")
    flags, mtime = blob[3], int.from_bytes(blob[4:8], "little")
    assert flags & 0x08 == 0  # FNAME
    assert mtime == 0


def test_zlib_fallback_when_pigz_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    data = sample()
    with_pigz = compress.gzip_backend()
    monkeypatch.setenv("PATH", "/nonexistent")
    assert compress.gzip_backend() == "zlib"
    blob = packed("gzip", data)
    assert blob == packed("gzip", data)
    assert unpacked("gzip", blob, chunk=1000) == data
    # Multi-member streams (pigz --independent, cat a.gz b.gz) decode whole.
    assert unpacked("gzip", blob + packed("gzip", b"tail")) == data + b"tail"
    monkeypatch.undo()
    assert compress.gzip_backend() == with_pigz
    gz = shutil.which("gzip")
    assert gz is not None
    assert subprocess.run([gz, "-dc"], input=blob, capture_output=True).stdout == data


@pytest.mark.parametrize("kind", ["gzip", "zstd", "xz"])
def test_levels_are_honoured(kind: str) -> None:
    data = sample(1 << 20)
    fast, small = packed(kind, data, level=1), packed(kind, data, level=9)
    assert fast != small  # the level reached the encoder
    assert unpacked(kind, fast) == unpacked(kind, small) == data
    assert compress.DEFAULT_LEVELS == {"gzip": 6, "zstd": 3, "xz": 6}


def test_sniff() -> None:
    assert compress.sniff(b"\x1f\x8b\x08\x00") == "gzip"
    assert compress.sniff(b"\x28\xb5\x2f\xfd\x00") == "zstd"
    assert compress.sniff(b"\xfd7zXZ\x00\x00") == "xz"
    assert compress.sniff(b"etc/\x00\x00\x00") == "none"
    assert compress.sniff(b"") == "none"


def test_unknown_kind() -> None:
    with (
        pytest.raises(LayerError, match="unknown compression 'bz2'"),
        compress.compressor("bz2", io.BytesIO()),
    ):
        pass


@pytest.mark.parametrize("kind", ["zstd", "xz"])
def test_corrupt_input_names_the_tool(kind: str) -> None:
    before = children()
    with pytest.raises(CommandError, match=f"{kind} decompression failed"):
        unpacked(kind, b"this is not compressed at all" * 100)
    assert children() == before


def test_truncated_stream_is_an_error() -> None:
    blob = packed("xz", sample())
    with pytest.raises(CommandError, match="xz decompression failed"):
        unpacked("xz", blob[: len(blob) // 2])


def test_corrupt_gzip_without_pigz(monkeypatch: pytest.MonkeyPatch) -> None:
    blob = packed("gzip", sample())
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(LayerError, match="gzip stream: truncated"):
        unpacked("gzip", blob[: len(blob) // 2])


class FailingSink:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen = 0

    def write(self, data: bytes, /) -> int:
        self.seen += len(data)
        if self.seen > self.limit:
            raise OSError(28, "No space left on device")
        return len(data)


@pytest.mark.parametrize("kind", ["gzip", "zstd", "xz"])
def test_output_failure_surfaces_without_hanging(kind: str) -> None:
    before = children()
    data = sample(2 << 20)
    with (
        pytest.raises(OSError, match="No space left"),
        compress.compressor(kind, FailingSink(4096)) as sink,
    ):
        for start in range(0, len(data), 1 << 16):
            sink.write(data[start : start + (1 << 16)])
    assert children() == before


def test_error_in_the_caller_kills_the_tool() -> None:
    before = children()
    with pytest.raises(RuntimeError, match="boom"), compress.compressor("xz", io.BytesIO()) as sink:
        sink.write(b"x" * 1000)
        raise RuntimeError("boom")
    assert children() == before


def test_reader_may_stop_early() -> None:
    before = children()
    blob = packed("zstd", sample())
    with compress.decompressor("zstd", io.BytesIO(blob)) as src:
        assert len(src.read(10)) == 10
    assert children() == before  # drained, checked and reaped


def test_tool_death_is_a_command_error() -> None:
    import signal

    before = children()
    with (
        pytest.raises(CommandError, match=r"zstd compression failed \(exit -9\)"),
        compress.compressor("zstd", io.BytesIO()) as sink,
    ):
        sink.write(b"x" * 1000)
        for pid in children() - before:
            os.kill(pid, signal.SIGKILL)
        for _ in range(64):
            sink.write(bytes(1 << 20))
    assert children() == before


class BrokenSource:
    """A blob stream that fails half way, as a dropped download would."""

    def __init__(self, data: bytes) -> None:
        self.src = io.BytesIO(data)

    def read(self, size: int = -1, /) -> bytes:
        if self.src.tell() > 100_000:
            raise ConnectionResetError("connection reset by peer")
        return self.src.read(min(size, 50_000))


def test_source_failure_is_reported_as_such() -> None:
    before = children()
    blob = packed("zstd", sample())
    with (
        pytest.raises(ConnectionResetError),
        compress.decompressor("zstd", BrokenSource(blob)) as src,
    ):
        while src.read(65536):
            pass
    assert children() == before

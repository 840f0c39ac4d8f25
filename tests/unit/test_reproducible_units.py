"""Reproducible builds in parts: the epoch (SOURCE_DATE_EPOCH, a snapshot, the mirror's
Release files read through rootfs.Root, hostile trees included), what the pipeline dates
with it, what finalize normalises, and `verify`'s comparison of layers and configs."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from sysbake import cli
from sysbake.build import bootstrap, finalize, pipeline
from sysbake.build.bootstrap import BootstrapPlan
from sysbake.build.context import BuildContext, Stage
from sysbake.errors import BuildError, ConfigError
from sysbake.oci.layers.commit import epoch_stamp, source_date_epoch, stamp_epoch
from sysbake.oci.model import Layer
from sysbake.oci.store import Store
from sysbake.project.specs import OciConfigSpec
from sysbake.records import replace
from sysbake.rootfs import Root
from sysbake.verify import (
    ONLY_IMAGE,
    ONLY_REBUILD,
    Entry,
    FileDiff,
    Verdict,
    aspects,
    compare,
    diff_config,
    diff_layers,
    entries,
    layer_stages,
    verify,
)
from tests.unit.conftest import Entry as TarEntry
from tests.unit.conftest import crafted_tar, files_tar, put_image, put_layer

LISTS = "var/lib/apt/lists"
RELEASE = """\
Origin: Debian
Label: Debian
Suite: stable
Codename: bookworm
Date: {date}
Valid-Until: Sat, 24 May 2025 09:12:41 UTC
SHA256:
 0123 1234 main/binary-amd64/Packages
Date: Thu, 01 Jan 2099 00:00:00 UTC
"""
SIGNED = """\
-----BEGIN PGP SIGNED MESSAGE-----
Hash: SHA512

{body}-----BEGIN PGP SIGNATURE-----

iQIzBAEBCgAdFiEE
-----END PGP SIGNATURE-----
"""
MAY_17 = 1747473161  # Sat, 17 May 2025 09:12:41 UTC
MAY_20 = 1747732361  # Tue, 20 May 2025 09:12:41 UTC


def _release(date: str) -> bytes:
    return RELEASE.format(date=date).encode()


def _plan(snapshot: str = "") -> BootstrapPlan:
    return BootstrapPlan(
        suite="bookworm",
        variant="minbase",
        architecture="amd64",
        components=("main",),
        packages=("systemd",),
        sources=("deb http://mirror.invalid/debian bookworm main",),
        keyring="",
        snapshot=snapshot,
        hooks=(),
    )


def _lists(root: Path) -> Path:
    lists = root / LISTS
    lists.mkdir(parents=True)
    return lists


@pytest.fixture(autouse=True)
def _no_epoch_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)


# -- the epoch -------------------------------------------------------------------------------


def test_release_date_reads_the_date_field_of_release_and_inrelease() -> None:
    text = _release("Sat, 17 May 2025 09:12:41 UTC")
    assert bootstrap.release_date(text) == MAY_17
    assert bootstrap.release_date(SIGNED.format(body=text.decode()).encode()) == MAY_17
    assert bootstrap.release_date(_release("Sat, 17 May 2025 11:12:41 +0200")) == MAY_17
    assert bootstrap.release_date(_release("Sat, 17 May 2025 09:12:41 -0000")) == MAY_17


@pytest.mark.parametrize(
    "text",
    [b"Origin: Debian\n", _release("yesterday"), _release(""), b"Date: \xff\xfe\n", b""],
)
def test_release_date_is_none_without_a_valid_date(text: bytes) -> None:
    assert bootstrap.release_date(text) is None


def test_release_epoch_is_the_newest_date_of_the_trees_release_files(tmp_path: Path) -> None:
    lists = _lists(tmp_path)
    (lists / "mirror_debian_dists_bookworm_InRelease").write_bytes(
        SIGNED.format(body=_release("Sat, 17 May 2025 09:12:41 UTC").decode()).encode()
    )
    (lists / "mirror_debian-security_dists_bookworm-security_Release").write_bytes(
        _release("Tue, 20 May 2025 09:12:41 UTC")
    )
    (lists / "mirror_debian_dists_bookworm_main_binary-amd64_Packages").write_bytes(
        b"Date: Thu, 01 Jan 2099 00:00:00 UTC\n"  # not a Release file: not read
    )
    with Root(tmp_path) as root:
        assert bootstrap.release_epoch(root) == MAY_20


def test_release_epoch_is_none_without_release_files(tmp_path: Path) -> None:
    with Root(tmp_path) as root:
        assert bootstrap.release_epoch(root) is None  # no lists directory at all
    _lists(tmp_path)
    with Root(tmp_path) as root:
        assert bootstrap.release_epoch(root) is None


def test_release_epoch_never_reads_through_a_symlink(tmp_path: Path) -> None:
    """A Release file that is a symlink (to a host file, or to a file of the image) is
    not read: the host file's later Date does not become the epoch."""
    host = tmp_path / "host-Release"
    host.write_bytes(_release("Thu, 01 Jan 2099 00:00:00 UTC"))
    tree = tmp_path / "tree"
    lists = _lists(tree)
    (tree / "etc").mkdir()
    (tree / "etc/decoy").write_bytes(_release("Thu, 01 Jan 2099 00:00:00 UTC"))
    (lists / "a_Release").symlink_to(host)
    (lists / "b_InRelease").symlink_to("../" * 10 + str(host).lstrip("/"))
    (lists / "c_Release").symlink_to("/etc/decoy")
    (lists / "d_Release").write_bytes(_release("Sat, 17 May 2025 09:12:41 UTC"))
    with Root(tree) as root:
        assert bootstrap.release_epoch(root) == MAY_17


def test_release_epoch_skips_fifos_directories_and_huge_files(tmp_path: Path) -> None:
    lists = _lists(tmp_path)
    os.mkfifo(lists / "fifo_Release")  # opening it would block
    (lists / "dir_Release").mkdir()
    with open(lists / "huge_Release", "wb") as f:
        f.write(_release("Thu, 01 Jan 2099 00:00:00 UTC"))
        f.truncate(64 << 20)  # sparse: costs no disk
    with Root(tmp_path) as root:
        assert bootstrap.release_epoch(root) is None


def test_release_epoch_when_the_lists_directory_is_a_symlink_to_the_host(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "x_Release").write_bytes(_release("Thu, 01 Jan 2099 00:00:00 UTC"))
    tree = tmp_path / "tree"
    (tree / "var/lib/apt").mkdir(parents=True)
    (tree / LISTS).symlink_to(host)  # resolved inside the tree: leads nowhere
    with Root(tree) as root:
        assert bootstrap.release_epoch(root) is None


def test_choose_epoch_prefers_the_variable_then_the_snapshot_then_the_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (_lists(tmp_path) / "m_Release").write_bytes(_release("Sat, 17 May 2025 09:12:41 UTC"))
    with Root(tmp_path) as root:
        assert bootstrap.choose_epoch(_plan(), root, "base") == MAY_17
        assert bootstrap.choose_epoch(_plan("20250520T091241Z"), root, "base") == MAY_20
        monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
        assert bootstrap.choose_epoch(_plan("20250520T091241Z"), root, "base") == 1_700_000_000


def test_choose_epoch_without_release_files_is_zero_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Root(tmp_path) as root:
        assert bootstrap.choose_epoch(_plan(), root, "base") == 0
    assert "base: no Release file" in capsys.readouterr().err


def test_epoch_rule_is_what_the_bootstrap_key_knows(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bootstrap.epoch_rule(_plan()) == bootstrap.RELEASE_RULE
    assert bootstrap.epoch_rule(_plan("20250520T091241Z")) == MAY_20
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "12345")
    assert bootstrap.epoch_rule(_plan("20250520T091241Z")) == 12345


@pytest.mark.parametrize("value", ["yesterday", "-5", "1.5", "١٢٣", "999999999999999"])
def test_a_malformed_source_date_epoch_is_an_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    with pytest.raises(ConfigError, match="SOURCE_DATE_EPOCH: expected whole seconds"):
        source_date_epoch()


def test_an_empty_source_date_epoch_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", " ")
    assert source_date_epoch() is None


@pytest.mark.parametrize(
    ("stamp", "epoch"),
    [
        ("2025-05-17T09:12:41Z", MAY_17),
        ("2025-05-17T09:12:41.999999999Z", MAY_17),  # Go's nanoseconds
        ("2025-05-17T11:12:41+02:00", MAY_17),
        ("1970-01-01T00:00:00Z", 0),
        ("2025-05-17T09:12:41", None),  # no offset: no instant
        ("yesterday", None),
        (None, None),
        (1747473161, None),
    ],
)
def test_stamp_epoch_reads_oci_created_values(stamp: object, epoch: int | None) -> None:
    assert stamp_epoch(stamp) == epoch


def test_epoch_stamp_and_back() -> None:
    assert epoch_stamp(MAY_17) == "2025-05-17T09:12:41Z"
    assert stamp_epoch(epoch_stamp(0)) == 0


# -- the pipeline dates every stage with the epoch -----------------------------------------------

PROJECT = """\
[images.base.bootstrap]
distro = "debian"
suite = "bookworm"
mirror = "http://deb.example.invalid/debian"

[images.app]
from = "base"

[[images.app.provision]]
type = "script"
name = "hello"
run = "echo hello > /etc/hello"
"""


_RUN_STAGE = pipeline.run_stage


def _stand_in(
    release: int | None,
) -> Callable[[BuildContext, pipeline.PartialImage, Stage], pipeline.PartialImage]:
    """run_stage with each layer made by a stand-in; the bootstrap's stand-in says it read
    `release` from the mirror, as its real produce() does."""

    def run(ctx: BuildContext, image: pipeline.PartialImage, stage: Stage) -> pipeline.PartialImage:
        def produce() -> Layer:
            return put_layer(ctx.store, files_tar({f"{image.name}-{stage.name}": b"x"}))

        epoch = (lambda: release) if stage.name == "bootstrap" else stage.epoch
        return _RUN_STAGE(ctx, image, replace(stage, produce=produce, epoch=epoch))

    return run


def _build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, release: int | None, name: str
) -> dict[str, object]:
    project, store = tmp_path / "project", tmp_path / name
    project.mkdir(exist_ok=True)
    (project / "sysbake.toml").write_text(PROJECT)
    monkeypatch.setattr(pipeline, "run_stage", _stand_in(release))
    out = tmp_path / f"{name}.json"
    with open(out, "w") as f, monkeypatch.context() as patch:
        patch.setattr("sys.stdout", f)
        assert cli.main(["--store", str(store), "-q", "--json", "build", str(project)]) == 0
    app = Store(store).resolve("app:latest")
    return {"config": app.config, "build": json.loads(out.read_text())}


def test_history_and_config_created_are_the_bootstrap_epoch_not_the_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _build(tmp_path, monkeypatch, MAY_17, "a")["config"]
    assert isinstance(config, dict)
    assert config["created"] == "2025-05-17T09:12:41Z"
    assert [h["created"] for h in config["history"]] == ["2025-05-17T09:12:41Z"] * 2


def test_the_step_key_holds_the_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bases of two mirror states (their layers aside) give different step keys."""
    first = _build(tmp_path, monkeypatch, MAY_17, "a")["build"]
    second = _build(tmp_path, monkeypatch, MAY_20, "b")["build"]
    assert isinstance(first, dict) and isinstance(second, dict)
    keys = [
        [stage["key"] for image in doc["images"] for stage in image["stages"]]
        for doc in (first, second)
    ]
    assert keys[0][0] == keys[1][0]  # the bootstrap's key cannot know the mirror's date
    assert keys[0][1] != keys[1][1]


def test_source_date_epoch_overrides_the_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    config = _build(tmp_path, monkeypatch, None, "a")["config"]
    assert isinstance(config, dict)
    assert config["created"] == "2023-11-14T22:13:20Z"
    assert {h["created"] for h in config["history"]} == {"2023-11-14T22:13:20Z"}


def test_the_image_epoch_is_the_newest_parseable_created_of_its_history() -> None:
    image = pipeline.PartialImage(
        "x",
        "amd64",
        history=(
            {"created": "2025-05-17T09:12:41Z"},
            {"created": "garbage"},
            {"created": "2025-05-20T11:12:41+02:00"},
            {},
        ),
    )
    assert pipeline._epoch(image) == MAY_20
    assert pipeline._epoch(pipeline.PartialImage("x", "amd64")) == 0
    zero = ({"created": "0001-01-01T00:00:00Z"},)  # Go's zero time, as some images carry
    assert pipeline._epoch(pipeline.PartialImage("x", "amd64", history=zero)) == 0


# -- finalize normalises what a build dates ------------------------------------------------------

SHADOW = b"root:*:20791:0:99999:7:::\nops:!:20800:0:99999:7:::\nnew:!::0:99999:7:::\n"


def test_normalise_clamps_password_change_days_and_update_stamps(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "var").mkdir()
    (tmp_path / "etc/shadow").write_bytes(SHADOW)
    (tmp_path / "etc/shadow-").write_bytes(SHADOW)
    os.chmod(tmp_path / "etc/shadow", 0o640)
    stamp = b"# This file was created by systemd-update-done.\nTIMESTAMP_NSEC=%d\n"
    (tmp_path / "etc/.updated").write_bytes(stamp % (1_800_000_000 * 10**9 + 5))
    (tmp_path / "var/.updated").write_bytes(stamp % (1_600_000_000 * 10**9 + 5))
    with Root(tmp_path) as root:
        finalize.normalise(root, 20795 * 86400 + 600)
        finalize.normalise(root, 20795 * 86400 + 600)  # idempotent
    want = b"root:*:20791:0:99999:7:::\nops:!:20795:0:99999:7:::\nnew:!::0:99999:7:::\n"
    assert (tmp_path / "etc/shadow").read_bytes() == want
    assert (tmp_path / "etc/shadow-").read_bytes() == want
    assert (tmp_path / "etc/shadow").stat().st_mode & 0o777 == 0o640
    limit = (20795 * 86400 + 600) * 10**9
    assert (tmp_path / "etc/.updated").read_bytes() == stamp % limit
    assert (tmp_path / "var/.updated").read_bytes() == stamp % (1_600_000_000 * 10**9 + 5)


def test_normalise_leaves_an_unchanged_file_unwritten(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/shadow").write_bytes(SHADOW)
    os.utime(tmp_path / "etc/shadow", ns=(0, 5))
    with Root(tmp_path) as root:
        finalize.normalise(root, 20900 * 86400)
    assert (tmp_path / "etc/shadow").stat().st_mtime_ns == 5  # an overlay would copy it up


def test_normalise_never_writes_through_an_image_symlink(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "shadow").write_bytes(SHADOW)
    (host / "updated").write_bytes(b"TIMESTAMP_NSEC=1800000000000000000\n")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "var").symlink_to(host)
    (tree / "etc/shadow").symlink_to(host / "shadow")
    (tree / "etc/shadow-").symlink_to("../" * 12 + str(host / "shadow").lstrip("/"))
    (tree / "etc/.updated").symlink_to(host / "updated")
    with Root(tree) as root:
        finalize.normalise(root, 0)
        finalize.drop_bytecode(root, "var")
    assert (host / "shadow").read_bytes() == SHADOW
    assert (host / "updated").read_bytes() == b"TIMESTAMP_NSEC=1800000000000000000\n"


def test_drop_bytecode_removes_pycache_dirs_under_the_top_only(tmp_path: Path) -> None:
    for d in ("opt/salt/lib/__pycache__", "opt/salt/lib/pkg/__pycache__", "usr/lib/__pycache__"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "m.cpython-311.pyc").write_bytes(b"pyc")
    (tmp_path / "opt/salt/lib/m.py").write_text("")
    with Root(tmp_path) as root:
        finalize.drop_bytecode(root, "/opt/salt")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("__pycache__")) == [
        "usr/lib/__pycache__"
    ]
    assert (tmp_path / "opt/salt/lib/m.py").exists()


def test_clean_tree_drops_the_ldconfig_aux_cache(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "var/cache/ldconfig").mkdir(parents=True)
    (tmp_path / "var/cache/ldconfig/aux-cache").write_bytes(b"inodes")
    with Root(tmp_path) as root:
        finalize.clean_tree(root, finalize.Cleanup(), epoch=0)
    assert not (tmp_path / "var/cache/ldconfig/aux-cache").exists()


def test_the_projects_labels_win_over_the_parents_and_sysbakes_over_both() -> None:
    config = finalize.image_config(
        OciConfigSpec(labels=(("title", "web"), ("io.sysbake.image", "forged"))),
        architecture="amd64",
        diff_ids=[],
        history=[],
        created="2025-05-17T09:12:41Z",
        labels={"title": "base", "owner": "ops", "io.sysbake.image": "web"},
    )
    labels = config["config"]["Labels"]  # type: ignore[index]
    assert labels["title"] == "web"
    assert labels["owner"] == "ops"
    assert labels["io.sysbake.image"] == "web"


# -- verify: the comparison ----------------------------------------------------------------------


def _entries(tar: bytes) -> dict[str, Entry]:
    return entries(io.BytesIO(tar))


BASE_ENTRIES: tuple[TarEntry, ...] = (
    ("etc", tarfile.DIRTYPE, {}),
    ("etc/motd", tarfile.REGTYPE, {"data": b"hello\n"}),
    ("etc/link", tarfile.SYMTYPE, {"linkname": "motd"}),
    ("usr/bin/ping", tarfile.REGTYPE, {"data": b"elf", "mode": 0o755}),
)


def _changed(name: str, **attrs: object) -> bytes:
    """BASE_ENTRIES as a tar, the entry `name` with `attrs` changed."""
    out = []
    for entry_name, kind, base in BASE_ENTRIES:
        merged = {**base, **attrs} if entry_name == name else dict(base)
        out.append((entry_name, kind, merged))
    return crafted_tar(*out)


def test_identical_layers_have_no_differences() -> None:
    assert diff_layers(_entries(_changed("")), _entries(_changed(""))) == []


@pytest.mark.parametrize(
    ("name", "attrs", "what"),
    [
        ("etc/motd", {"data": b"hellO\n"}, ("content",)),
        ("etc/motd", {"mode": 0o600}, ("mode",)),
        ("etc/motd", {"uid": 1000}, ("owner",)),
        ("etc/motd", {"gid": 4}, ("owner",)),
        ("etc/motd", {"mtime": 1_700_000_001}, ("mtime",)),
        ("etc/motd", {"data": b"x", "mtime": 5, "mode": 0o600}, ("content", "mode", "mtime")),
        ("etc/link", {"linkname": "/etc/shadow"}, ("link",)),
        (
            "usr/bin/ping",
            {"pax_headers": {"SCHILY.xattr.security.capability": "\x01"}},
            ("xattrs",),
        ),
    ],
)
def test_each_aspect_of_an_entry_is_named(
    name: str, attrs: dict[str, object], what: tuple[str, ...]
) -> None:
    assert diff_layers(_entries(_changed("")), _entries(_changed(name, **attrs))) == [(name, what)]


def test_paths_on_one_side_only_and_changed_types() -> None:
    old = _entries(crafted_tar(("a", tarfile.REGTYPE, {}), ("b", tarfile.REGTYPE, {})))
    new = _entries(
        crafted_tar(("./b/", tarfile.DIRTYPE, {}), ("c", tarfile.FIFOTYPE, {}), ("./a", b"0", {}))
    )
    assert diff_layers(old, new) == [("b", ("type",)), ("c", (ONLY_REBUILD,))]
    assert diff_layers(new, old) == [("b", ("type",)), ("c", (ONLY_IMAGE,))]


def test_devices_and_hardlinks_are_compared() -> None:
    def tar(major: int, target: str) -> dict[str, Entry]:
        return _entries(
            crafted_tar(
                ("dev/null", tarfile.CHRTYPE, {"devmajor": major, "devminor": 3}),
                ("a", tarfile.REGTYPE, {}),
                ("b", tarfile.REGTYPE, {}),
                ("h", tarfile.LNKTYPE, {"linkname": target}),
            )
        )

    assert aspects(tar(1, "a")["dev/null"], tar(2, "a")["dev/null"]) == ("device",)
    assert diff_layers(tar(1, "a"), tar(1, "b")) == [("h", ("link",))]


def test_the_last_entry_of_a_name_is_the_one_compared() -> None:
    twice = crafted_tar(
        ("f", tarfile.REGTYPE, {"data": b"1"}), ("f", tarfile.REGTYPE, {"data": b"2"})
    )
    assert diff_layers(_entries(twice), _entries(files_tar({"f": b"2"}))) == []


def test_diff_config_names_the_fields_that_differ() -> None:
    old = {
        "created": "2025-05-17T09:12:41Z",
        "config": {"Labels": {"io.sysbake.stage.site": "a", "title": "x"}, "Cmd": ["/init"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:1"]},
        "history": [{"comment": "sysbake bootstrap 1"}, {"comment": "sysbake site a"}],
    }
    new = json.loads(json.dumps(old))
    new["rootfs"]["diff_ids"] = ["sha256:2"]  # the layers are compared file by file
    assert diff_config(old, new) == ()
    new["created"] = "2025-05-20T09:12:41Z"
    new["config"]["Labels"]["io.sysbake.stage.site"] = "b"
    new["config"]["Cmd"] = ["/init", "-v"]
    new["history"][1]["comment"] = "sysbake site b"
    assert diff_config(old, new) == (
        "config.Cmd",
        'config.Labels["io.sysbake.stage.site"]',
        "created",
        "history[1].comment",
    )


def test_layer_stages_names_each_layer_by_its_history() -> None:
    config = {
        "history": [
            {"comment": "sysbake bootstrap 0123"},
            {"created_by": "ENV A=b", "empty_layer": True},
            {"created_by": "RUN make"},
            {"comment": "sysbake site 4567"},
        ]
    }
    assert layer_stages(config) == ["bootstrap", "RUN make", "site"]


def _history(*stages: str) -> list[dict[str, str]]:
    return [
        {"comment": f"sysbake {s} {i}", "created": "2025-05-17T09:12:41Z"}
        for i, s in enumerate(stages)
    ]


def test_compare_of_the_same_image_is_reproducible(tmp_path: Path) -> None:
    a, b = Store(tmp_path / "a").ensure(), Store(tmp_path / "b").ensure()
    files = {"etc/motd": b"hello\n"}
    old = put_image(a, files, history=_history("bootstrap"))
    new = put_image(b, files, history=_history("bootstrap"))
    verdict = compare("t:latest", (a, old), (b, new))
    assert verdict.reproducible and verdict.lines() == [f"reproducible {old.manifest.digest}"]


def test_compare_lists_exactly_the_file_that_differs(tmp_path: Path) -> None:
    a, b = Store(tmp_path / "a").ensure(), Store(tmp_path / "b").ensure()
    base = {"etc/os-release": b"debian\n", "usr/bin/sh": b"elf"}
    old = put_image(
        a, base, {"etc/motd": b"hello\n", "etc/x": b"x"}, history=_history("bootstrap", "site")
    )
    new = put_image(
        b, base, {"etc/motd": b"hellO\n", "etc/x": b"x"}, history=_history("bootstrap", "site")
    )
    verdict = compare("t:latest", (a, old), (b, new))
    assert not verdict.reproducible
    assert verdict.files == (FileDiff(2, "site", "etc/motd", ("content",)),)
    assert verdict.config == ()
    assert str(verdict.files[0]) == "layer 2 (site): /etc/motd: content"
    doc = verdict.to_json()
    assert doc["reproducible"] is False and doc["rebuilt"] == new.manifest.digest
    assert doc["files"] == [
        {"layer": 2, "stage": "site", "path": "etc/motd", "differs": ["content"]}
    ]


def test_compare_notes_layer_counts_and_recompressed_layers(tmp_path: Path) -> None:
    a, b = Store(tmp_path / "a").ensure(), Store(tmp_path / "b").ensure()
    tar = files_tar({"f": b"1"})
    old = put_image(a, put_layer(a, tar), {"g": b"2"}, history=_history("bootstrap", "s"))
    new = put_image(b, put_layer(b, tar, compressed=False), history=_history("bootstrap"))
    verdict = compare("t:latest", (a, old), (b, new))
    assert verdict.files == ()
    assert "layers: the image has 2, its rebuild 1" in verdict.notes
    assert "layer 1: the same files, compressed differently" in verdict.notes


def test_verify_refuses_an_image_that_sysbake_did_not_build(tmp_path: Path) -> None:
    store = Store(tmp_path / "store").ensure()
    put_image(store, {"f": b"1"}, ref="foreign:1")
    project = tmp_path / "p"
    project.mkdir()
    (project / "sysbake.toml").write_text(PROJECT)
    from sysbake.project.load import load_project

    with pytest.raises(BuildError, match=r"foreign:1: no io\.sysbake\.image label"):
        verify(store, "foreign:1", load_project(project))


def test_verdict_lines_name_config_fields_and_notes() -> None:
    verdict = Verdict(
        "web:latest",
        "sha256:a",
        "sha256:b",
        files=(FileDiff(3, "site", "var/www/index.html", ("content", "mtime")),),
        config=("created",),
        notes=("stage site: its inputs changed since the image was built: trees changed",),
    )
    assert verdict.lines() == [
        "not reproducible: web:latest is sha256:a, its rebuild sha256:b",
        "layer 3 (site): /var/www/index.html: content, mtime",
        "config: created",
        "stage site: its inputs changed since the image was built: trees changed",
    ]


def test_parents_from_the_store_are_linked_into_the_scratch_store(tmp_path: Path) -> None:
    """However the project names a parent of the store (a tag, a pinned reference), the
    rebuild's store resolves it to the same image, without a rebuild; so it does an image
    ID (which `from` does not take, but the store resolves)."""
    from sysbake.project.load import load_project
    from sysbake.verify import _parent_tag, _scratch_store, _seed_parents

    store = Store(tmp_path / "store").ensure()
    parent = put_image(store, {"etc/os-release": b"debian\n"}, ref="lib/parent:1")
    pinned = f"lib/parent:1@{parent.manifest.digest}"
    by_id = parent.id.removeprefix("sha256:")[:12]
    project = tmp_path / "p"
    project.mkdir()
    (project / "sysbake.toml").write_text(
        f'[images.a]\nfrom = "lib/parent:1"\n[images.b]\nfrom = "{pinned}"\n'
        '[images.d]\nfrom = "a"\n'
    )
    loaded = load_project(project)
    scratch = _scratch_store(store, tmp_path / "scratch")
    for target in ("a", "b", "d"):
        _seed_parents(store, scratch, loaded, target)
    scratch.tag(_parent_tag(by_id, parent), parent)
    for text in ("lib/parent:1", pinned, by_id):
        assert scratch.resolve(text).manifest.digest == parent.manifest.digest
    assert (tmp_path / "scratch/debs").resolve() == (tmp_path / "store/debs").resolve()
    assert (tmp_path / "scratch/containers").resolve() == (tmp_path / "store/containers")

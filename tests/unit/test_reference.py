"""The one image-reference grammar (sysbake.oci.reference), and every consumer agreeing on it.

One table of references, valid and not, runs through each consumer: the grammar itself, the
project loader (`sysbake validate`: `tag` and `from`), the store (`tag`, `resolve`: what a
build calls), the command line (`tag`, `pull`, `push`) and the registry client (`pull -t`).
A reference is refused by all of them, with the grammar's own words, or by none.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from sysbake import cli
from sysbake.errors import ConfigError, ImageNotFound, SysbakeError
from sysbake.oci.model import Image
from sysbake.oci.reference import InvalidReference, Reference, parse_domain
from sysbake.oci.store import Store
from sysbake.project.load import load_project
from sysbake.project.reader import got
from sysbake.registry import transfer
from sysbake.registry.auth import RegistryError
from sysbake.registry.transfer import ConnectOptions, Limits
from tests.unit.conftest import put_image

D1 = "sha256:" + "1" * 64
PATH_ERROR = "expected lowercase letters and digits, joined by '.', '_', '__' or '-'"
UPPER = "(upper case is allowed only in the registry host)"
CLIMB = "'..', '.' and empty components are not allowed"
HOST_ERROR = "expected HOST[:PORT]"
TAG_ERROR = "expected 1 to 128 letters, digits, '_', '.' or '-', not starting with '.' or '-'"
DIGEST_ERROR = "expected sha256: and 64 lowercase hex digits"


class Row(NamedTuple):
    text: str
    expected: Reference | str  # the parsed value, or a piece of the grammar's message


def ok(
    text: str, domain: str, path: str, tag: str | None = "latest", digest: str | None = None
) -> Row:
    return Row(text, Reference(domain, path, tag, digest))


def bad(text: str, message: str) -> Row:
    return Row(text, message)


TABLE = [
    # local short names
    ok("web", "", "web"),
    ok("web:1.0", "", "web", "1.0"),
    ok("team/web:v2", "", "team/web", "v2"),
    ok("x/a.b_c-d/e__f--g:T_1.x-y", "", "x/a.b_c-d/e__f--g", "T_1.x-y"),
    ok("a.b_c-d:T", "", "a.b_c-d", "T"),  # one component: never a host
    ok("host:5000", "", "host", "5000"),  # no '/': a name and a tag, as docker reads it
    ok(f"web@{D1}", "", "web", None, D1),
    ok("w:" + "t" * 128, "", "w", "t" * 128),
    # registries: a '.', a ':' or localhost
    ok("Registry.Example:5000/web:1", "registry.example:5000", "web", "1"),
    ok("localhost/web", "localhost", "web"),
    ok("localhost:5000/web:1", "localhost:5000", "web", "1"),
    ok("127.0.0.1:5000/team/web/app:v2", "127.0.0.1:5000", "team/web/app", "v2"),
    ok("[::1]:5000/web:x", "[::1]:5000", "web", "x"),
    ok("reg.example:65535/x", "reg.example:65535", "x"),
    ok(f"reg.example/web@{D1}", "reg.example", "web", None, D1),
    ok(f"reg.example/web:1@{D1}", "reg.example", "web", "1", D1),
    ok("r.example/" + "a" * 245, "r.example", "a" * 245),  # a name of 255 characters
    ok("a" + "-" * 5 + "b.c/d", "a-----b.c", "d"),
    # names that climb or are empty
    bad("", "no name: expected name[:tag][@digest]"),
    bad("../x", f"path component '..': {CLIMB}"),
    bad("reg.example/../x", f"path component '..': {CLIMB}"),
    bad("127.0.0.1:5000/a/..", f"path component '..': {CLIMB}"),
    bad(f"127.0.0.1:5000/../x@{D1}", f"path component '..': {CLIMB}"),
    bad("reg..example/x", f"path component 'reg..example': {CLIMB}"),
    bad("..:5000/x", f"path component '..:5000': {CLIMB}"),
    bad("reg.example/./x", f"path component '.': {CLIMB}"),
    bad("reg.example//web", f"path component '': {CLIMB}"),
    bad("web/", f"path component '': {CLIMB}"),
    bad("/web", f"path component '': {CLIMB}"),
    # path components
    bad("Web:1", f"invalid path component 'Web' {UPPER}: {PATH_ERROR}"),
    bad("reg.example/Web", f"invalid path component 'Web' {UPPER}"),
    bad("LOCALHOST/web", f"invalid path component 'LOCALHOST' {UPPER}"),
    bad("a___b", f"invalid path component 'a___b': {PATH_ERROR}"),
    bad("-web", "invalid path component '-web'"),
    bad("web-", "invalid path component 'web-'"),
    bad("reg.example/a..b", "path component 'a..b'"),
    bad(" web", "invalid path component ' web'"),
    bad("web:1:2", "invalid path component 'web:1'"),
    bad("wéb", "invalid path component 'wéb'"),
    # too long
    bad("a" * 256, "the name is 256 characters long: expected at most 255"),
    bad("r.example/" + "a" * 246, "the name is 256 characters long: expected at most 255"),
    # tags
    bad("web:", f"invalid tag '': {TAG_ERROR}"),
    bad("web:-x", f"invalid tag '-x': {TAG_ERROR}"),
    bad("web:.x", "invalid tag '.x'"),
    bad("w:" + "t" * 129, "invalid tag 'ttt"),
    bad("web:tég", "invalid tag 'tég'"),
    bad("web:1\n", "invalid tag '1\\n'"),
    # digests
    bad("web@sha256:abc", f"invalid digest 'sha256:abc': {DIGEST_ERROR}"),
    bad("web@md5:" + "0" * 32, "invalid digest 'md5:"),
    bad("web@sha512:" + "0" * 128, "invalid digest 'sha512:"),
    bad("web@sha256:" + "A" * 64, "invalid digest 'sha256:AAA"),
    bad("web@", "invalid digest ''"),
    bad(f"web@{D1}@x", "invalid digest"),
    # registry hosts and ports
    bad("reg.example:0/x", f"invalid registry host 'reg.example:0': {HOST_ERROR}"),
    bad("reg.example:65536/x", "invalid registry host 'reg.example:65536'"),
    bad("reg.example:50a/x", "invalid registry host 'reg.example:50a'"),
    bad("reg.example:/x", "invalid registry host 'reg.example:'"),
    bad("reg.example:1:2/x", "invalid registry host 'reg.example:1:2'"),
    bad("-reg.example/x", "invalid registry host '-reg.example'"),
    bad("reg-.example/x", "invalid registry host 'reg-.example'"),
    bad("reg_x.example/x", "invalid registry host 'reg_x.example'"),
    bad("bad host:5/web", "invalid registry host 'bad host:5'"),
    bad("a" * 64 + ".example/x", "invalid registry host 'aaa"),
    bad("[::1/x", "invalid registry host '[::1'"),
    bad("[::1]x/y", "invalid registry host '[::1]x'"),
    bad("[zz]:5000/x", "invalid registry host '[zz]:5000'"),
]
ROWS = [
    pytest.param(
        row, id=repr(row.text) if len(row.text) < 30 else f"{row.text[:20]!r}...({len(row.text)})"
    )
    for row in TABLE
]


def problem(text: str) -> str | None:
    """The grammar's own words about `text` (None when it is a reference)."""
    try:
        Reference.parse(text)
    except InvalidReference as exc:
        return exc.problem
    return None


def digest_problem(row: Row) -> str | None:
    """What a consumer that tags (no digest allowed) says about `row`."""
    if isinstance(row.expected, Reference) and row.expected.digest:
        with pytest.raises(InvalidReference) as info:
            Reference.parse(row.text, allow_digest=False)
        return info.value.problem
    return problem(row.text)


@pytest.fixture
def image(store: Store) -> Image:
    """An image of the store, tagged "keep:1" (an ID finds only tagged images)."""
    return put_image(store, {"f": b"x"}, ref="keep:1")


def same(a: Image, b: Image) -> bool:
    """The same image, whichever tag it was loaded by (annotations differ)."""
    return a.manifest.digest == b.manifest.digest


@pytest.fixture
def project_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    monkeypatch.chdir(root)
    return root


def load(root: Path, text: str) -> str:
    """Load a project holding `text`; '' when it loads, else the one-line error."""
    (root / "sysbake.toml").write_text(text)
    try:
        load_project(root)
    except ConfigError as exc:
        return str(exc)
    return ""


class Reached(SysbakeError):
    """A stand-in for a transfer: the command line got past its arguments."""

    exit_code = 99


@pytest.fixture
def transfers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Reference | None]]:
    """pull and push replaced by stand-ins that record the Reference the command line
    gave them, then stop (no network)."""
    seen: list[Reference | None] = []

    def fake_pull(store: Store, source: Reference, *args: object, **kw: object) -> None:
        seen.append(source)
        raise Reached("pull reached")

    def fake_push(store: Store, source: str, dest: Reference | None, *args: object) -> None:
        seen.append(dest)
        raise Reached("push reached")

    monkeypatch.setattr(transfer, "pull", fake_pull)
    monkeypatch.setattr(transfer, "push", fake_push)
    yield seen


# -- the grammar ---------------------------------------------------------------------------


@pytest.mark.parametrize("row", ROWS)
def test_grammar(row: Row) -> None:
    if isinstance(row.expected, Reference):
        ref = Reference.parse(row.text)
        assert ref == row.expected
        assert Reference.parse(str(ref)) == ref  # the normal form reads back the same
        assert ref.reference == (ref.digest or ref.tag)
        return
    with pytest.raises(InvalidReference) as info:
        Reference.parse(row.text)
    assert row.expected in info.value.problem
    assert str(info.value) == f"{row.text!r}: {info.value.problem}"
    assert "\n" not in str(info.value)  # one line, whatever the text holds


# -- the project file: what `sysbake validate` refuses ------------------------------------


@pytest.mark.parametrize("row", ROWS)
def test_project_tag(row: Row, project_dir: Path, store: Store, image: Image) -> None:
    error = load(project_dir, f'[images.web]\nfrom = "base:1"\ntag = {json.dumps(row.text)}\n')
    expected = digest_problem(row)
    if expected is None:
        assert error == ""
        spec = load_project(project_dir).image("web")
        assert spec.tag == store.tag(row.text, image)  # the build tags what validate said
    else:
        assert error == f"sysbake.toml: images.web.tag: {expected}, got {got(row.text)}"


@pytest.mark.parametrize("row", ROWS)
def test_project_from(row: Row, project_dir: Path, store: Store) -> None:
    error = load(project_dir, f"[images.child]\nfrom = {json.dumps(row.text)}\n")
    if not any(c in row.text for c in ":@/"):
        # A bare word names an image of this file: refused here, never looked up.
        assert error.startswith("sysbake.toml: images.child.from: ")
        return
    expected = problem(row.text)
    if expected is None:
        assert error == ""
        parent = load_project(project_dir).image("child").parent
        assert parent is not None
        with pytest.raises(ImageNotFound):  # the build looks it up, and finds nothing
            store.resolve(parent)
    else:
        assert error == f"sysbake.toml: images.child.from: {expected}, got {got(row.text)}"


# -- the store: what a build and the image commands call ---------------------------------


@pytest.mark.parametrize("row", ROWS)
def test_store_tag_and_resolve(row: Row, store: Store, image: Image) -> None:
    expected = digest_problem(row)
    if expected is None:
        assert isinstance(row.expected, Reference)
        assert store.tag(row.text, image) == row.expected.store_name()
        assert same(store.resolve(row.text), image)
        assert store.untag(row.text)
    else:
        with pytest.raises(InvalidReference) as info:
            store.tag(row.text, image)
        assert info.value.problem == expected
    resolve_problem = problem(row.text)
    if resolve_problem is None:
        with pytest.raises(ImageNotFound):
            store.resolve(row.text)
    else:
        with pytest.raises(InvalidReference) as info:
            store.resolve(row.text)
        assert info.value.problem == resolve_problem


@pytest.mark.parametrize("row", ROWS)
def test_cli_tag(row: Row, store: Store, image: Image, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["--store", str(store.root), "tag", "--", image.id, row.text])
    out, err = capsys.readouterr()
    expected = digest_problem(row)
    if expected is None:
        assert isinstance(row.expected, Reference)
        assert (code, out, err) == (0, row.expected.store_name() + "\n", "")
    else:
        assert (code, out) == (2, "")
        assert err == f"sysbake: error: {row.text!r}: {expected}\n"


# -- the registry client -------------------------------------------------------------------


def remote_problem(row: Row) -> str | None:
    """What a consumer that needs a registry host says about `row`."""
    if isinstance(row.expected, Reference) and not row.expected.domain:
        return "names no registry: expected HOST[:PORT]/repository[:tag][@digest]"
    return problem(row.text)


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("command", ["pull", "push"])
def test_cli_pull_and_push(
    row: Row,
    command: str,
    store: Store,
    image: Image,
    transfers: list[Reference | None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["pull", "--", row.text] if command == "pull" else ["push", "--", image.id, row.text]
    code = cli.main(["--store", str(store.root), *argv])
    err = capsys.readouterr().err
    expected = remote_problem(row)
    if expected is None:
        assert (code, err) == (99, f"sysbake: error: {command} reached\n")
        assert transfers == [row.expected]
    else:
        assert (code, transfers) == (2, [])
        assert err == f"sysbake: error: {row.text!r}: {expected}\n"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound and never listening: a connection to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.mark.parametrize("row", ROWS)
def test_pull_tag_is_checked_before_connecting(row: Row, store: Store, closed_port: int) -> None:
    source = Reference.parse(f"127.0.0.1:{closed_port}/web:1", need_registry=True)
    options = ConnectOptions(limits=Limits(window=1.0))
    expected = digest_problem(row)
    if expected is None:
        with pytest.raises(RegistryError, match="cannot connect"):
            transfer.pull(store, source, options, tag=row.text)
    else:
        with pytest.raises(InvalidReference) as info:
            transfer.pull(store, source, options, tag=row.text)
        assert info.value.problem == expected


# -- beyond the table ------------------------------------------------------------------------


def test_a_pinned_reference_resolves_to_its_own_image(store: Store, image: Image) -> None:
    other = put_image(store, {"g": b"y"}, ref="reg.example/other:1")
    store.tag("reg.example/web:1", image)
    digest = image.manifest.digest
    assert same(store.resolve(f"reg.example/web@{digest}"), image)
    assert same(store.resolve(f"Reg.Example/web:2@{digest}"), image)  # the digest decides
    with pytest.raises(ImageNotFound):  # the name must be a name of that image
        store.resolve(f"reg.example/other@{digest}")
    with pytest.raises(ImageNotFound):
        store.resolve(f"reg.example/web@{other.manifest.digest}")


def test_a_pinned_parent_is_what_the_build_resolves(
    project_dir: Path, store: Store, image: Image
) -> None:
    store.tag("debian:bookworm", image)
    pinned = f"debian:bookworm@{image.manifest.digest}"
    assert load(project_dir, f'[images.web]\nfrom = "{pinned}"\n') == ""
    parent = load_project(project_dir).image("web").parent
    assert parent == pinned  # kept as written: the cache key holds it
    assert same(store.resolve(parent), image)


def test_the_issue_example_validates_as_the_build_tags(
    project_dir: Path, store: Store, image: Image
) -> None:
    text = '[images.web]\nfrom = "base:1"\ntag = "Registry.Example:5000/web:1"\n'
    assert load(project_dir, text) == ""
    tag = load_project(project_dir).image("web").tag
    assert tag == "registry.example:5000/web:1" == store.tag(tag, image)


def test_sysbake_validate_says_it_in_one_line(
    project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project_dir / "sysbake.toml").write_text(
        '[images.web]\nfrom = "base:1"\ntag = "reg.example/Web:1"\n'
    )
    assert cli.main(["validate"]) == 2
    assert capsys.readouterr().err == (
        "sysbake: error: sysbake.toml: images.web.tag: invalid path component 'Web' "
        f'{UPPER}: {PATH_ERROR}, got string "reg.example/Web:1"\n'
    )
    (project_dir / "sysbake.toml").write_text(
        '[images.web]\nfrom = "base:1"\ntag = "Reg.Example/web:1"\n'
    )
    assert cli.main(["validate", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"][0]["tag"] == "reg.example/web:1"


def test_two_tags_differing_in_host_case_are_one_tag(project_dir: Path) -> None:
    text = (
        '[images.a]\nfrom = "base:1"\ntag = "Reg.Example/web"\n'
        '[images.b]\nfrom = "base:1"\ntag = "reg.example/web:latest"\n'
    )
    assert load(project_dir, text) == (
        "sysbake.toml: images.b.tag: 'reg.example/web:latest' is also the tag of image 'a'"
    )


def test_a_digest_only_pull_is_stored_under_a_tag_the_store_takes(
    store: Store, image: Image
) -> None:
    ref = Reference.parse(f"reg.example:5000/web@{D1}", need_registry=True)
    assert ref.store_name() == f"reg.example:5000/web:sha256-{'1' * 64}"
    assert store.tag(ref.store_name(), image) == ref.store_name()
    assert Reference.parse("reg.example/web:2").store_name() == "reg.example/web:2"


def test_image_ids_still_resolve(store: Store, image: Image) -> None:
    assert same(store.resolve(image.id), image)
    assert same(store.resolve(image.id.removeprefix("sha256:")[:12]), image)
    assert same(store.resolve(image.manifest.digest), image)


@pytest.mark.parametrize(
    ("text", "domain"),
    [
        ("reg.example:5000", "reg.example:5000"),
        ("Reg.Example", "reg.example"),
        ("localhost", "localhost"),
        ("myhost", "myhost"),
        ("[::1]:443", "[::1]:443"),
    ],
)
def test_a_login_host_is_a_reference_domain(text: str, domain: str) -> None:
    assert parse_domain(text) == domain


@pytest.mark.parametrize(
    "text", ["", "reg.example/team", "bad host", "reg.example:0", "-reg", "reg..example", "[::1"]
)
def test_a_bad_login_host_is_refused(text: str) -> None:
    with pytest.raises(InvalidReference, match="expected HOST"):
        parse_domain(text)

"""The overlay mount's pure logic (sysbake.runtime.overlay): the layer stack, the new
mount API's parameters, the legacy options and their short names, the limits' errors.
The short-link maker runs on a temp dir; real mounts are in tests/integration/test_deep.py."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from sysbake.errors import RuntimeFailure
from sysbake.runtime import overlay

STORE = Path("/var/lib/sysbake")
UPPER = STORE / "containers/web-1/upper"
WORK = STORE / "containers/web-1/work"


def tree(i: int) -> str:
    """The tree path of a store layer (a sha256 hex name, as diff IDs give)."""
    return f"{STORE}/trees/{hashlib.sha256(str(i).encode()).hexdigest()}"


def trees(n: int) -> list[Path]:
    return [Path(tree(i)) for i in range(n)]


# -- the stack ----------------------------------------------------------------------------


def test_the_stack_is_top_first_absolute_and_each_layer_once() -> None:
    assert overlay.layer_stack([Path("/l/bottom"), Path("/l/mid"), Path("/l/top")]) == [
        "/l/top",
        "/l/mid",
        "/l/bottom",
    ]
    # A layer given twice (two steps that changed nothing) counts at its topmost place.
    assert overlay.layer_stack(["/l/a", "/l/b", "/l/a"]) == ["/l/a", "/l/b"]
    assert overlay.layer_stack(["rel"]) == [os.path.abspath("rel")]
    with pytest.raises(RuntimeFailure, match="at least one lower layer"):
        overlay.layer_stack([])


def test_500_layers_stack_and_501_are_one_clear_error() -> None:
    assert len(overlay.layer_stack(trees(500))) == 500
    # Duplicates do not count against the limit.
    assert len(overlay.layer_stack(trees(500) + trees(3))) == 500
    with pytest.raises(RuntimeFailure) as err:
        overlay.layer_stack(trees(501))
    message = str(err.value)
    assert message.startswith("501 layers are too many for one overlay mount")
    assert "at most 500" in message and "sysbake squash IMAGE NAME:TAG" in message
    assert "squash = true" in message and "\n" not in message


# -- the mode -----------------------------------------------------------------------------


def test_the_mode_setting() -> None:
    assert overlay.mount_mode({}) == "auto"
    assert overlay.mount_mode({overlay.MOUNT_ENV: ""}) == "auto"
    assert overlay.mount_mode({overlay.MOUNT_ENV: " legacy "}) == "legacy"
    assert overlay.mount_mode({overlay.MOUNT_ENV: "new"}) == "new"
    with pytest.raises(RuntimeFailure, match=r"SYSBAKE_OVERLAY_MOUNT=old: expected one of auto"):
        overlay.mount_mode({overlay.MOUNT_ENV: "old"})


# -- the new mount API ----------------------------------------------------------------------


def test_the_new_api_sets_each_layer_on_its_own_top_first() -> None:
    stack = overlay.layer_stack(trees(3))
    plan = overlay.fsconfig_plan(stack, UPPER, WORK)
    assert plan == [
        ("source", "overlay"),
        ("lowerdir+", tree(2)),
        ("lowerdir+", tree(1)),
        ("lowerdir+", tree(0)),
        ("upperdir", str(UPPER)),
        ("workdir", str(WORK)),
        ("redirect_dir", "off"),
        ("metacopy", "off"),
    ]


def test_the_new_api_has_no_page_limit() -> None:
    # 500 full paths are ~45 kB of names: each is a parameter of its own.
    plan = overlay.fsconfig_plan(overlay.layer_stack(trees(500)), UPPER, WORK)
    lowers = [value for key, value in plan if key == "lowerdir+"]
    assert len(lowers) == 500 and sum(map(len, lowers)) > 10 * 4096
    # Paths with ':' or ',' need no escaping there (each value is one path).
    assert ("lowerdir+", "/odd:dir,x") in overlay.fsconfig_plan(["/odd:dir,x"], UPPER, WORK)


# -- the legacy mount: short names in one page ----------------------------------------------


def test_short_names_are_prefixes_from_six_hex_digits() -> None:
    name = "0123456789abcdef"
    names = list(overlay.link_names(name))
    assert names[0] == "012345" and names[-1] == name
    assert [len(n) for n in names] == list(range(overlay.SHORT_NAME, len(name) + 1))


def test_short_links_live_beside_the_trees_dir() -> None:
    stack = overlay.layer_stack(trees(3))
    assert overlay.links_dir(stack) == STORE / "l"
    # Trees of two directories, or not named by hex digests: named by path instead.
    assert overlay.links_dir([tree(1), "/elsewhere/trees/" + "a" * 64]) is None
    assert overlay.links_dir([f"{STORE}/trees/layer-one"]) is None
    assert overlay.links_dir([f"{STORE}/trees/abc"]) is None  # shorter than a short name


def test_500_short_names_fit_in_a_page_where_500_paths_do_not() -> None:
    short = [os.path.basename(t)[: overlay.SHORT_NAME] for t in overlay.layer_stack(trees(500))]
    options = overlay.legacy_options(short, UPPER, WORK)
    assert len(options) < os.sysconf("SC_PAGE_SIZE")
    assert options.startswith(f"lowerdir={short[0]}:{short[1]}:")
    assert options.endswith(f",upperdir={UPPER},workdir={WORK},{overlay.FEATURES}")
    # Even with a longer name for every tenth layer (collisions), they still fit.
    longer = [n + "0" if i % 10 == 0 else n for i, n in enumerate(short)]
    assert len(overlay.legacy_options(longer, UPPER, WORK)) < os.sysconf("SC_PAGE_SIZE")


def test_past_a_page_the_legacy_mount_is_one_clear_error() -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    paths = overlay.layer_stack(trees(70))  # 70 full paths: ~5.4 kB
    with pytest.raises(RuntimeFailure) as err:
        overlay.legacy_options(paths, UPPER, WORK)
    message = str(err.value)
    assert message.startswith("70 layers do not fit in one overlay mount on this kernel")
    assert f"at most {page - 1}" in message and "sysbake squash" in message
    # The limit is the page: one byte under it mounts, the page itself does not.
    fixed = len(overlay.legacy_options(["a"], UPPER, WORK)) - 1
    fits = ["x" * (page - 1 - fixed)]
    assert len(overlay.legacy_options(fits, UPPER, WORK)) == page - 1
    with pytest.raises(RuntimeFailure, match=f"{page} bytes"):
        overlay.legacy_options([fits[0] + "x"], UPPER, WORK)


def test_legacy_names_with_separators_are_refused() -> None:
    with pytest.raises(RuntimeFailure, match="contains ':' or ','"):
        overlay.legacy_options(["/a:b"], UPPER, WORK)
    with pytest.raises(RuntimeFailure, match="contains ':' or ','"):
        overlay.legacy_options(["/a,b"], UPPER, WORK)


def test_the_path_form_keeps_its_old_contract() -> None:
    assert overlay.lowerdir_option([Path("/l/bottom"), Path("/l/top")]) == "/l/top:/l/bottom"
    with pytest.raises(RuntimeFailure, match="too many"):
        overlay.lowerdir_option(trees(60))


# -- the links themselves (a temp dir) --------------------------------------------------------


def test_a_short_link_is_made_once_and_reused(tmp_path: Path) -> None:
    links = tmp_path / "l"
    links.mkdir()
    target = str(tmp_path / "trees" / ("ab" * 32))
    assert overlay._short_link(links, target) == "ababab"
    assert os.readlink(links / "ababab") == target
    assert overlay._short_link(links, target) == "ababab"  # already there: the same name
    assert sorted(os.listdir(links)) == ["ababab"]


def test_a_taken_name_gives_a_longer_one(tmp_path: Path) -> None:
    links = tmp_path / "l"
    links.mkdir()
    (tmp_path / "trees").mkdir()
    first, second = (tmp_path / "trees" / f"abcdef{c * 58}" for c in "01")
    first.mkdir()
    second.mkdir()
    assert overlay._short_link(links, str(first)) == "abcdef"
    assert overlay._short_link(links, str(second)) == "abcdef1"
    # A file that is no link of ours is never taken over.
    (links / "abcdef2").write_text("not a link")
    third = tmp_path / "trees" / f"abcdef2{'3' * 57}"
    third.mkdir()
    assert overlay._short_link(links, str(third)) == "abcdef23"
    assert (links / "abcdef2").read_text() == "not a link"


def test_a_dangling_link_is_taken_over(tmp_path: Path) -> None:
    links = tmp_path / "l"
    links.mkdir()
    os.symlink(str(tmp_path / "trees" / "gone"), links / "cafeba")  # its tree was removed
    target = tmp_path / "trees" / ("cafeba" + "b" * 58)
    target.mkdir(parents=True)
    assert overlay._short_link(links, str(target)) == "cafeba"
    assert os.readlink(links / "cafeba") == str(target)
    assert sorted(os.listdir(links)) == ["cafeba"]  # no temp link left

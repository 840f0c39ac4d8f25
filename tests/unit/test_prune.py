"""prune_copy_ups: an upper dir keeps real changes only, and never loses a file that an
opaque directory would otherwise hide. Plain directories stand in for the overlay's
upper and lower dirs (user.overlay.* xattrs: no root needed)."""

from __future__ import annotations

import os
from pathlib import Path

from sysbake.build.steps import prune_copy_ups


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_unchanged_copy_ups_go_and_changes_stay(tmp_path: Path) -> None:
    lower = _tree(tmp_path / "lower", {"etc/a.conf": "a\n", "etc/b.conf": "b\n"})
    upper = _tree(
        tmp_path / "upper",
        {"etc/a.conf": "a\n", "etc/b.conf": "changed\n", "etc/new.conf": "new\n"},
    )
    prune_copy_ups(upper, [lower])
    assert _files(upper) == {"etc/b.conf", "etc/new.conf"}


def test_files_under_an_opaque_directory_stay(tmp_path: Path) -> None:
    # Salt removed /etc/app and wrote it again with one file unchanged: overlayfs marks
    # the new directory opaque, so the lower copy no longer shows through it.
    lower = _tree(
        tmp_path / "lower", {"etc/app/same.conf": "same\n", "etc/app/gone.conf": "gone\n"}
    )
    upper = _tree(
        tmp_path / "upper", {"etc/app/same.conf": "same\n", "etc/app/sub/deep.conf": "x\n"}
    )
    os.setxattr(upper / "etc" / "app", "user.overlay.opaque", b"y")
    prune_copy_ups(upper, [lower])
    assert _files(upper) == {"etc/app/same.conf", "etc/app/sub/deep.conf"}
    assert os.getxattr(upper / "etc" / "app", "user.overlay.opaque") == b"y"


def test_an_opaque_mark_with_nothing_below_is_dropped(tmp_path: Path) -> None:
    lower = _tree(tmp_path / "lower", {"etc/a.conf": "a\n"})
    upper = _tree(tmp_path / "upper", {"opt/new/file": "n\n"})
    os.setxattr(upper / "opt" / "new", "user.overlay.opaque", b"y")
    prune_copy_ups(upper, [lower])
    assert _files(upper) == {"opt/new/file"}
    assert "user.overlay.opaque" not in os.listxattr(upper / "opt" / "new")


def test_a_file_hidden_by_a_lower_layer_is_no_copy_up(tmp_path: Path) -> None:
    # The base has /etc/foo/x; a later layer replaced /etc/foo by a file (a whiteout hides
    # the same way); a step made /etc/foo/x again with the base's content. Overlayfs
    # never showed the base's copy: the step's file is a change and must stay.
    base = _tree(tmp_path / "base", {"etc/foo/x": "same\n", "etc/keep": "k\n"})
    middle = _tree(tmp_path / "middle", {"etc/foo": "now a file\n"})
    upper = _tree(tmp_path / "upper", {"etc/foo/x": "same\n", "etc/keep": "k\n"})
    prune_copy_ups(upper, [base, middle])
    assert _files(upper) == {"etc/foo/x"}


def test_an_opaque_lower_directory_hides_the_layers_below(tmp_path: Path) -> None:
    base = _tree(tmp_path / "base", {"etc/foo/x": "same\n"})
    middle = _tree(tmp_path / "middle", {"etc/foo/other": "o\n", "etc/bar/y": "y\n"})
    os.setxattr(middle / "etc" / "foo", "user.overlay.opaque", b"y")
    upper = _tree(tmp_path / "upper", {"etc/foo/x": "same\n", "etc/bar/y": "y\n"})
    prune_copy_ups(upper, [base, middle])
    assert _files(upper) == {"etc/foo/x"}

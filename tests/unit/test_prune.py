"""prune_copy_ups: an upper dir keeps real changes only, and never loses a file that an
opaque directory would otherwise hide. Plain directories stand in for the overlay's
upper and lower dirs (user.overlay.* xattrs: no root needed)."""

from __future__ import annotations

import os
from pathlib import Path

from sysbake.provision import prune_copy_ups


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
    upper = _tree(tmp_path / "upper", {"etc/a.conf": "a\n", "etc/b.conf": "changed\n",
                                       "etc/new.conf": "new\n"})
    prune_copy_ups(upper, [lower])
    assert _files(upper) == {"etc/b.conf", "etc/new.conf"}


def test_files_under_an_opaque_directory_stay(tmp_path: Path) -> None:
    # Salt removed /etc/app and wrote it again with one file unchanged: overlayfs marks
    # the new directory opaque, so the lower copy no longer shows through it.
    lower = _tree(tmp_path / "lower", {"etc/app/same.conf": "same\n",
                                       "etc/app/gone.conf": "gone\n"})
    upper = _tree(tmp_path / "upper", {"etc/app/same.conf": "same\n",
                                       "etc/app/sub/deep.conf": "x\n"})
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

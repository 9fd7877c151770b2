"""deploy/app_copy.py: the folder ``flwr run`` is given holds exactly the app's FAB files, so
the FAB it builds is the one Flower builds from the app's own folder, byte for byte."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from deploy.app_copy import app_files, copy_app, fab_paths

REPO = Path(__file__).resolve().parent.parent
# Flower builds its pathspecs with pathspec's deprecated 'gitwildmatch' name, once a pattern
pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")


def test_the_copy_of_this_app_builds_flowers_fab_of_it_byte_for_byte(tmp_path):
    copy = copy_app(REPO, tmp_path / "app")
    assert build_fab_from_disk(copy) == build_fab_from_disk(REPO)
    assert {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()} == set(
        fab_paths(REPO))


def small_app(root: Path, gitignore: str) -> Path:
    """An app folder with what a user's has around the code: a virtual environment, caches,
    ignored outputs, results the FAB leaves out, a symlink out of the folder."""
    (root / "pyproject.toml").parent.mkdir(parents=True)
    shutil.copyfile(REPO / "pyproject.toml", root / "pyproject.toml")
    (root / ".gitignore").write_text(gitignore)
    files = {
        "fl_app/__init__.py": "", "fl_app/sub/deep.py": "x = 1\n", "fl_common/a.py": "a = 2\n",
        "strategies/s.py": "s = 3\n", "partitions/p.py": "p = 4\n",
        "fl_app/__pycache__/b.py": "stale = True\n",  # Flower's publish rules drop it
        ".venv/lib/site.py": "venv = True\n", ".flwr/apps/x.py": "",
        "build/fl_app/old.py": "old = True\n",  # ignored as a folder by the .gitignore
        "results/run/summary.json": "{}", "docs/notes.md": "notes\n",
        "fl_app/generated/gen.py": "gen = True\n",  # ignored as a folder by two of the cases
        "fl_app/generated/keep.py": "kept = True\n",  # re-included by the negation case
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    outside = root.parent / "outside.py"
    outside.write_text("secret = 1\n")
    os.symlink(outside, root / "fl_app" / "link.py")  # Flower skips symlinks
    return root


@pytest.mark.parametrize(("gitignore", "generated"), [
    ("build/\nfl_app/generated/\n/results/\n*.pyc\n", set()),
    # a negation (Flower matches file by file, so it re-includes keep.py): walk every folder
    ("fl_app/generated/\n!fl_app/generated/keep.py\n", {"keep.py"}),
    ("", {"gen.py", "keep.py"}),
])
def test_the_copy_of_an_app_with_clutter_builds_the_same_fab(tmp_path, gitignore, generated):
    app = small_app(tmp_path / "user-app", gitignore)
    copy = copy_app(app, tmp_path / "copy")
    assert build_fab_from_disk(copy) == build_fab_from_disk(app)
    kept = fab_paths(app)
    assert "fl_app/sub/deep.py" in kept and "fl_app/link.py" not in kept
    assert {rel.rsplit("/", 1)[1] for rel in kept if rel.startswith("fl_app/generated/")} == generated


def test_the_folders_flower_drops_are_not_walked(tmp_path):
    """The point of the copy: nothing under .venv/ (or an ignored folder) is listed."""
    app = small_app(tmp_path / "user-app", "build/\nfl_app/generated/\n")
    listed = set(app_files(app))
    assert not any(rel.startswith((".venv/", ".flwr/", "build/", "fl_app/generated/")) or "__pycache__" in rel
                   for rel in listed), sorted(listed)
    assert {"fl_app/sub/deep.py", "docs/notes.md", "results/run/summary.json"} <= listed


def test_a_folder_that_is_no_app_or_a_copy_over_files_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no pyproject.toml"):
        fab_paths(tmp_path / "empty")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("a user's file\n")
    with pytest.raises(ValueError, match="is not empty"):
        copy_app(REPO, tmp_path / "busy")
    assert (tmp_path / "busy" / "mine.txt").read_text() == "a user's file\n"

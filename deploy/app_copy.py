"""The files of an app's FAB, copied to a folder of their own, for ``flwr run`` to build from.

Flower 1.42's ``flwr run <folder>`` builds the FAB by listing every file under the folder
and only then filtering the list (``flwr/cli/utils.py``: ``collect_files`` walks the tree
and resolves each file's path; ``filter_paths_for_publish`` and ``get_filtered_fab_paths``
in ``flwr/cli/build.py`` apply ``.gitignore``, the publish patterns and ``fab-include``).
The README's setup puts the virtual environment in the app's folder, so every ``flwr run``
of this app first lists the ~58,800 files of ``.venv`` (PyTorch, Ray, ...) to keep 53 of
them (docs/benchmarks/fab_build.jsonl has what that costs).

``copy_app`` finds the same files without entering the folders that cannot contribute
(those Flower's publish rules exclude outright, ``.venv/``, ``.flwr/`` and
``__pycache__/``, and those the app's ``.gitignore`` ignores as folders, unless it has
negations), passes them through Flower's own filters and copies what they keep into a
folder of its own, from which ``flwr run`` builds the same FAB, byte for byte
(tests/test_app_copy.py) in a fraction of the time. The tools that run the app
(deploy.launch.LocalSuperLink, hence the tests, deploy.local and the experiments runner)
submit the copy; a user's own ``flwr run .`` is Flower's, untouched.
"""

from __future__ import annotations

import os
import shutil
import tomllib
import warnings
from pathlib import Path

from flwr.cli.build import get_filtered_fab_paths
from flwr.cli.utils import (
    APP_PUBLISH_EXCLUDE_PATTERNS,
    build_pathspec,
    filter_paths_for_publish,
    load_gitignore_patterns,
)

FAB_CONFIG_FILE = "pyproject.toml"


def app_files(app: Path) -> dict[str, Path]:
    """Every file under ``app`` that Flower's FAB build could keep, by POSIX path
    relative to ``app`` (Flower's ``collect_files``, less the folders it is sure to drop):
    symlinks, and paths that resolve outside ``app``, are left out as Flower leaves them."""
    root = app.expanduser().resolve()
    excluded = build_pathspec(APP_PUBLISH_EXCLUDE_PATTERNS)  # '.venv/**', ... : all they hold
    patterns = load_gitignore_patterns(root / ".gitignore")
    # A folder .gitignore ignores holds nothing Flower keeps, unless a negation re-includes
    # a file in it (Flower matches file by file, git would not): then walk everything.
    ignored = None if any(p.startswith("!") for p in patterns) else build_pathspec(patterns)
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [d for d in dirnames
                       if not excluded.match_file(f"{prefix}{d}/x")
                       and not (ignored is not None and ignored.match_file(f"{prefix}{d}/"))]
        for filename in filenames:
            path = here / filename
            if path.is_symlink() or not path.resolve().is_relative_to(root):
                continue
            files[prefix + filename] = path
    return files


def fab_paths(app: Path) -> dict[str, Path]:
    """The files ``flwr run`` / ``flwr build`` put in ``app``'s FAB (and the
    ``.gitignore`` that filtered them), by relative path, chosen by Flower's own filters."""
    files = filter_paths_for_publish(app_files(app))
    if FAB_CONFIG_FILE not in files:
        raise ValueError(f"{app} has no {FAB_CONFIG_FILE} (or its .gitignore excludes it): "
                         f"it is not a Flower app folder")
    config = tomllib.loads(files[FAB_CONFIG_FILE].read_text(encoding="utf-8"))
    keep = [FAB_CONFIG_FILE, *get_filtered_fab_paths(dict(files), config)]
    if ".gitignore" in files:
        keep.append(".gitignore")
    return {rel: files[rel] for rel in keep}


def copy_app(app: Path, into: Path) -> Path:
    """Copy ``app``'s FAB files into the empty or new folder ``into``; returns ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    if any(into.iterdir()):
        raise ValueError(f"{into} is not empty: copy_app writes an app folder of its own")
    with warnings.catch_warnings():  # Flower's pathspec calls warn, once a pattern, that
        warnings.filterwarnings("ignore", "GitWildMatchPattern", DeprecationWarning)
        paths = fab_paths(app)  # the name 'gitwildmatch' is deprecated
    for rel, source in paths.items():
        target = into / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return into

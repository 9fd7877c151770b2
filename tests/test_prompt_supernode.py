"""deploy/prompt_supernode.py: Flower's SuperNode with its idle waits capped.

The cap reaches the module Flower's pull loop reads ``time`` from, every other ``time``
function is the real one, a bad value or a Flower without the waits is refused, and the
launcher keeps the name ``flower-supernode`` (fl_app/node_runtime.py counts SuperNodes by
it). A deployed run with the launcher is in tests/test_deployment.py (FedPer/FedLoRA).
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import time

import pytest

from deploy import prompt_supernode as ps


def test_the_waits_of_flowers_pull_loop_are_capped(monkeypatch):
    module = importlib.import_module(ps.MODULE)
    monkeypatch.setattr(module, "time", module.time)  # restored after the test
    monkeypatch.setattr(module, "pull_objects", module.pull_objects)
    ps.shorten_waits(module, 0.05)
    start = time.monotonic()
    module.time.sleep(3)  # the SuperNode's wait after an empty pull
    module.time.sleep(0.5)  # its wait for a reply
    assert time.monotonic() - start < 0.5
    assert module.time.time is time.time and module.time.monotonic is time.monotonic
    # an object pull that misses retries after the cap, not Flower's 1 s
    assert module.pull_objects.keywords == {"initial_backoff": 0.05}
    assert module.pull_objects.func.__name__ == "pull_objects"
    short = time.monotonic()
    module.time.sleep(0.01)  # shorter waits are left as they are
    assert 0.009 < time.monotonic() - short < 0.2


def test_a_flower_without_those_waits_is_refused(tmp_path):
    """Another Flower's loop (here one that waits 5 s): refused by name, left unpatched."""
    path = tmp_path / "start_client_internal_other.py"
    path.write_text("import time\n\n\ndef loop():\n    time.sleep(5)\n")
    spec = importlib.util.spec_from_file_location("start_client_internal_other", path)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    with pytest.raises(RuntimeError, match=r"does not have the waits .* \(missing: "
                                           r"time.sleep\(3\), time.sleep\(0.5\), pull_objects"):
        ps.shorten_waits(other, 0.2)
    assert other.time is time


@pytest.mark.parametrize("raw", ["0", "-1", "4", "soon"])
def test_a_bad_cap_is_refused_with_what_is_accepted(raw):
    with pytest.raises(ValueError, match=r"FL_APP_SUPERNODE_PULL_SECONDS must be a number of "
                                         r"seconds in \(0, 3\]"):
        ps.pull_seconds({ps.PULL_ENV: raw})
    assert ps.pull_seconds({}) == ps.DEFAULT_SECONDS
    assert ps.pull_seconds({ps.PULL_ENV: "0.5"}) == 0.5


def test_the_launcher_is_named_flower_supernode_and_runs_flowers_cli(tmp_path):
    script = ps.install_launcher(tmp_path / "bin")
    assert script.name == "flower-supernode"
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--superlink" in proc.stdout


def test_reinstalling_the_launcher_never_shows_a_starting_process_an_empty_script(tmp_path):
    """LocalSuperLink installs the launcher again for each SuperNode it starts. Written in
    place (truncate, then write), a SuperNode started a moment before could open it
    empty and run nothing, exiting 0 without a line (a CI run under load: two of three
    SuperNodes never connected and the run waited). A reader that opens the script while
    it is rewritten as fast as possible must always find the whole of it."""
    import threading

    from deploy.warm_clientapp import install_shim

    for install in (lambda: ps.install_launcher(tmp_path / "bin"),
                    lambda: install_shim(tmp_path / "shim", tmp_path / "s.sock", real="/bin/true")):
        script = install()
        whole, seen, stop = script.read_text(), [], threading.Event()

        def rewrite(install=install) -> None:
            while not stop.is_set():
                install()

        writer = threading.Thread(target=rewrite)
        writer.start()
        try:
            for _ in range(3000):
                seen.append(script.read_text())
        finally:
            stop.set()
            writer.join()
        assert all(text == whole for text in seen), sorted({len(t) for t in seen})
        assert script.stat().st_mode & 0o100 and not list(script.parent.glob("*.tmp"))


def test_a_warm_child_under_a_prompt_supernode_retries_its_object_pull_promptly(monkeypatch):
    """The SuperNode creates a message's task before it has pulled the message's objects,
    so a promptly started ClientApp can ask first and wait Flower's 1 s. A warm child
    whose SuperNode has the cap set retries after the cap; without it, nothing changes."""
    from deploy import warm_clientapp

    module = importlib.import_module(ps.CLIENTAPP_MODULE)
    original = module.pull_and_inflate_object_from_tree
    monkeypatch.setattr(module, "pull_and_inflate_object_from_tree", original)
    monkeypatch.delenv(ps.PULL_ENV, raising=False)
    warm_clientapp._prompt_object_pull()
    assert module.pull_and_inflate_object_from_tree is original
    monkeypatch.setenv(ps.PULL_ENV, "0.3")
    warm_clientapp._prompt_object_pull()
    patched = module.pull_and_inflate_object_from_tree
    assert patched.func is original and patched.keywords == {"initial_backoff": 0.3}

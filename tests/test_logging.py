"""Each log line once, with DP's Opacus imported (it calls logging.basicConfig)."""

from __future__ import annotations

import subprocess
import sys


def test_a_log_line_is_printed_once_after_opacus_is_imported():
    code = ("import logging; import fl_app.privacy, strategies.user_dp; "
            "from flwr.supercore import log; log(logging.INFO, 'exactly-once')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (out.stdout + out.stderr).count("exactly-once") == 1, out.stderr[-2000:]

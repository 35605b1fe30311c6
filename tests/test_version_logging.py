"""`mmrlsd --version`, and logging configured on the `mmrlsd` logger only (other libraries' records print once)."""

import subprocess
import sys

from mmrlsd import __version__


def test_version():
    r = subprocess.run([sys.executable, "-m", "mmrlsd", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"mmrlsd {__version__}"
    assert __version__[0].isdigit()


def test_logging_is_configured_on_the_mmrlsd_logger_only():
    code = """
import logging
from mmrlsd.cli import setup_logging
setup_logging()
setup_logging()  # idempotent: still one handler
other = logging.getLogger("thirdparty")
other.addHandler(logging.StreamHandler())  # a library with its own handler that propagates to the root
other.warning("library says hi")
logging.getLogger("mmrlsd.train").info("ours")
logging.getLogger("mmrlsd.train").debug("hidden")
print(len(logging.getLogger().handlers), len(logging.getLogger("mmrlsd").handlers))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "1"]
    assert r.stderr.count("library says hi") == 1
    assert r.stderr.count("INFO mmrlsd.train: ours") == 1 and "hidden" not in r.stderr


def test_the_log_handler_follows_a_replaced_stderr(monkeypatch):
    """The CLI may run several times in one process with `sys.stderr` swapped in between (tests, notebooks): the
    handler writes to the current one, never to a closed stream."""
    import io
    import logging

    from mmrlsd.cli import setup_logging

    setup_logging()
    for _ in range(2):
        buf = io.StringIO()
        monkeypatch.setattr(sys, "stderr", buf)
        logging.getLogger("mmrlsd.x").warning("to the current stderr")
        assert "WARNING mmrlsd.x: to the current stderr" in buf.getvalue()

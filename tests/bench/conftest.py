"""Fixtures for the benchmark tests: the reference files (two tiers) and adversarial model outputs.

* `eval/fixtures/<bench>/`: small subsets of the official files, in the repository; every parity test runs
  on them (`TIERS[0]`), so a clone alone runs the whole suite.
* the full official files, in a folder named by ``$MMRLSD_EVAL_REFERENCE`` (same layout as `eval/fixtures`,
  see `eval/fixtures/README.md`): the same tests again plus the whole-file checks (published totals, every
  breakdown), all marked `reference_files`. Without the variable they are deselected, not skipped; with it
  set to a folder that lacks a file, they fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from reference_files import REFERENCE_ENV, reference_root


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The full reference folder, for tests marked `reference_files`."""
    return reference_root()


def pytest_collection_modifyitems(config, items):
    """Deselect the `reference_files` tests when `$MMRLSD_EVAL_REFERENCE` is unset (a clone without them)."""
    if os.environ.get(REFERENCE_ENV):
        return
    drop = [item for item in items if item.get_closest_marker("reference_files")]
    if drop:
        items[:] = [item for item in items if not item.get_closest_marker("reference_files")]
        config.hook.pytest_deselected(items=drop)


ADVERSARIAL = {
    "huge_text": "the answer is " * 20_000,  # 280k chars
    "huge_digits": "9" * 200_000,
    "digits_then_comma": "1" * 100_000 + ",",
    "digits_then_e": "1" * 100_000 + "e",
    "power_tower": "9**9**9**9",
    "malformed_latex": "\\boxed{\\frac{1}{" * 5_000,
    "nested_braces": "\\boxed{" + "{" * 50_000 + "}" * 50_000 + "}",
    "many_quick_openings": 'The answer is "' * 10_000,
    "replacement_chars": "\ufffd\ufffd(A)\ufffd",
    "nul_and_controls": "\x00\x01answer: \x7f",
    "empty": "",
    "nan_inf": "nan inf -inf 1e999",
}


@pytest.fixture(params=sorted(ADVERSARIAL))
def adversarial(request) -> tuple[str, str]:
    """(name, response) for each adversarial response."""
    return request.param, ADVERSARIAL[request.param]


@pytest.fixture(scope="session", autouse=True)
def _mathv_private_site():
    """Install MATH-V's pinned latex2sympy2/antlr4 into its private folder once (idempotent, ~15 s the first
    time), so the MATH-V tests and the end-to-end eval test find it; when that is impossible (no pip/network) the
    tests that need it skip or report the setup command themselves."""
    from mmrlsd.bench import _mathv_equal as eq

    site = eq.default_site()
    if not eq.site_ready(site):
        try:
            eq.install_site(site)
        except Exception:  # noqa: BLE001 - reported by the tests that need it
            pass

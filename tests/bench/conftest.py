"""Fixtures for the benchmark tests: the shared reference data and adversarial model outputs."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def benchdata(shared_dir: Path) -> Path:
    """`../shared/benchdata` (skips with the reason when `../shared` is absent)."""
    return shared_dir / "benchdata"


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

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

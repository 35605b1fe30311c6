"""Where the benchmark tests find reference files: the in-repo subsets (`eval/fixtures`) and, optionally, the
full official files (`$MMRLSD_EVAL_REFERENCE`). Imported by `conftest.py` and the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "eval" / "fixtures"
REFERENCE_ENV = "MMRLSD_EVAL_REFERENCE"
TIERS = ["fixtures", pytest.param("reference", marks=pytest.mark.reference_files)]
"""Parameters of a fixture that runs a test on the in-repo subsets and, when present, on the full files."""


def reference_root() -> Path:
    """The folder of the full official files (`$MMRLSD_EVAL_REFERENCE`); fails when it is not there."""
    value = os.environ.get(REFERENCE_ENV, "")
    if not value or not Path(value).is_dir():
        pytest.fail(f"${REFERENCE_ENV}={value!r} is not a folder with the full official reference files")
    return Path(value)


def tier_root(tier: str) -> Path:
    """`eval/fixtures` for tier "fixtures", the full reference folder for tier "reference"."""
    return FIXTURES if tier == "fixtures" else reference_root()

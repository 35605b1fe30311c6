"""Benchmark evaluators, registered by name (`mmrlsd eval --bench NAME`).

Importing this package imports every benchmark module, which fills `BENCHES`.
"""

from mmrlsd.bench.base import BENCHES, Bench, get_bench, register

for _module in ("mathvista", "mmmu", "mathvision", "wemath"):  # TODO: plain imports once all four exist
    try:
        __import__(f"mmrlsd.bench.{_module}")
    except ModuleNotFoundError as _e:  # pragma: no cover
        if _e.name != f"mmrlsd.bench.{_module}":
            raise

__all__ = ["BENCHES", "Bench", "get_bench", "register"]

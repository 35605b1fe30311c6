"""Benchmark evaluators, registered by name (`mmrlsd eval --bench NAME`).

Importing this package imports every benchmark module, which fills `BENCHES`.
"""

from mmrlsd.bench import mathvision, mathvista, mmmu, wemath, zerobench  # noqa: F401  (registers the benchmarks)
from mmrlsd.bench.base import BENCHES, Bench, get_bench, register

__all__ = ["BENCHES", "Bench", "get_bench", "register"]

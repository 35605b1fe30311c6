"""Benchmark evaluators, registered by name (`mmrlsd eval --bench NAME`).

Importing this package imports every benchmark module, which fills `BENCHES`.
"""

from mmrlsd.bench.base import BENCHES, Bench, get_bench, register

from mmrlsd.bench import mathvista, mmmu  # noqa: F401  (registers)

try:  # written in parallel; becomes a plain import once both exist
    from mmrlsd.bench import mathvision, wemath  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["BENCHES", "Bench", "get_bench", "register"]

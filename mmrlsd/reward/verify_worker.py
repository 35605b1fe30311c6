"""The math-equivalence worker: a standalone script that `mmrlsd.reward.verify` runs as a child process.

It imports only the standard library, math-verify, mathruler and sympy (never mmrlsd, torch or the parent's
``__main__``), so a restart costs one interpreter start plus those imports (about a second),
and the parent can kill it at any moment without losing anything.

Protocol, over two pipes wrapped in `multiprocessing.connection.Connection` (JSON bytes, never pickle):

* worker -> parent, once at start: ``{"ready": true, "engine": "math_verify" | "sympy" | "string"}``
* parent -> worker: ``{"id": <int>, "pairs": [[pred, gold], ...], "grader": "math_verify" | "mathruler"}``
  (``grader`` may be absent: math-verify; ``mathruler`` is the `unified` reward's `grade_answer`, imported on
  first use)
* worker -> parent, one message per pair, in order: ``[id, index, true | false]``

The worker exits when the request pipe closes (the parent is gone) or, on Linux, when the parent dies.
The symbolic check has no time limit of its own: the parent kills the worker when an item runs too long.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import warnings
from multiprocessing.connection import Connection

ENGINE = "string"
try:  # the engine: math-verify (symbolic + numeric comparison on sympy)
    from math_verify import parse, verify

    ENGINE = "math_verify"
except Exception:  # pragma: no cover - exercised only where math-verify is not installed
    try:
        import latex2sympy2_extended  # noqa: F401

        ENGINE = "sympy"
    except Exception:
        pass


def _boxed(s: str) -> str:
    # Answers arrive already extracted; boxing them makes math-verify's LaTeX extractor take the whole
    # string (bare "x+1" or "{1,2}" would otherwise not be extracted at all).
    return "\\boxed{" + s.replace("$", "") + "}"


_GOLD_CACHE: dict[str, list] = {}  # the G samples of a prompt share its gold answer: parse it once


def math_verify_equal(pred: str, gold: str) -> bool:
    """math-verify's verdict on (pred, gold), with its signal-based timeouts off (the parent times us)."""
    gold_parsed = _GOLD_CACHE.get(gold)
    if gold_parsed is None:
        if len(_GOLD_CACHE) >= 4096:
            _GOLD_CACHE.clear()
        gold_parsed = _GOLD_CACHE[gold] = parse(_boxed(gold), parsing_timeout=None)
    pred_parsed = parse(_boxed(pred), parsing_timeout=None)
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def sympy_equal(pred: str, gold: str) -> bool:
    """Fallback when math-verify is missing: parse both as LaTeX (latex2sympy2, no eval) and test a-b == 0."""
    import sympy
    from latex2sympy2_extended import latex2sympy

    a, b = latex2sympy(pred), latex2sympy(gold)
    return bool(sympy.simplify(a - b) == 0)


def string_equal(pred: str, gold: str) -> bool:
    """Last resort: whitespace-insensitive string equality."""
    return "".join(pred.split()) == "".join(gold.split()) != ""


def mathruler_equal(pred: str, gold: str) -> bool:
    """`mathruler.grader.grade_answer(pred, gold)`: normalised-string equality, else sympy simplification of
    the difference (mathruler only lets expressions with at most two distinct letters reach sympy's parser)."""
    from mathruler.grader import grade_answer

    return bool(grade_answer(pred, gold))


def equal(pred: str, gold: str, grader: str = "math_verify") -> bool:
    """The grader's verdict; any exception (MemoryError, RecursionError, parse errors) is False."""
    try:
        if grader == "mathruler":
            return mathruler_equal(pred, gold)
        if ENGINE == "math_verify":
            return math_verify_equal(pred, gold)
        if ENGINE == "sympy":
            return string_equal(pred, gold) or sympy_equal(pred, gold)
        return string_equal(pred, gold)
    except Exception:  # MemoryError and RecursionError included: a bad string must not kill the worker
        return False


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the parent dies, so that a busy worker cannot outlive training."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except Exception:
        pass


def serve(requests: Connection, results: Connection) -> None:
    """Answer requests until the request pipe closes."""
    equal("1", "1")  # warm-up: math-verify builds its parsers lazily on the first call
    equal("x/2", "0.5*x", "mathruler")  # and mathruler's first sympy parse (~0.1 s): not inside a pair's time limit
    results.send_bytes(json.dumps({"ready": True, "engine": ENGINE}).encode())
    while True:
        try:
            request = json.loads(requests.recv_bytes())
        except (EOFError, OSError):
            return
        grader = request.get("grader", "math_verify")
        for index, (pred, gold) in enumerate(request["pairs"]):
            results.send_bytes(json.dumps([request["id"], index, equal(pred, gold, grader)]).encode())


def main(argv: list[str]) -> None:
    read_fd, write_fd, memory_limit = int(argv[1]), int(argv[2]), int(argv[3])
    _die_with_parent()
    if memory_limit > 0:  # a runaway bignum gets a MemoryError instead of eating the machine
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    logging.disable(logging.CRITICAL)  # math-verify warns about disabled timeouts on every start
    warnings.filterwarnings("ignore")  # nor should sympy deprecation warnings reach the training log
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    serve(Connection(read_fd, writable=False), Connection(write_fd, readable=False))


if __name__ == "__main__":
    main(sys.argv)

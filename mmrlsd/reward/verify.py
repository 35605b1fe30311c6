r"""Math equivalence with a hard time limit: cheap checks here, math-verify in a killable worker process.

``math_equal_batch(preds, golds, timeout)`` is what the reward and the benchmarks call. Each pair is
decided by the first rule that applies:

1. not a string, empty, longer than `MAX_ANSWER_CHARS` (1,000) characters, or brackets nested deeper
   than `MAX_NESTING` (10) -> False. (math-verify's LaTeX parser is exponential in nesting depth:
   ``{{{{1}}}}`` takes ~0.5 s, depth 10 ~3 s, depth 20 does not finish; real answers nest 1-3 deep);
2. equal after `strip_latex` and removing all whitespace -> True (``3.`` vs ``3``, ``30^\circ`` vs ``30``);
3. both plain numbers (`parse_number`): equal values -> True (``3.0`` vs ``3``); both integers and
   unequal -> False;
4. otherwise math-verify decides, in the worker (``\frac{1}{2}`` vs ``0.5``, ``2\sqrt{2}`` vs
   ``\sqrt{8}``, ``x+1`` vs ``1+x``, ``{1,2}`` vs ``{2,1}``). Following math-verify, a percentage equals
   both its number and its fraction: ``50\%`` matches ``50`` and ``0.5``. Floats agree when they agree
   to 6 decimals (``\pi`` vs ``3.14159265`` is True, ``3.14159`` vs ``3.1416`` is False). No answer in
   the worker may take longer than ``timeout`` seconds: the worker is then killed and restarted, and
   that pair is False. Any error is False.

`grade_answer_batch(preds, golds, timeout)` runs mathruler's ``grade_answer`` (the `unified` reward's grader)
in the same worker under the same per-pair limit.

Rules 1-3 run in the calling process, without IPC. All pairs left for rule 4 go to the worker in one
message, and it streams back one verdict per pair, so the time limit applies to each pair.

Why a subprocess running `verify_worker.py` rather than `multiprocessing`: math-verify's own timeouts
use ``signal.alarm`` (main thread only) and cannot interrupt a long C-level bignum operation, so only
killing a process is a hard limit; ``fork`` would copy a parent that holds torch and CUDA state; and
``spawn``/``forkserver`` children re-import the parent's ``__main__``. Measured on the 2-core dev box
under load (load average ~9), with a parent script that imports torch at the top: spawn 10.8-12.5 s,
forkserver 9.6-10.3 s, a fresh ``python verify_worker.py`` 2.6-2.9 s to ready (~1.1 s unloaded). The
start-up is paid once, and again only after a timeout: the restart begins at once, in the background,
and from the first restart on a warm spare worker waits, so later timeouts cost only the timeout.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from multiprocessing.connection import Connection
from pathlib import Path

from mmrlsd.reward.answer import parse_number, strip_latex

__all__ = [
    "MAX_ANSWER_CHARS",
    "MAX_NESTING",
    "MathChecker",
    "grade_answer_batch",
    "math_equal",
    "math_equal_batch",
    "quick_equal",
]

MAX_ANSWER_CHARS = 1000
MAX_NESTING = 10
DEFAULT_TIMEOUT = 5.0
_WORKER = Path(__file__).with_name("verify_worker.py")


def nesting_depth(s: str) -> int:
    r"""Deepest nesting of ``{}``, ``()`` and ``[]`` together (closers never go below 0).

    >>> nesting_depth(r"\frac{\sqrt{3}}{2}"), nesting_depth("(1, 2]"), nesting_depth("x")
    (2, 1, 0)
    """
    depth = deepest = 0
    for ch in s:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]" and depth:
            depth -= 1
    return deepest


def quick_equal(pred: object, gold: object) -> bool | None:
    r"""Rules 1-3 of the module docstring: True/False when decided cheaply, None when the worker must decide.

    >>> quick_equal("3.0", "3"), quick_equal("2", "3"), quick_equal(r"\frac{1}{2}", "0.5")
    (True, False, None)
    >>> quick_equal(None, "1"), quick_equal("", "1"), quick_equal("9" * 1001, "1"), quick_equal("{" * 11, "1")
    (False, False, False, False)
    """
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    if nesting_depth(pred) > MAX_NESTING or nesting_depth(gold) > MAX_NESTING:
        return False
    p, g = "".join(strip_latex(pred).split()), "".join(strip_latex(gold).split())
    if not p or not g:
        return False
    if p == g:
        return True
    p_num, g_num = parse_number(p), parse_number(g)
    if p_num is not None and g_num is not None:
        if p_num == g_num:
            return True
        if "." not in p and "." not in g:
            return False
    return None


class _Worker:
    """One running `verify_worker.py` and the two pipes to it."""

    def __init__(self, memory_limit_bytes: int) -> None:
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        args = [sys.executable, str(_WORKER), str(to_worker_r), str(from_worker_w), str(memory_limit_bytes)]
        try:
            self.proc = subprocess.Popen(
                args, pass_fds=(to_worker_r, from_worker_w), stdin=subprocess.DEVNULL, env=env
            )
        except BaseException:
            os.close(to_worker_w)
            os.close(from_worker_r)
            raise
        finally:  # the child holds its own copies
            os.close(to_worker_r)
            os.close(from_worker_w)
        self.requests = Connection(to_worker_w, readable=False)
        self.results = Connection(from_worker_r, writable=False)
        self.owner, self.started = os.getpid(), time.monotonic()
        self.engine: str | None = None
        self.startup_s: float | None = None  # seconds from launch to ready; None until ready

    def wait_ready(self, timeout: float) -> None:
        """Block until the worker has imported its engine; raise RuntimeError if it cannot."""
        if self.startup_s is not None:
            return
        try:
            if not self.results.poll(max(0.0, self.started + timeout - time.monotonic())):
                raise TimeoutError(f"not ready within {timeout:.0f} s")
            hello = json.loads(self.results.recv_bytes())
        except (EOFError, OSError, TimeoutError, ValueError) as e:
            self.stop()
            raise RuntimeError(f"math-equivalence worker {_WORKER} failed to start: {e!r}") from e
        self.engine, self.startup_s = hello["engine"], time.monotonic() - self.started

    def stop(self, kill: bool = True) -> None:
        """Close our pipe ends and kill the process (``kill=False``: a forked child drops its copies)."""
        self.requests.close()
        self.results.close()
        if kill and self.owner == os.getpid():
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()


class MathChecker:
    """Owns the worker process; `check` sends it pairs and enforces the per-pair time limit.

    After the first restart a spare worker is kept warm, so that later timeouts cost only the
    timeout, not another start-up. Thread-safe (one lock). After a fork the child starts its own
    worker. `close()` (also run at interpreter exit for the shared default checker) kills them.
    """

    def __init__(self, startup_timeout: float = 120.0, memory_limit_bytes: int = 2 << 30) -> None:
        self.startup_timeout = startup_timeout
        self.memory_limit_bytes = memory_limit_bytes
        self.restarts = 0  # workers killed after a timeout or a crash
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self._spare: _Worker | None = None
        self._batch_id = 0

    @property
    def pid(self) -> int | None:
        """Process id of the current worker, if one is running."""
        return None if self._worker is None else self._worker.proc.pid

    @property
    def pids(self) -> list[int]:
        """Process ids of all workers this checker holds (current and spare)."""
        return [w.proc.pid for w in (self._worker, self._spare) if w is not None]

    @property
    def engine(self) -> str | None:
        """The worker's engine: "math_verify", or a fallback ("sympy", "string") where it is missing."""
        return None if self._worker is None else self._worker.engine

    def _drop_all(self) -> None:
        for w in (self._worker, self._spare):
            if w is not None:
                w.stop()
        self._worker = self._spare = None

    def _ready_worker(self) -> _Worker:
        if self._worker is not None and self._worker.owner != os.getpid():  # forked: not ours
            for w in (self._worker, self._spare):
                if w is not None:
                    w.stop(kill=False)
            self._worker = self._spare = None
        if self._worker is None:
            self._worker = _Worker(self.memory_limit_bytes)
        try:
            self._worker.wait_ready(self.startup_timeout)
        except RuntimeError:
            self._worker = None
            raise
        return self._worker

    def start(self) -> float:
        """Start the worker now and wait until it is ready; returns its start-up time in seconds."""
        with self._lock:
            return self._ready_worker().startup_s

    def _restart(self) -> None:
        """Kill the current worker; the warm spare takes over and a new spare starts."""
        if self._worker is not None:
            self._worker.stop()
        self.restarts += 1
        self._worker = self._spare or _Worker(self.memory_limit_bytes)
        self._spare = _Worker(self.memory_limit_bytes)

    def check(
        self, pairs: list[tuple[str, str]], timeout: float = DEFAULT_TIMEOUT, grader: str = "math_verify"
    ) -> list[bool]:
        """Worker verdicts for (pred, gold) pairs; a pair taking over ``timeout`` seconds is False.

        ``grader``: ``math_verify`` (`math_equal_batch`) or ``mathruler`` (`grade_answer_batch`)."""
        results = [False] * len(pairs)
        with self._lock:
            todo, send_failures = list(range(len(pairs))), 0
            while todo:
                worker = self._ready_worker()
                self._batch_id += 1
                message = {"id": self._batch_id, "pairs": [pairs[i] for i in todo], "grader": grader}
                try:
                    worker.requests.send_bytes(json.dumps(message).encode())
                except (OSError, ValueError) as e:  # the worker died between calls
                    send_failures += 1
                    warnings.warn(f"math worker unreachable ({e!r}); restarting", stacklevel=2)
                    self._restart()
                    if send_failures >= 3:  # give up on this batch rather than stall training
                        break
                    continue
                todo = self._collect(worker, todo, results, timeout)
        return results

    def _collect(self, worker: _Worker, todo: list[int], results: list[bool], timeout: float) -> list[int]:
        """Read verdicts for ``todo`` in order; on a timeout or crash restart, and return what is left."""
        done = 0  # verdicts received so far; todo[done] is the pair the worker is on
        while done < len(todo):
            try:
                if not worker.results.poll(timeout):
                    raise TimeoutError
                batch_id, index, ok = json.loads(worker.results.recv_bytes())
            except (TimeoutError, EOFError, OSError, ValueError):
                self._restart()  # todo[done] stays False
                return todo[done + 1 :]
            if batch_id == self._batch_id:
                results[todo[index]] = bool(ok)
                done = index + 1
        return []

    def close(self) -> None:
        """Kill the workers (a later `check` starts a new one)."""
        with self._lock:
            self._drop_all()

    def __enter__(self) -> MathChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: MathChecker | None = None
_default_lock = threading.Lock()


def default_checker() -> MathChecker:
    """The process-wide checker used by `math_equal_batch`; its worker is killed at interpreter exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathChecker()
            atexit.register(_default.close)
        return _default


def math_equal_batch(
    preds: list[str | None],
    golds: list[str | None],
    timeout: float = DEFAULT_TIMEOUT,
    *,
    checker: MathChecker | None = None,
) -> list[bool]:
    r"""Whether each prediction is mathematically equal to its gold answer (rules in the module docstring).

    Never raises on content and never spends more than ``timeout`` seconds on one undecided pair (a
    worker restart after a timeout may add its start-up). Pairs that `quick_equal` decides never reach
    the worker; the rest, each distinct pair once, go in one round trip to ``checker`` (default:
    `default_checker()`).

    >>> math_equal_batch(["3.0", "7", None, "x+1"], ["3", "8", "1", "1+x"])
    [True, False, False, True]
    """
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} gold answers")
    verdicts = [quick_equal(p, g) for p, g in zip(preds, golds)]
    pending = [i for i, v in enumerate(verdicts) if v is None]
    if pending:  # identical pairs (a group's samples often agree) are checked once
        unique = list(dict.fromkeys((preds[i], golds[i]) for i in pending))
        checked = dict(zip(unique, (checker or default_checker()).check(unique, timeout)))
        for i in pending:
            verdicts[i] = checked[preds[i], golds[i]]
    return [bool(v) for v in verdicts]


def math_equal(
    pred: str | None,
    gold: str | None,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    checker: MathChecker | None = None,
) -> bool:
    r"""`math_equal_batch` for one pair.

    >>> math_equal(r"\frac{1}{2}", "0.5")
    True
    """
    return math_equal_batch([pred], [gold], timeout, checker=checker)[0]


def grade_answer_batch(
    preds: list[str],
    golds: list[str],
    timeout: float = DEFAULT_TIMEOUT,
    *,
    checker: MathChecker | None = None,
) -> list[bool]:
    r"""`mathruler.grader.grade_answer(pred, gold)` for each pair, in the worker, under the same per-pair time
    limit as `math_equal_batch` (a pair that runs over, or raises, is False). No cheap pre-checks: the caller
    decides which pairs to send (the `unified` reward applies its own size limits first).

    >>> grade_answer_batch([r"\frac{1}{2}", "2/4", "x+1"], ["0.5", "1/2", "1+x"])
    [True, False, True]
    """
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} gold answers")
    ok = [isinstance(p, str) and isinstance(g, str) for p, g in zip(preds, golds)]
    unique = list(dict.fromkeys((p, g) for p, g, k in zip(preds, golds, ok) if k))
    verdicts = (checker or default_checker()).check(unique, timeout, grader="mathruler") if unique else []
    checked = dict(zip(unique, verdicts))
    return [k and checked[p, g] for p, g, k in zip(preds, golds, ok)]

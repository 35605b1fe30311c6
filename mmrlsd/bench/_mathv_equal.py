r"""MATH-V's numeric equality, run against the pinned latex2sympy2 in a private site, in a worker process.

Upstream (`mathllm/MATH-V@a1f5cc3`, `evaluation/utils.py`: `is_equal`, `eval_tuple`) decides equality with
``round(eval(str(latex2sympy(s))), 2)``. The verdicts depend on latex2sympy2 1.9.1, which needs
antlr4-python3-runtime 4.7.2, while the core install has math-verify, whose latex2sympy2_extended needs a
newer antlr4; both packages are imported as ``antlr4``. So the pinned set (`PINNED`) lives in a private
directory made by ``pip install --target`` (`install_site`, or ``python -m mmrlsd.bench.mathvision_setup``),
and only a worker process puts that directory first on its ``sys.path``. The main process never imports
antlr4 from it.

Two departures from upstream, both making a verdict "not equal" where upstream would hang or crash:

* ``eval`` is replaced by `safe_eval`, an AST walk over numbers, tuples/lists/sets, comparisons,
  ``+ - * / // % ** & | ^ ~``, the public names of `math` and calls to them (builtins off: upstream's
  ``from math import *`` namespace and nothing else). An integer power whose result would exceed `MAX_POW_BITS` bits raises instead of running.
* each item gets a time limit in the worker (`EqualityWorker`, default 10 s) and the worker an address-space
  limit (`WORKER_MEMORY_BYTES`); an item over either is not equal, and the result notes it.

This module imports only the standard library, so the worker can run it by path (`runpy`) before anything
else touches ``sys.path``.
"""

from __future__ import annotations

import ast
import atexit
import json
import math
import operator
import os
import re
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

PINNED = ("latex2sympy2==1.9.1", "antlr4-python3-runtime==4.7.2", "sympy==1.14.0", "mpmath==1.3.0")
"""The equality environment of the published reference numbers, installed with --no-deps."""

SITE_ENV = "MMRLSD_MATHV_SITE"
"""Environment variable naming the private site directory (default: `default_site`)."""

MAX_POW_BITS = 1 << 20
"""`safe_eval` refuses an integer power whose result would have more bits than this (about 315k digits)."""

WORKER_MEMORY_BYTES = 4 << 30
"""Address-space limit of the worker process (RLIMIT_AS), where the platform supports it."""

MATH_NAMES: dict[str, Any] = {name: getattr(math, name) for name in dir(math) if not name.startswith("_")}
"""The namespace of upstream's ``eval``: ``from math import *`` (all public names of `math`)."""

Pair = tuple[str, str]


# ---------------------------------------------------------------- the private site


def default_site() -> Path:
    """`$MMRLSD_MATHV_SITE`, else ``$XDG_CACHE_HOME/mmrlsd/mathv-site`` (``~/.cache`` by default)."""
    if os.environ.get(SITE_ENV):
        return Path(os.environ[SITE_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mmrlsd" / "mathv-site"


def _dist_info(spec: str) -> str:
    name, version = spec.split("==")
    return f"{name.replace('-', '_')}-{version}.dist-info"


def site_ready(site: Path) -> bool:
    """True when `site` holds every package of `PINNED` at its pinned version."""
    return all((site / _dist_info(spec)).is_dir() for spec in PINNED)


def setup_hint(site: Path) -> str:
    """What to run when the private site is missing."""
    return (
        f"MATH-V official scoring needs {', '.join(PINNED)} in a private directory ({site}); "
        f"install it with `python -m mmrlsd.bench.mathvision_setup` (pip, needs PyPI), "
        f"or point ${SITE_ENV} at a directory made by `pip install --no-deps --target DIR {' '.join(PINNED)}`"
    )


def install_site(site: Path | None = None, quiet: bool = True) -> Path:
    """Install `PINNED` into `site` (default `default_site()`) with ``pip install --no-deps --target``.

    Installs into a temporary sibling and renames it, so a concurrent or interrupted install never leaves
    a half-filled `site`. Returns `site`; does nothing when it is already complete.
    """
    site = Path(site) if site is not None else default_site()
    if site_ready(site):
        return site
    site.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=site.name + ".", dir=site.parent))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(tmp), *PINNED]
    proc = subprocess.run(cmd, capture_output=quiet, text=True)
    if proc.returncode != 0 or not site_ready(tmp):
        detail = (proc.stderr or "")[-2000:] if quiet else ""
        raise RuntimeError(
            f"installing {' '.join(PINNED)} into {tmp} failed (rc={proc.returncode})\n{detail}"
        )
    if site.exists() and not site_ready(site):  # an incomplete leftover
        _remove_tree(site)
    try:
        tmp.rename(site)
    except OSError:  # another process finished first
        _remove_tree(tmp)
        if not site_ready(site):
            raise
    return site


def ensure_site(site: Path | None = None) -> Path:
    """The private site, installed on first use (one line on stderr, then `install_site`, about 15 s).

    When pip fails (offline, no pip) raises a RuntimeError that names the setup command, before any item
    is scored."""
    site = Path(site) if site is not None else default_site()
    if site_ready(site):
        return site
    print(
        f"mmrlsd: MATH-V scoring needs {' '.join(PINNED)}; installing them once into {site} (pip, about 15 s)",
        file=sys.stderr,
    )
    try:
        return install_site(site)
    except Exception as e:  # noqa: BLE001 - pip's failure is reported with what to do
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(e).__name__
        raise RuntimeError(
            f"could not install MATH-V's pinned packages ({reason}). {setup_hint(site)}"
        ) from e


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- restricted evaluation of sympy's str()

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_,
    ast.BitXor: operator.xor,
}
_UNARY: dict[type, Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
    ast.Not: operator.not_,
    ast.Invert: operator.invert,
}
_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}


def _power(base: Any, exp: Any) -> Any:
    """``base ** exp``, refusing integer powers longer than `MAX_POW_BITS` bits."""
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base) > 1:
        if exp * abs(base).bit_length() > MAX_POW_BITS + 1:
            raise OverflowError(f"integer power over {MAX_POW_BITS} bits refused")
    return operator.pow(base, exp)


def _walk(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float, complex, bool):
            return node.value
        raise ValueError(f"constant {type(node.value).__name__} not allowed")
    if isinstance(node, ast.Name):
        if node.id in MATH_NAMES:
            return MATH_NAMES[node.id]
        raise NameError(f"name {node.id!r} is not defined")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_walk(node.operand))
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        left = _walk(node.left)
        for op, comp in zip(node.ops, node.comparators):  # chained like Python: a < b < c
            right = _walk(comp)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Call) and not node.keywords:
        func = _walk(node.func)
        if not callable(func):
            raise TypeError(f"{type(func).__name__} object is not callable")
        return func(*[_walk(arg) for arg in node.args])
    if isinstance(node, ast.Tuple | ast.List | ast.Set) and not any(
        isinstance(e, ast.Starred) for e in node.elts
    ):
        values = [_walk(e) for e in node.elts]
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](values)
    raise ValueError(f"{type(node).__name__} not allowed")


def safe_eval(text: str) -> Any:
    """Evaluate sympy's printed form of an expression the way upstream's ``eval`` does (names of `math`
    only, builtins off), by walking its AST; anything else raises.

    >>> safe_eval("3*sqrt(3)/2")
    2.598076211353316
    >>> safe_eval("1 < 2"), safe_eval("[1, 2]")
    (True, [1, 2])
    >>> safe_eval("E")
    Traceback (most recent call last):
    NameError: name 'E' is not defined
    """
    return _walk(ast.parse(text.strip(), mode="eval"))


# ---------------------------------------------------------------- upstream is_equal, given a converter

ToSympy = Callable[[str], Any]


def rounded_value(s: str, to_sympy: ToSympy) -> Any:
    """Upstream ``round(eval(str(latex2sympy(s))), 2)``; raises where upstream raises."""
    return round(safe_eval(str(to_sympy(s))), 2)


def eval_tuple(s: str, value: Callable[[str], Any]) -> str:
    """Upstream `eval_tuple`: ``"(a,b)"``/``"[a,b]"`` with at least 2 elements -> each element replaced by
    ``str(value(element))`` (elements containing ``infty`` or equal to ``a``/``-a`` kept), re-wrapped;
    on any error, or for anything else, `s` unchanged."""
    parts = s[1:-1].split(",")
    if len(s) < 2 or (s[0], s[-1]) not in (("(", ")"), ("[", "]")) or len(parts) < 2:
        return s
    try:
        body = ",".join(p if "infty" in p or p in ("a", "-a") else str(value(p)) for p in parts)
    except Exception:
        return s
    return s[0] + body + s[-1]


def text_verdict(x: str, y: str) -> bool | None:
    """Steps 1-2 of upstream `is_equal` (no sympy): False if either is blank, True if equal after
    lower-casing and stripping, None when the numeric steps must decide."""
    x, y = x.lower(), y.lower()
    if x.replace(" ", "") == "" or y.replace(" ", "") == "":
        return False
    if x.strip() == y.strip():
        return True
    return None


_PLAIN_NUMBER = re.compile(r"-?[0-9]{1,15}(?:\.[0-9]{1,15})?")
_LETTER = re.compile(r"[a-z]")


def plain_value(s: str) -> int | float | None:
    """`rounded_value(s)` for a plain decimal numeral (``-?d+(.d+)?``, at most 15+15 digits), else None.

    latex2sympy2 turns ``4.8`` into ``Rational(24, 5)``, printed ``24/5``, which evaluates to the correctly
    rounded float of 24/5 (an integer when the denominator is 1); `Fraction` gives the same p/q.
    `tests/bench/test_bench_mathvision.py` checks this against the pinned environment.
    """
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    f = Fraction(s)
    return round(f.numerator if f.denominator == 1 else f.numerator / f.denominator, 2)


def local_verdict(x: str, y: str) -> bool | None:
    """`numeric_equal(x, y)` where it is known without latex2sympy2 (lower-cased inputs, `text_verdict`
    undecided), else None: a single letter never evaluates (it becomes a sympy Symbol, ``E`` or ``I``,
    none of them a `math` name), so the pair is not equal; two plain numerals compare by `plain_value`."""
    if _LETTER.fullmatch(x) or _LETTER.fullmatch(y):
        return False
    vx, vy = plain_value(x), plain_value(y)
    if vx is not None and vy is not None:
        return vx == vy
    return None


def is_equal(x: str, y: str, to_sympy: ToSympy) -> bool:
    """Upstream `is_equal(x, y)` with `to_sympy` in place of latex2sympy."""
    early = text_verdict(x, y)
    if early is not None:
        return early
    return numeric_equal(x.lower(), y.lower(), lambda s: rounded_value(s, to_sympy))


def numeric_equal(x: str, y: str, value: Callable[[str], Any]) -> bool:
    """Steps 3-4 of upstream `is_equal(x, y)` on lower-cased strings: `eval_tuple` both, compare the
    strings, then compare ``value(y) == value(x)`` (any exception -> False). Like upstream, `y` (the
    model's answer) is evaluated first, and `x` not at all when `y` fails."""
    x, y = eval_tuple(x, value), eval_tuple(y, value)
    if x == y:
        return True
    try:
        return bool(value(y) == value(x))
    except Exception:
        return False


# ---------------------------------------------------------------- the worker process


def serve() -> None:
    """Worker main loop (runs inside the private-site process): reads JSON lines ``{"k", "pairs"}`` from
    stdin, writes ``{"k", "eq"}`` per request, where eq = any `numeric_equal` over the pairs. The first
    line written is ``{"ready": true, "versions": {...}}``."""
    proto = os.fdopen(os.dup(1), "w", encoding="ascii", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries go to stderr, never into the protocol
    sys.stdout = sys.stderr
    site = sys.path[0]
    import antlr4  # noqa: F401  (must come from the private site)
    import latex2sympy2
    from latex2sympy2 import latex2sympy

    versions = _versions()
    if not str(Path(antlr4.__file__).resolve()).startswith(str(Path(site).resolve())):
        raise RuntimeError(f"antlr4 imported from {antlr4.__file__}, not from the private site {site}")
    enter_upstream_steady_state(latex2sympy2)
    _limit_memory(WORKER_MEMORY_BYTES)

    @lru_cache(maxsize=65536)
    def value(s: str) -> tuple[bool, Any]:  # cached (ok, result); latex2sympy is deterministic per string
        try:
            return True, rounded_value(s, latex2sympy)
        except Exception as e:
            return False, type(e).__name__

    def value_or_raise(s: str) -> Any:
        ok, out = value(s)
        if not ok:
            raise ValueError(out)  # any exception means "not equal" to the callers
        return out

    proto.write(json.dumps({"ready": True, "versions": versions}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        eq = any(numeric_equal(x, y, value_or_raise) for x, y in req["pairs"])
        proto.write(json.dumps({"k": req["k"], "eq": eq}) + "\n")


def enter_upstream_steady_state(module: Any) -> None:
    """Put latex2sympy2 1.9.1 in the state upstream's scoring runs in, so verdicts do not depend on order.

    latex2sympy2 has global state: converting a differential (``d`` followed by a letter, as in ``dx``,
    ``sunday`` or ``and``) rebinds the module global ``var`` from a dict to a Symbol (``global var`` in
    `convert_atom`), after which converting any letter raises TypeError. Nothing rebinds it back, so an
    upstream run is in that state from its first such string on (item 4 to 85 of the five reference
    files, scoring from a fresh process) to the end. The worker converts ``dx`` once at start and stays
    in that state; per-string caching is then exact. On the 3,951 distinct strings that reach the
    numeric step in the reference files, the two states differ only in the exception raised.
    """
    module.latex2sympy("dx")
    if isinstance(module.var, dict):
        raise RuntimeError("latex2sympy2 did not enter the expected state after 'dx'; is it version 1.9.1?")


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    names = [spec.split("==")[0] for spec in PINNED]
    out = {name: version(name) for name in names}
    out["python"] = ".".join(map(str, sys.version_info[:3]))
    return out


def _limit_memory(nbytes: int) -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = nbytes if hard == resource.RLIM_INFINITY else min(nbytes, hard)
        if soft == resource.RLIM_INFINITY or soft > cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, ValueError, OSError):  # not on this platform
        pass


_BOOT = "import sys, runpy; sys.path.insert(0, sys.argv[1]); runpy.run_path(sys.argv[2])['serve']()"


class EqualityWorker:
    """A persistent worker process that answers `numeric_equal` for batches of items.

    ``with EqualityWorker() as w: verdicts = w.run(jobs)`` where each job is the list of (x, y) pairs of
    one item (lower-cased, undecided by `text_verdict`) and the item is equal when any pair is. All jobs
    are streamed in one round trip; an item that takes longer than `item_timeout` seconds (or kills the
    worker) is not equal: the worker is restarted and the remaining items are sent again.
    """

    def __init__(self, site: Path | None = None, item_timeout: float = 10.0, start_timeout: float = 120.0):
        self.site = Path(site) if site is not None else default_site()
        if not site_ready(self.site):
            raise FileNotFoundError(setup_hint(self.site))
        self.item_timeout = item_timeout
        self.start_timeout = start_timeout
        self.versions: dict[str, str] = {}
        self._proc: subprocess.Popen | None = None
        self._stderr: Any = None
        self._buf = b""
        self._writer: threading.Thread | None = None

    def __enter__(self) -> EqualityWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        self._stderr = tempfile.TemporaryFile()  # read back only when the worker fails to start
        cmd = [sys.executable, "-I", "-c", _BOOT, str(self.site), str(Path(__file__).resolve())]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self._buf = b""
        line = self._read_line(self.start_timeout)
        if line is None:
            self._proc.kill()
            self._proc.wait()
            tail = self._stderr_tail()
            self.close()
            raise RuntimeError(f"MATH-V equality worker failed to start:\n{tail}")
        self.versions = json.loads(line)["versions"]

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode("utf-8", "replace")[-3000:]
        except (OSError, ValueError):
            return ""

    def _read_line(self, timeout: float) -> bytes | None:
        """Next line from the worker, or None on timeout or end of file."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return None
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def _send(self, lines: list[bytes]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        stdin = self._proc.stdin

        def write() -> None:
            try:
                for line in lines:
                    stdin.write(line)
                stdin.flush()
            except (OSError, ValueError):  # the worker was stopped; its items are re-sent
                pass

        self._writer = threading.Thread(target=write, daemon=True)
        self._writer.start()

    def run(self, jobs: Sequence[Sequence[Pair]]) -> list[tuple[bool, str | None]]:
        """(equal, note) per job; note is None, ``"timeout"`` or ``"worker died"`` (then equal is False)."""
        out: list[tuple[bool, str | None]] = []
        while len(out) < len(jobs):
            if self._proc is None:
                self._start()
            start = len(out)
            self._send(
                [json.dumps({"k": k, "pairs": jobs[k]}).encode() + b"\n" for k in range(start, len(jobs))]
            )
            while len(out) < len(jobs):
                line = self._read_line(self.item_timeout)
                if line is None:
                    died = self._proc is not None and self._proc.poll() is not None
                    out.append((False, "worker died" if died else "timeout"))
                    self.close()
                    break
                msg = json.loads(line)
                if msg.get("k") != len(out):
                    raise RuntimeError(f"MATH-V equality worker answered {msg!r} for item {len(out)}")
                out.append((bool(msg["eq"]), None))
            if self._writer is not None:
                self._writer.join()
        return out

    def close(self) -> None:
        """Stop the worker (it is started again by the next `run`)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.kill()
        except OSError:
            pass
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except (OSError, ValueError):
                pass
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        self._stderr.close()


class EqualityPool:
    """Several `EqualityWorker`s answering one batch in parallel (job k goes to worker k mod n).

    `workers` defaults to the number of CPUs (at most 4); a worker starts only when it gets jobs, and
    stays up, with its value cache, until `close`.
    """

    def __init__(self, site: Path | None = None, item_timeout: float = 10.0, workers: int | None = None):
        n = workers or min(os.cpu_count() or 1, 4)
        self.workers = [EqualityWorker(site, item_timeout=item_timeout) for _ in range(n)]
        self._lock = threading.Lock()  # one batch at a time per pool

    def __enter__(self) -> EqualityPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def versions(self) -> dict[str, str]:
        """Package versions reported by the first started worker."""
        return next((w.versions for w in self.workers if w.versions), {})

    def run(
        self, jobs: Sequence[Sequence[Pair]], min_jobs_per_worker: int = 64
    ) -> list[tuple[bool, str | None]]:
        """`EqualityWorker.run` over all jobs, split across up to n workers (fewer for small batches)."""
        n = max(1, min(len(self.workers), len(jobs) // min_jobs_per_worker))
        parts = [list(range(k, len(jobs), n)) for k in range(n)]
        with self._lock, ThreadPoolExecutor(n) as ex:
            outs = list(ex.map(lambda k: self.workers[k].run([jobs[i] for i in parts[k]]), range(n)))
        result: list[tuple[bool, str | None]] = [(False, None)] * len(jobs)
        for idx, out in zip(parts, outs):
            for i, verdict in zip(idx, out):
                result[i] = verdict
        return result

    def close(self) -> None:
        for w in self.workers:
            w.close()


_SHARED: dict[tuple[str, float], EqualityPool] = {}


def shared_pool(site: Path | None = None, item_timeout: float = 10.0) -> EqualityPool:
    """A process-wide `EqualityPool` per (site, timeout), so repeated scoring reuses started workers and
    their caches; closed at interpreter exit (`close_shared_pools`)."""
    key = (str(Path(site) if site is not None else default_site()), float(item_timeout))
    if key not in _SHARED:
        _SHARED[key] = EqualityPool(Path(key[0]), item_timeout)
    return _SHARED[key]


@atexit.register
def close_shared_pools() -> None:
    """Stop every worker started through `shared_pool`."""
    while _SHARED:
        _SHARED.popitem()[1].close()

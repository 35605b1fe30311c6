"""Tests for mmrlsd/reward/verify.py (and the worker script it runs): math equivalence under a time limit.

Slow inputs use timeout=1.0 so the file stays fast; each costs ~1 s plus a ~1 s worker restart.
"""

import doctest
import os
import signal
import subprocess
import sys
import time

import pytest

from mmrlsd.reward import verify, verify_worker
from mmrlsd.reward.verify import MathChecker, math_equal, math_equal_batch, quick_equal

# inputs that math-verify cannot finish: they must cost one timeout, then a restart
HANGS = [r"10^{10^{10^{10}}}", r"9^{9^{9^{9}}}"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited but is not reaped yet: count it as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_dead(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def checker():
    """One checker for the whole file (each worker start costs ~1 s); closed and checked for leaks at the end."""
    with MathChecker() as c:
        c.start()
        yield c
        pids = c.pids
    assert c.pid is None and c.pids == []
    assert all(_wait_dead(pid) for pid in pids)  # current and spare workers: no leaks


def test_doctests():
    failed, attempted = doctest.testmod(verify)
    assert attempted >= 4 and failed == 0


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("3.0", "3", True),  # Decimal 3.0 == 3
        ("3.", "3", True),  # final period dropped
        ("1,000", "1000", True),  # thousands separator
        ("$30^\\circ$", "30", True),  # decoration stripped
        (r"\text{ 12 }", "12", True),
        ("2", "3", False),  # two integers: exact
        ("0.5", "0.25", None),  # decimals: math-verify rounds, so it decides
        (r"\frac{1}{2}", "0.5", None),
        (None, "1", False),
        ("1", None, False),
        ("", "1", False),
        ("$$", "$$", False),  # nothing left after stripping
        ("{" * 11 + "1" + "}" * 11, "1", False),  # nested deeper than MAX_NESTING = 10
        ("[" * 10 + "1" + "]" * 10, "1", None),  # depth 10 is allowed
        ("1" * 1001, "1" * 1001, False),  # over MAX_ANSWER_CHARS, even if equal
        (3, "3", False),  # not a string
    ],
)
def test_quick_equal(pred, gold, expected):
    assert quick_equal(pred, gold) is expected


@pytest.mark.parametrize(
    "pred, gold",
    [
        (r"\frac{1}{2}", "0.5"),
        ("0.5", r"\frac{1}{2}"),
        (r"2\sqrt{2}", r"\sqrt{8}"),
        ("x+1", "1+x"),
        ("{1,2}", "{2,1}"),
        (r"\{1,2\}", r"\{2,1\}"),
        ("3.0", "3"),
        (r"\dfrac{3}{4}", "0.75"),
        (r"\frac{\sqrt{3}}{2}", r"\sqrt{3}/2"),
        ("(1,2)", "(1, 2)"),
        ("[1,2)", "[1, 2)"),
        ("x=2", "2"),  # math-verify compares the right-hand side of an assignment
        (r"\pi", "3.14159265"),  # agree to 6 decimals
        ("12 cm", "12"),  # math-verify drops units
        # percentages, as math-verify decides: 50% equals both 50 and 0.5
        (r"50\%", "50"),
        (r"50\%", "0.5"),
        ("50", r"50\%"),
        (r"\text{(B)}", "B"),  # letters also pass here; the MC reward uses choice_equal instead
    ],
)
def test_math_equal_positive(pred, gold):
    assert math_equal(pred, gold) is True


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("2", "3"),
        ("x", "y"),
        ("x+1", "x-1"),
        ("3.14159", "3.1416"),  # differ at the 5th decimal
        ("(1,2)", "(2,1)"),  # tuples are ordered
        ("i", r"\sqrt{-1}"),
        (r"\frac{1}{3}", "0.33"),
    ],
)
def test_math_equal_negative(pred, gold):
    assert math_equal(pred, gold) is False


SURROGATES = "\ud800\udfff x \udcff"  # lone surrogates: not encodable as UTF-8


@pytest.mark.parametrize(
    "pred",
    [
        "9**9**9**9",
        r"\frac{1}{0}",
        "1" * 100_000,
        "x+" * 50_000,
        *HANGS,
        "{" * 400 + "1" + "}" * 400,  # deeply nested braces
        "(" * 300 + "1" + ")" * 300,
        r"\sqrt{-1}",
        SURROGATES,
        "",
        None,
        "\x00\x01\x02",
        r"\begin{pmatrix}" + "1&" * 300 + r"\end{pmatrix}",
    ],
    ids=lambda p: repr(p)[:24],
)
def test_adversarial_answers_are_false_within_the_time_limit(pred, checker):
    timeout = 1.0
    # as prediction and as gold answer (a hang only as prediction: each one costs a worker restart)
    for p, g in [(pred, "1")] + ([] if pred in HANGS else [("1", pred)]):
        checker.start()  # exclude the start-up of a worker restarted after a previous timeout
        t0 = time.monotonic()
        assert math_equal(p, g, timeout=timeout, checker=checker) is False
        assert time.monotonic() - t0 < 3 * timeout


def test_two_timeouts_restart_the_worker_and_later_checks_work(checker):
    checker.start()
    first, restarts = checker.pid, checker.restarts
    # one batch: hang, hang, then a normal pair that must still be checked
    verdicts = checker.check([(HANGS[0], "1"), (HANGS[1], "1"), (r"\frac{1}{2}", "0.5")], timeout=0.5)
    assert verdicts == [False, False, True]
    assert checker.restarts == restarts + 2
    assert checker.pid not in (None, first)
    assert len(checker.pids) == 2  # after a restart a warm spare is kept
    assert _wait_dead(first)  # the killed worker is gone, not leaked
    # a timeout in a later call, then a normal call on the restarted worker
    assert checker.check([(HANGS[0], "1")], timeout=0.5) == [False]
    assert checker.restarts == restarts + 3
    assert checker.check([("x+1", "1+x"), (r"2\sqrt{2}", r"\sqrt{8}")]) == [True, True]


def test_a_killed_worker_is_replaced(checker):
    checker.start()
    pid = checker.pid
    os.kill(pid, signal.SIGKILL)
    assert _wait_dead(pid)
    with pytest.warns(UserWarning, match="unreachable"):  # the send fails: restart and resend
        assert checker.check([(r"\frac{1}{2}", "0.5")]) == [True]
    assert checker.pid != pid


def test_close_kills_the_workers_and_check_reopens(checker):
    assert checker.start() > 0  # start-up seconds
    assert checker.engine == "math_verify"
    pids = checker.pids
    checker.close()
    assert checker.pid is None and all(_wait_dead(pid) for pid in pids)
    assert checker.check([("x+1", "1+x")]) == [True]  # a closed checker starts again on demand


def test_failed_start_raises(tmp_path, monkeypatch):
    # an environment where the worker cannot run is an error, not a silent zero reward
    monkeypatch.setattr(verify, "_WORKER", tmp_path / "missing_worker.py")
    c = MathChecker(startup_timeout=30)
    with pytest.raises(RuntimeError, match="failed to start"):
        c.check([("x+1", "1+x")])
    assert c.pid is None


def test_batch_sends_only_undecided_pairs(monkeypatch):
    sent = []
    real_check = MathChecker.check

    def spy(self, pairs, timeout=5.0):
        sent.append(list(pairs))
        return real_check(self, pairs, timeout)

    monkeypatch.setattr(MathChecker, "check", spy)
    preds = ["3.0", "2", r"\frac{1}{2}", None, "x+1", r"\frac{1}{2}"]
    golds = ["3", "3", "0.5", "1", "1+x", "0.5"]
    assert math_equal_batch(preds, golds) == [True, False, True, False, True, True]
    assert sent == [[(r"\frac{1}{2}", "0.5"), ("x+1", "1+x")]]  # one round trip, distinct pairs once
    assert math_equal_batch(["1"], ["1"]) == [True] and len(sent) == 1  # all quick: no IPC
    with pytest.raises(ValueError, match="2 predictions but 1 gold"):
        math_equal_batch(["1", "2"], ["1"])


def test_worker_engines_directly():
    # the worker module is importable in-process; check its engines without a subprocess
    assert verify_worker.ENGINE == "math_verify"
    assert verify_worker.equal(r"\frac{1}{2}", "0.5") is True
    assert verify_worker.sympy_equal(r"\frac{1}{2}", "0.5") is True  # fallback engine
    assert verify_worker.sympy_equal(r"2\sqrt{2}", r"\sqrt{8}") is True
    assert verify_worker.sympy_equal("x+1", "x-1") is False
    assert verify_worker.string_equal(" x + 1", "x+1") is True
    assert verify_worker.string_equal("", "") is False


def _run_child(code: str) -> int:
    """Run ``code`` in a fresh interpreter that prints the worker pid; return that pid."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout.split()[-1])


def test_default_worker_is_cleaned_up_at_exit():
    code = (
        "from mmrlsd.reward.verify import math_equal, default_checker\n"
        "assert math_equal('x+1', '1+x')\n"
        "print(default_checker().pid)\n"
    )
    assert _wait_dead(_run_child(code))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_worker_dies_with_a_killed_parent():
    # the parent is SIGKILLed while the worker is busy on a hanging input: no atexit runs
    code = (
        "import os, signal, threading\n"
        "from mmrlsd.reward.verify import default_checker\n"
        "c = default_checker(); c.start(); print(c.pid, flush=True)\n"
        f"threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGKILL)).start()\n"
        f"c.check([({HANGS[0]!r}, '1')], timeout=60)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _wait_dead(int(proc.stdout.split()[0]))


@pytest.mark.slow
def test_throughput_512_pairs(checker):
    pairs = _typical_pairs()
    checker.start()
    t0 = time.monotonic()
    verdicts = math_equal_batch([p for p, _ in pairs], [g for _, g in pairs], checker=checker)
    elapsed = time.monotonic() - t0
    print(f"\nmath_equal_batch: {len(pairs)} pairs in {elapsed:.2f} s ({len(pairs) / elapsed:.0f} pairs/s)")
    assert sum(verdicts) == sum(ok for ok in _typical_pairs(truth=True))


def _typical_pairs(truth: bool = False) -> list:
    """64 prompts x 8 samples shaped like training answers: per prompt 4 right (in various forms, some
    repeated) and 4 wrong. ``truth=True`` gives the expected verdicts instead of the pairs."""
    import random

    rng = random.Random(0)
    pairs, oks = [], []
    for k in range(64):
        a, b = rng.randint(1, 40), rng.randint(41, 90)
        gold, right, wrong = [
            (
                rf"\frac{{{a}}}{{{b}}}",
                [rf"\dfrac{{{a}}}{{{b}}}", rf"\frac{{{2 * a}}}{{{2 * b}}}"],
                [rf"\frac{{{b}}}{{{a}}}"],
            ),
            (rf"{a}\sqrt{{2}}", [rf"\sqrt{{{2 * a * a}}}", rf"{a}\sqrt{{2}}"], [rf"{a}\sqrt{{3}}"]),
            (f"x^2+{a}x+{b}", [f"{b}+{a}x+x^2", f"x^2+{a}x+{b}"], [f"x^2-{a}x+{b}"]),
            (f"({a}, {b}]", [f"({a},{b}]"], [f"[{a}, {b}]"]),
            (rf"\{{{a}, {b}\}}", [rf"\{{{b},{a}\}}"], [rf"\{{{a}\}}"]),
            (f"{a}.{b}", [f"{a}.{b}0"], [f"{a}.{b + 1}"]),
            (str(a * b), [f"{a * b}.0", f"{a * b:,}"], [str(a * b + 1)]),
            (rf"{a}\pi", [rf"{a} \pi"], [rf"{a}\pi^2"]),
        ][k % 8]
        for i in range(8):
            pairs.append((rng.choice(right) if i < 4 else rng.choice(wrong + [f"{a + i}"]), gold))
            oks.append(i < 4)
    return oks if truth else pairs

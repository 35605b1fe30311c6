"""MATH-V (`mmrlsd/bench/mathvision.py`, `_mathv_equal.py`): official-scorer parity (in the repository: the
whole testmini result of LLaVA-v1.5-13B and 48 Gemini-Pro-CoT items; with the full files: all five published
output files), the extraction rules, the restricted evaluator, and adversarial inputs.

Tests marked by the `mathv_site` fixture need the pinned latex2sympy2 environment; the fixture installs it
once with pip (about 15 s) into the default cache directory, or skips with the reason.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import time
from pathlib import Path

import pytest
from reference_files import FIXTURES, TIERS, tier_root

from mmrlsd.bench import _mathv_equal as eq
from mmrlsd.bench.mathvision import (
    INSTRUCTION,
    MathVision,
    boxed_content,
    build_prompt,
    extract_answer,
    gold_answers,
    official_result_dict,
    strip_string,
)

MODELS = {  # official output file (under outputs/) -> model name of its result files
    "Random-Chance.jsonl": "Random-Chance",
    "closed-source/Gemini/Gemini-Pro-CoT.jsonl": "Gemini-Pro-CoT",
    "closed-source/Qwen/Qwen-VL-Max.jsonl": "Qwen-VL-Max",
    "open-source/Internlm/InternLM-XComposer2-VL.jsonl": "InternLM-XComposer2-VL",
    "open-source/LLavA/LLaVA-v1.5-13B.jsonl": "LLaVA-v1.5-13B",
}


IN_REPO = ("open-source/LLavA/LLaVA-v1.5-13B.jsonl", "closed-source/Gemini/Gemini-Pro-CoT.jsonl")
"""The output files with a subset in `eval/fixtures/mathvision` (LLaVA: its 304 testmini rows; Gemini: 48)."""


@pytest.fixture(scope="session")
def mathv_dir(reference_dir: Path) -> Path:
    return reference_dir / "mathvision"


@pytest.fixture(scope="session")
def gold(mathv_dir: Path) -> dict[str, list[dict]]:
    bench = MathVision()
    return {s: bench.load(str(mathv_dir / f"data/{s}.jsonl"), s) for s in ("test", "testmini")}


@pytest.fixture(scope="session")
def gold_small() -> dict[str, list[dict]]:
    return {"testmini": MathVision().load(str(FIXTURES / "mathvision/data/testmini.jsonl"), "testmini")}


@pytest.fixture(scope="session")
def mathv_site() -> Path:
    """The private latex2sympy2 site, installed once (pip) when missing; skip if that is impossible."""
    site = eq.default_site()
    if not eq.site_ready(site):
        try:
            eq.install_site(site)
        except Exception as e:  # no network / no pip
            pytest.skip(f"MATH-V equality env missing and not installable ({e}); {eq.setup_hint(site)}")
    return site


def free(answer: str = "60", level: int = 1, subject: str = "algebra", rid: str = "1") -> dict:
    return {
        "id": rid,
        "question": "q\n<image1>",
        "options": [],
        "answer": answer,
        "level": level,
        "subject": subject,
    }


def choice(answer: str = "B", rid: str = "2") -> dict:
    return {"id": rid, "question": "q", "options": ["1", "2", "3", "4", "5"], "answer": answer, "level": 2,
            "subject": "logic"}  # fmt: skip


# ---------------------------------------------------------------- prompt, extraction (no worker)


def test_prompt_matches_upstream_template():
    options = {**choice(), "question": "Which?\n<image1>", "options": ["1", "2", "3", "4", "5"]}
    assert build_prompt(options) == f"{INSTRUCTION}\nWhich?\n<image1>\n(A) 1\n(B) 2\n(C) 3\n(D) 4\n(E) 5\n"
    letters = {**options, "options": ["A", "B", "C", "D", "E"]}  # drawn in the image: no option lines
    assert build_prompt(letters) == f"{INSTRUCTION}\nWhich?\n<image1>\n"
    assert build_prompt(free()) == f"{INSTRUCTION}\nq\n<image1>\n"  # free-form prompt ends with "\n"
    assert INSTRUCTION.count("\\boxed{}") == 2 and "\\\\" not in INSTRUCTION


@pytest.mark.parametrize(
    "response, expected",
    [
        ("Thus the answer is C.", "c"),  # letter shortcut (" C."), lower-cased by find_math_answer
        ("I pick (B).", "b"),
        ("A\nbecause", "a"),
        ("(D) D\nbecause", "d"),
        ("so the length is 4.8.", "4.8"),  # text after the last "is " parses as a float
        ("The final answer is 12. Then more", "12"),  # phrase: cut at the first ". "
        ("the answer is 7\nand so on", "7"),
        ("The answer should be 3 cm", "3cm"),  # spaces removed
        ("x \\boxed{1} and \\boxed{2}", "2"),  # two boxes: the last one
        ("\\boxed{\\frac{4}{3}}", "\\frac{4}{3}"),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{x = 5}", "5"),  # text after the last "="
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{3/4}", "\\frac{3}{4}"),
        ("\\boxed{03/4}", "03/4"),  # not canonical integers: kept
        ("\\boxed{\\frac12}", "\\frac12"),  # fractions are fixed only when "sqrt" occurs (upstream quirk)
        ("\\boxed{\\sqrt3\\frac12}", "\\sqrt{3}\\frac{1}{2}"),
        ("\\boxed{90^\\circ}", "90"),
        ("\\boxed{5 \\text{ km}}", "5"),
        ("\\boxed{(a)}", "a"),
        ("\\boxed{{c}}", "c"),  # "{c}" -> "c"
        (".5", "\\frac{1}{2}"),  # a leading "." gets a "0", then 0.5 -> \\frac{1}{2}
        ("", ""),
    ],
)
def test_extract_answer_rules(response, expected):
    assert extract_answer(response) == expected


def test_boxed_content_equals_upstream_regex():
    # upstream: re.compile('oxed{(.*)}', re.S).findall(s)[-1], else s; compared on 5000 random strings
    rng = random.Random(0)
    alphabet = ["oxed{", "}", "{", "a", "\n", "oxed"]
    for _ in range(5000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        found = re.compile("oxed{(.*)}", flags=re.S).findall(s)
        assert boxed_content(s) == (found[-1] if found else s), s


def test_boxed_content_is_linear_on_many_openings():
    s = "OXED{" * 200_000  # the upstream regex backtracks quadratically here (no "}")
    t0 = time.monotonic()
    assert extract_answer(s) == s.lower()
    assert time.monotonic() - t0 < 5


def test_strip_string_steps():
    assert strip_string("\\left(1,2\\right)") == "(1,2)"
    assert strip_string("x=1=2") == "x=1=2"  # two "=": kept
    assert strip_string("5\\%") == "5"
    assert strip_string("\\frac1") == "\\frac1"  # no sqrt: no fixing at all
    assert strip_string("\\sqrt2\\frac1") == "\\sqrt{2}\\frac1"  # bare \frac with < 2 chars: unfixed


@pytest.mark.parametrize("tier", TIERS)
def test_extraction_reproduces_every_stored_model_answer(tier):
    # the stored `model_answer`s were written by the official re-extraction (regen_answer=True):
    # 5 x 3040 in the full files, 304 + 48 in the repository
    root = tier_root(tier) / "mathvision"
    bench = MathVision()
    n = 0
    for rel in MODELS if tier == "reference" else IN_REPO:
        preds = bench.read_predictions(root / "outputs" / rel)
        bad = {pid: (row["model_answer"], extract_answer(row["response"])) for pid, row in preds.items()
               if extract_answer(row["response"]) != row["model_answer"]}  # fmt: skip
        assert not bad, (rel, list(bad.items())[:5])
        n += len(preds)
    assert n == (15_200 if tier == "reference" else 352)


def test_gold_answers_and_result_dict_format():
    assert gold_answers(choice("C"), "2") == ("C", "3")
    assert gold_answers(free("\\frac{4}{3}"), "1") == ("\\frac{4}{3}", "")
    with pytest.raises(ValueError, match="record 'x'.*'F'"):
        gold_answers({**choice(), "answer": "F"}, "x")
    # 2/5 -> round(40.0, 2) = 40.0 -> "40.0%"; 0/7 -> "0.0%"; 1/3 -> 33.33
    rows = [(1, "logic", True), (1, "logic", True)] + [(1, "logic", False)] * 3 + [(2, "algebra", False)] * 7
    out = official_result_dict(rows)
    assert out["-level1"] == "2/5=40.0%" and out["algebra"] == "0/7=0.0%" and out["-all"] == "2/12=16.67%"
    assert list(out) == sorted(out) and set(out) == {
        "-all", "-level1", "-level2", "logic", "algebra", "logic_level1", "algebra_level2",
        "-level1_logic", "-level2_algebra",
    }  # fmt: skip


# ---------------------------------------------------------------- restricted evaluator (no worker)


def test_safe_eval_values():
    assert eq.safe_eval("4/3") == 4 / 3
    assert eq.safe_eval("3*sqrt(3)") == 3 * math.sqrt(3)
    assert eq.safe_eval("log(8, 2)") == 3.0
    assert eq.safe_eval("-2**2") == -4 and eq.safe_eval("2**-1") == 0.5
    assert eq.safe_eval("1 < 2") is True and eq.safe_eval("1 < 2 < 1") is False  # chained like Python
    assert round(eq.safe_eval("1 < 2"), 2) == 1  # upstream: round(True, 2) == 1
    assert eq.safe_eval("(1, 2)") == (1, 2) and eq.safe_eval("[pi]") == [math.pi]
    assert math.isnan(eq.safe_eval("nan")) and eq.safe_eval("e") == math.e


@pytest.mark.parametrize(
    "text, error",
    [
        ("E", NameError),  # sympy's Euler number is not a math name
        ("oo", NameError),
        ("Abs(-3)", NameError),
        ("abs(-3)", NameError),  # builtins are off
        ("__import__('os')", NameError),  # not a math name (and string constants are refused too)
        ("sqrt('4')", ValueError),
        ("().__class__", ValueError),  # no attribute access
        ("sqrt.__call__(4)", ValueError),
        ("(lambda: 1)()", ValueError),
        ("[x for x in (1,)]", ValueError),
        ("sqrt(x=4)", ValueError),  # no keyword arguments
        ("1/0", ZeroDivisionError),
        ("sqrt(-1)", ValueError),
        ("9**(9**(9**9))", OverflowError),  # refused before computing: 9**387420489 has ~1.2e9 bits
        ("1 << 5", ValueError),
    ],
)
def test_safe_eval_rejects(text, error):
    with pytest.raises(error):
        eq.safe_eval(text)


def test_safe_eval_power_bound():
    assert eq.safe_eval("2**100000") == 2**100000  # 100001 bits, under MAX_POW_BITS = 2**20
    assert eq.safe_eval("(-1)**(10**12)") == 1  # |base| <= 1 never grows
    with pytest.raises(OverflowError):
        eq.safe_eval("3**700000")  # 700000 * 2 bits > 2**20


def test_eval_tuple_and_text_verdict():
    value = {"1": 1, "2.004": 2.0, "x": 5}.__getitem__  # stand-in for round(eval(latex2sympy(s)), 2)
    assert eq.eval_tuple("(1,2.004)", value) == "(1,2.0)"
    assert eq.eval_tuple("[1,\\infty]", value) == "[1,\\infty]"  # elements with infty are kept
    assert eq.eval_tuple("(a,-a)", value) == "(a,-a)"
    assert eq.eval_tuple("(1,y)", value) == "(1,y)"  # an element fails: the input unchanged
    assert eq.eval_tuple("(1)", value) == "(1)" and eq.eval_tuple("", value) == ""
    assert eq.text_verdict(" A ", "a") is True and eq.text_verdict("", "a") is False
    assert eq.text_verdict("a", "  ") is False and eq.text_verdict("1", "2") is None
    assert eq.numeric_equal("(1,2.004)", "(1,2.0)", value)  # equal after eval_tuple
    assert not eq.numeric_equal("x", "y", value)  # KeyError -> not equal


def test_missing_site_error_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="mathvision_setup"):
        eq.EqualityWorker(tmp_path / "nowhere")


def test_broken_site_fails_with_the_worker_traceback(tmp_path):
    site = tmp_path / "site"
    for spec in eq.PINNED:  # looks complete, but latex2sympy2 cannot be imported
        name, version = spec.split("==")
        (site / f"{name.replace('-', '_')}-{version}.dist-info").mkdir(parents=True)
    (site / "antlr4").mkdir()
    (site / "antlr4" / "__init__.py").write_text("")
    (site / "latex2sympy2.py").write_text("raise ImportError('broken on purpose')\n")
    with pytest.raises(RuntimeError, match="(?s)failed to start.*broken on purpose"):
        eq.EqualityWorker(site).run([[("1", "x")]])


# ---------------------------------------------------------------- scoring without the worker


def test_score_without_numeric_step_needs_no_worker(tmp_path):
    # every verdict here is decided by the text steps: equal after lower/strip, or a blank side
    bench = MathVision()
    bench.site = tmp_path / "nowhere"  # would raise if the worker were needed
    gold = [free("60"), choice("B"), free("7", rid="3", level=3, subject="logic")]
    preds = {"1": {"id": "1", "response": "the answer is 60."}, "2": {"id": "2", "response": "(B)\nsince"},
             "3": {"id": "3", "response": None}, "99": {"id": "99", "response": "1"}}  # fmt: skip
    res = bench.score(gold, preds, split="test")
    assert (res["n"], res["correct"], res["accuracy"]) == (3, 2, 2 / 3)
    assert res["items"]["3"] == {"prediction": "", "correct": False}  # null response -> ""
    assert res["official"]["-all"] == "2/3=66.67%" and res["official"]["logic_level3"] == "0/1=0.0%"
    assert res["breakdown"]["level"]["1"] == {"correct": 1, "total": 1, "accuracy": 1.0}
    assert res["leaderboard"]["ALL"] == 66.67 and res["leaderboard"]["Log"] == 50.0
    assert any("1 prediction ids" in w for w in res["warnings"]) and res["mode"] == "official"


def test_missing_response_field_names_the_record():
    with pytest.raises(KeyError, match="record '1'.*'response'"):
        MathVision().score([free()], {"1": {"id": "1", "model_answer": "60"}})


def test_read_predictions_tolerates_invalid_utf8(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(
        b'{"id": "1", "response": "the answer is \xff\xfe 60"}\n\n{"id": "2", "response": "x"}\n'
    )
    preds = MathVision().read_predictions(path)
    assert list(preds) == ["1", "2"] and "\ufffd" in preds["1"]["response"]
    (tmp_path / "bad.jsonl").write_text('{"response": "x"}\n')
    with pytest.raises(ValueError, match="row 0: missing required field 'id'"):
        MathVision().read_predictions(tmp_path / "bad.jsonl")


# ---------------------------------------------------------------- the worker (pinned latex2sympy2)

FAST_PARITY = (
    "open-source/LLavA/LLaVA-v1.5-13B.jsonl",
)  # cheapest file: full test parity in the default run


def check_parity(rel: str, mathv_dir: Path, gold: dict, splits: tuple[str, ...]) -> None:
    """Score `rel` and compare with the official rerun (string-equal, key order) and every stored item."""
    bench = MathVision()
    preds = bench.read_predictions(mathv_dir / "outputs" / rel)
    name = MODELS[rel]
    if "test" in splits:
        res = bench.score(gold["test"], preds, split="test")
        rerun = json.loads((mathv_dir / f"official_rerun/{name}_result.json").read_text())
        published = json.loads((mathv_dir / "outputs" / rel.replace(".jsonl", "_result.json")).read_text())
        assert res["official"] == rerun == published and list(res["official"]) == list(rerun)  # 178 keys
        diff = {pid: (it["prediction"], it["correct"], preds[pid]["model_answer"], preds[pid]["correct"])
                for pid, it in res["items"].items()
                if (it["prediction"], it["correct"]) != (preds[pid]["model_answer"], preds[pid]["correct"])}  # fmt: skip
        assert not diff and res["n"] == 3040 and not res["warnings"]
        assert res["official"]["-all"] == f"{res['correct']}/3040={round(res['correct'] / 3040 * 100, 2)}%"
        assert res["equality_env"]["latex2sympy2"] == "1.9.1"
        assert res["equality_env"]["antlr4-python3-runtime"] == "4.7.2"
    if "testmini" in splits:
        mini = bench.score(gold["testmini"], preds, split="testmini")
        mini_rerun = json.loads(
            (mathv_dir / f"official_rerun/testmini_subset/{name}_result.json").read_text()
        )
        assert mini["official"] == mini_rerun and list(mini["official"]) == list(mini_rerun)  # 148 keys
        assert mini["n"] == 304 and sum(preds[pid]["correct"] for pid in mini["items"]) == mini["correct"]
        assert all((it["prediction"], it["correct"]) == (preds[pid]["model_answer"], preds[pid]["correct"])
                   for pid, it in mini["items"].items())  # fmt: skip


def test_official_parity_testmini_in_repo(gold_small, mathv_site):
    # LLaVA-v1.5-13B on the 304 testmini ids: all 148 keys of the official testmini result, every stored verdict
    check_parity(IN_REPO[0], FIXTURES / "mathvision", gold_small, ("testmini",))


def test_stored_verdicts_in_repo(gold_small, mathv_site):
    # 48 Gemini-Pro-CoT items (long \\boxed answers, fractions, options): every stored model_answer and correct
    bench = MathVision()
    preds = bench.read_predictions(FIXTURES / "mathvision/outputs" / IN_REPO[1])
    res = bench.score(gold_small["testmini"], preds, split="testmini")
    assert res["n"] == len(preds) == 48 and 0 < res["correct"] < 48
    assert {pid: (it["prediction"], it["correct"]) for pid, it in res["items"].items()} == {
        pid: (row["model_answer"], row["correct"]) for pid, row in preds.items()
    }


@pytest.mark.reference_files
@pytest.mark.parametrize("rel", sorted(MODELS))
def test_official_parity_testmini(rel, mathv_dir, gold, mathv_site):
    check_parity(rel, mathv_dir, gold, ("testmini",) if rel not in FAST_PARITY else ("test", "testmini"))


@pytest.mark.slow
@pytest.mark.reference_files
@pytest.mark.parametrize("rel", sorted(set(MODELS) - set(FAST_PARITY)))
def test_official_parity_test_slow(rel, mathv_dir, gold, mathv_site):
    # 4 x 3040 items; about 3-22 s of worker CPU each (Random-Chance is the slowest)
    check_parity(rel, mathv_dir, gold, ("test",))


@pytest.fixture(scope="module")
def worker(mathv_site):
    with eq.EqualityWorker(mathv_site) as w:
        yield w


@pytest.mark.parametrize(
    "gt, answer, expected",
    [
        ("\\frac{4}{3}", "1.333", True),  # 1.33 == 1.33: the only numeric tolerance
        ("\\frac{4}{3}", "1.34", False),
        ("(1,2)", "(1.0,2)", True),  # eval_tuple, then string equality
        ("2\\sqrt{3}", "3.46", True),
        ("2\\sqrt{3}", "\\sqrt{12}", True),
        ("1", "1<2", True),  # upstream evaluates "1 < 2" to True and round(True, 2) == 1
        ("e", "2.72", False),  # latex2sympy gives E, which is not a math name
        ("\\pi", "3.14", True),
        ("5", "\\frac{1}{0}", False),
        ("1", "\\binom{n}{0}", False),  # 1 in a fresh latex2sympy2; upstream's steady state fails on letters
        ("12", "12\\%", False),  # 12\% -> 3/25
    ],
)
def test_numeric_equality_cases(gt, answer, expected, worker):
    assert worker.run([[(gt.lower(), answer.lower())]]) == [(expected, None)]


VALUES = """
import json, runpy, sys
sys.path.insert(0, sys.argv[1])
mod = runpy.run_path(sys.argv[2])
import latex2sympy2
mod["enter_upstream_steady_state"](latex2sympy2)
out = []
for s in json.loads(sys.stdin.read()):
    try:
        out.append(repr(mod["rounded_value"](s, latex2sympy2.latex2sympy)))
    except Exception:
        out.append(None)
print(json.dumps(out))
"""


def test_local_verdicts_agree_with_pinned_latex2sympy2(mathv_site, gold_small):
    # `local_verdict` skips the worker for single letters (never a value) and plain numerals (p/q);
    # check both against round(eval(str(latex2sympy(s))), 2) computed with the pinned packages
    import subprocess

    rng = random.Random(0)
    answers = (r["answer"].lower() for r in gold_small["testmini"])
    numerals = {a for a in answers if eq.plain_value(a) is not None}
    for _ in range(300):
        whole = str(rng.randint(0, 10 ** rng.randint(1, 15)))
        frac = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 15)))
        numerals |= {whole, "-" + whole, f"{whole}.{frac}", f"-{whole}.{frac}", "00" + whole}
    strings = sorted(numerals) + list("abcdefghijklmnopqrstuvwxyz")
    out = subprocess.run([sys.executable, "-I", "-c", VALUES, str(mathv_site), eq.__file__],
                         input=json.dumps(strings), capture_output=True, text=True, check=True)  # fmt: skip
    pinned = dict(zip(strings, json.loads(out.stdout)))
    fast = [n for n in numerals if eq.plain_value(n) is not None]  # at most 15 + 15 digits
    assert len(fast) > 1000
    assert {s: v for s, v in pinned.items() if len(s) == 1 and s.isalpha() and v is not None} == {}
    assert {
        n: (pinned[n], repr(eq.plain_value(n))) for n in fast if pinned[n] != repr(eq.plain_value(n))
    } == {}


def test_worker_timeout_restarts_and_scores_the_rest(mathv_site):
    # factorial(10**7) (~6.6e7 digits) takes far longer than 2 s; the worker is killed and restarted
    jobs = [[("1", "(10^{7})!")], [("2", "2.0")], [("2", "3")]]
    with eq.EqualityWorker(mathv_site, item_timeout=2.0) as w:
        t0 = time.monotonic()
        assert w.run(jobs) == [(False, "timeout"), (True, None), (False, None)]
        assert time.monotonic() - t0 < 60


def test_main_process_keeps_its_own_antlr4(worker, mathv_site):
    worker.run([[("1", "1.0")]])
    assert worker.versions["antlr4-python3-runtime"] == "4.7.2" and worker.versions["sympy"] == "1.14.0"
    mod = sys.modules.get("antlr4")
    assert mod is None or not str(Path(mod.__file__).resolve()).startswith(str(mathv_site.resolve()))
    assert "latex2sympy2" not in sys.modules


ADVERSARIAL_LATEX = {
    "power_tower_latex": "\\boxed{9^{9^{9^{9}}}}",
    "factorial_huge": "\\boxed{(10^{7})!}",
    "deep_parens": "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",
    "lone_surrogate": "\\boxed{\ud800}",
    "huge_boxed_sum": "\\boxed{" + "1+" * 100_000 + "1}",
}


def score_bounded(response: str, site: Path) -> dict:
    bench = MathVision()
    bench.site, bench.item_timeout = site, 3.0
    t0 = time.monotonic()
    res = bench.score([free("2"), choice("B")], {rid: {"id": rid, "response": response} for rid in "12"})
    assert time.monotonic() - t0 < 90  # 2 items x 3 s at most, plus worker restarts
    return res


@pytest.mark.parametrize("name", sorted(ADVERSARIAL_LATEX))
def test_adversarial_latex_scored_wrong_in_bounded_time(name, mathv_site):
    res = score_bounded(ADVERSARIAL_LATEX[name], mathv_site)
    assert res["correct"] == 0 and res["n"] == 2


def test_adversarial_responses_scored_wrong(adversarial, mathv_site):
    name, response = adversarial  # shared adversarial responses (tests/bench/conftest.py)
    res = score_bounded(response, mathv_site)
    assert res["correct"] == 0, (name, res["items"])


# ---------------------------------------------------------------- the private site on first use


def test_site_is_installed_on_first_use_with_one_line(tmp_path, monkeypatch, capsys, mathv_site):
    calls = []

    def fake_install(site, quiet=True):  # stands in for pip: links the real site
        calls.append(site)
        Path(site).symlink_to(mathv_site, target_is_directory=True)
        return site

    monkeypatch.setattr(eq, "install_site", fake_install)
    bench = MathVision()
    bench.site = tmp_path / "site"
    preds = {"1": {"id": "1", "response": "\\boxed{1.333}"}}  # 4/3 vs 1.333: decided by the worker
    res = bench.score([free("\\frac{4}{3}")], preds)
    assert res["correct"] == 1 and calls == [tmp_path / "site"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "installing them once into" in err and "latex2sympy2==1.9.1" in err
    assert eq.ensure_site(tmp_path / "site") == tmp_path / "site" and len(calls) == 1  # ready: nothing to do
    assert capsys.readouterr().err == ""


def test_offline_setup_fails_before_reading_data_and_names_the_command(tmp_path, monkeypatch, capsys):
    from mmrlsd.bench.base import Bench
    from mmrlsd.cli import main

    def no_reads(*args, **kwargs):
        raise AssertionError("data was read before the setup check")

    monkeypatch.setattr(Bench, "load", no_reads)
    monkeypatch.setenv(eq.SITE_ENV, str(tmp_path / "site"))  # a missing site; pip cannot reach any index
    for key, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0",
                       "PIP_TIMEOUT": "2", "PIP_FIND_LINKS": "", "PIP_NO_INDEX": ""}.items():  # fmt: skip
        monkeypatch.setenv(key, value) if value else monkeypatch.delenv(key, raising=False)
    argv = ["--bench", "mathvision", "--predictions", "p.jsonl", "--data", "test.jsonl"]
    assert main(["eval", *argv]) == 1
    err = capsys.readouterr().err
    assert "installing them once into" in err and "error: mathvision: could not install" in err
    assert "python -m mmrlsd.bench.mathvision_setup" in err and not eq.site_ready(tmp_path / "site")

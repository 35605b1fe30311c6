"""Tests for mmrlsd/data/prompts.py (and encoding.user_messages) and the release's prompt templates (mmrlsd/prompts/unified_*.jinja):
exact rendered text, `<image>` placement, and the image pixel budget the paper configs set."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
from PIL import Image

from mmrlsd.data import encoding
from mmrlsd.data.encoding import encode, user_messages
from mmrlsd.data.prompts import PromptBuilder, load_template
from mmrlsd.data.sources import FieldMap, to_sample
from mmrlsd.types import Sample

REPO = Path(__file__).resolve().parents[2]
STUDENT = REPO / "mmrlsd/prompts/unified_student.jinja"
TEACHER = REPO / "mmrlsd/prompts/unified_teacher.jinja"
FORMAT = (
    "- Format: You FIRST think about the reasoning process as an internal monologue enclosed within "
    "<thought> </thought> tags. The final answer MUST be enclosed within <answer> </answer> tags.\n"
)


@pytest.fixture(scope="module")
def processor():
    from mmrlsd.model.tiny import build_processor, build_tokenizer

    return build_processor("qwen2_vl", build_tokenizer())


def _render(path, **kw) -> str:
    return load_template(path).render(**kw)


def test_doctests():
    failed, attempted = doctest.testmod(encoding)
    assert attempted >= 2 and failed == 0


def test_student_multiple_choice_exact_text():
    got = _render(STUDENT, problem="<image>Which shape is red? ", problem_type="Multiple Choice",
                  options=["A. circle", "B. square"])  # fmt: skip
    assert got == (
        "\nYou are an intelligent assistant capable of solving multiple choice questions.\n\n"
        "[MULTIPLE CHOICE Tasks]\n"
        "- Goal: Analyze the question and select the correct option.\n"
        + FORMAT
        + "- Constraint: The content "
        "inside <answer> must be exactly the letter of the correct option (e.g., A, B, C, D).\n\n"
        "<image>Which shape is red?\n\nOptions:\nA. circle\nB. square\n"
    )
    # no options: the question ends the prompt
    assert _render(
        STUDENT, problem="Which? (A) x (B) y", problem_type="multiple choice", options=[]
    ).endswith("(e.g., A, B, C, D).\n\nWhich? (A) x (B) y")


def test_student_free_form_math_and_untyped_exact_text():
    assert _render(STUDENT, problem=" What is 2+2? ", problem_type="free-form", options=[]) == (
        "\nYou are an intelligent assistant capable of answering various questions.\n\n"
        "[OPEN-ENDED Tasks]\n- Goal: Answer the question based on the given context.\n"
        + FORMAT
        + "\nWhat is 2+2?"
    )
    assert _render(STUDENT, problem="<image>x?", problem_type="math", options=[]) == (
        "\nYou are an intelligent assistant capable of solving mathematical problems.\n\n"
        "[MATHEMATICS Tasks]\n- Goal: Solve the math problem.\n" + FORMAT + "\n<image>x?"
    )
    untyped = _render(STUDENT, problem="q", options=[])  # no problem_type: open-ended
    assert untyped.startswith("\nYou are an intelligent assistant capable of answering various questions.\n\n"
                              "[OPEN-ENDED Tasks]")  # fmt: skip
    # a type the template does not know (also the underscore spelling) gets the general preamble
    assert "[GENERAL Tasks]" in _render(STUDENT, problem="q", problem_type="multiple_choice", options=[])
    numerical = _render(STUDENT, problem="q", problem_type="numerical", options=[])
    assert "think about the computation process" in numerical
    assert "- Constraint: The content inside <answer> must be only the numerical value.\n\nq" in numerical


def test_teacher_exact_text():
    got = _render(TEACHER, problem=" <image>What is 2+2? ", reference=" 4 ")
    assert got == (
        "<image>What is 2+2?\n\nHere is a reference solution:\n4\n\n"
        "After understanding the reference solution, please try to solve this problem using your own approach "
        "below. You FIRST think about the reasoning process as an internal monologue enclosed within <thought> "
        "</thought> tags. The final answer MUST be enclosed within <answer> </answer> tags."
    )


def test_user_messages_places_images_at_markers():
    content = user_messages("pre\n\n<image>mid<image>", 2)[0]["content"]
    assert content == [{"type": "text", "text": "pre\n\n"}, {"type": "image"}, {"type": "text", "text": "mid"},
                       {"type": "image"}]  # fmt: skip
    # no marker, or a marker count that does not match the images: images first, text untouched
    assert user_messages("q", 1)[0]["content"] == [{"type": "image"}, {"type": "text", "text": "q"}]
    assert user_messages("a<image>b", 2)[0]["content"][:2] == [{"type": "image"}, {"type": "image"}]
    assert user_messages("a<image>b", 0)[0]["content"] == [{"type": "text", "text": "a<image>b"}]


def _sample(problem, ptype="multiple choice", options=("A. 1", "B. 2")) -> Sample:
    img = Image.new("RGB", (56, 56), "red")
    return Sample(id="s", problem=problem, answer="B", images=["x.png"], problem_type=ptype,
                  options=list(options), pil_images=[img])  # fmt: skip


def test_student_image_tokens_sit_where_the_marker_was(processor):
    pb = PromptBuilder(processor, STUDENT, TEACHER, "answer")
    s = _sample("<image>Which is larger?")
    student, teacher = pb.student(s), pb.teacher(s)
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    # student: preamble, then the image, then the question; teacher: the image first, then the question
    assert (
        student.index("[MULTIPLE CHOICE Tasks]") < student.index(vision) < student.index("Which is larger?")
    )
    assert (student.count(vision), teacher.count(vision)) == (1, 1)
    assert "<image>" not in student and "<image>" not in teacher
    assert teacher.split(vision)[1].startswith("Which is larger?\n\nHere is a reference solution:\nB\n\n")
    # after tokenisation the image pad tokens also sit between the preamble and the question
    enc = encode(processor, [student], [s.pil_images])
    ids = enc["input_ids"][0].tolist()
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    first, last = ids.index(pad), len(ids) - 1 - ids[::-1].index(pad)
    n_tokens = int(enc["image_grid_thw"].prod()) // 4  # 2x2 merge
    assert last - first + 1 == n_tokens == ids.count(pad)
    before = processor.tokenizer.decode(ids[:first])
    after = processor.tokenizer.decode(ids[last + 1 :])
    assert "[MULTIPLE CHOICE Tasks]" in before and "Which is larger?" not in before
    assert "Which is larger?" in after and "Options:" in after


def test_problem_without_marker_keeps_images_first(processor):
    pb = PromptBuilder(processor, STUDENT, TEACHER, "answer")
    student = pb.student(_sample("Which is larger?"))
    assert student.index("<|vision_start|>") < student.index("You are an intelligent assistant")


def test_records_keep_markers_and_options(tmp_path):
    fields = FieldMap()
    s = to_sample({"problem": " <image>Which? ", "answer": "B", "images": ["a.png"], "options": ["A. 1", 2]},
                  "r:1", fields, tmp_path)  # fmt: skip
    assert (s.problem, s.options) == ("<image>Which?", ["A. 1", "2"])
    bad = to_sample(
        {"problem": "<image><image>q", "answer": "1", "images": ["a.png"]}, "r:2", fields, tmp_path
    )
    assert bad.reason == "question has 2 <image> markers for 1 images"
    bad = to_sample({"problem": "q", "answer": "1", "options": {"A": 1}}, "r:3", fields, tmp_path)
    assert bad.reason == "field 'options' must be a list of strings"
    assert to_sample({"problem": "q", "answer": "1", "options": "A. x"}, "r:4", fields, tmp_path).options == [
        "A. x"
    ]


def test_paper_configs_use_the_release_prompts():
    from mmrlsd.config import load_config

    for name in ("qwen2vl_7b", "qwen25vl_7b", "qwen3vl_8b", "grpo_qwen3vl_8b", "opsd_qwen2vl_7b"):
        d = load_config(REPO / "configs" / f"{name}.yaml").data
        assert (d.student_template, d.teacher_template) == (str(STUDENT), str(TEACHER)), name


# ------------------------------------------------------------------------------------------- pixel budget
def test_release_pixel_budget_upscales_small_and_caps_large_images(processor):
    import copy

    from mmrlsd.model.load import set_pixel_budget

    proc = copy.deepcopy(processor)
    set_pixel_budget(proc, 262144, 1048576)
    ip = proc.image_processor
    patch = ip.patch_size
    for size, lo, hi in [((64, 48), 262144, None), ((2000, 1500), None, 1048576), ((700, 600), None, None)]:
        out = ip(images=[Image.new("RGB", size, "blue")], return_tensors="pt")
        t, h, w = out["image_grid_thw"][0].tolist()
        pixels = h * patch * w * patch
        assert 262144 <= pixels <= 1048576, (size, pixels)
        if lo:  # 3,072 pixels upscaled at least 85-fold, aspect ratio kept to within a patch row/column
            assert abs(h / w - 48 / 64) < 0.1
        if hi:
            assert pixels > 0.9 * 1048576  # capped, not shrunk further than rounding to patches needs
        if size == (700, 600):  # already inside the budget: only rounded to whole 28-px merge blocks
            assert (h * patch, w * patch) == (588, 700)
    # the default tiny processor (max 112x112) would shrink the large image far below the release's minimum
    out = processor.image_processor(images=[Image.new("RGB", (2000, 1500))], return_tensors="pt")
    assert int(out["image_grid_thw"][0].prod()) * patch * patch <= 112 * 112

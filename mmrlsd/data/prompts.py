"""Student and teacher prompts from Jinja template files, rendered into the chat template.

The student sees the question x; the teacher sees x plus the privileged information r (the reference answer, or
for OPSD the reference solution). Both get the same images in the same order, so the pixel values and image
grid are identical and only the text positions differ. An image goes where its ``<image>`` marker is in the
rendered text (the release's layout: after the task preamble for the student, at the start of the question for
the teacher); text without markers gets all its images first.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment

from mmrlsd.data.encoding import chat_text
from mmrlsd.data.sanitize import neutralize_special_tokens, special_tokens
from mmrlsd.errors import ConfigError
from mmrlsd.types import Sample

_ENV = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False)
VARIABLES = ("problem", "problem_type", "options", "reference", "answer", "solution", "demonstration", "feedback")
"""The variables a template may use: `problem` (student and teacher; it keeps the record's ``<image>`` markers),
`problem_type` (defined only when the record has one), `options` (a list of strings, maybe empty) and the
privileged information (`reference` is the one `teacher_info` selects: the answer, the solution, or for SDPO the
`demonstration`; SDPO's `feedback` is an incorrect sibling response, empty when there is none or unused)."""
_PLACEHOLDERS = {**dict.fromkeys(VARIABLES, "x"), "options": ["x"]}


def load_template(path: str | Path):
    """Compile a Jinja template file (sandboxed, undefined variables are errors)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: prompt template not found")
    try:
        return _ENV.from_string(p.read_text(encoding="utf-8"))
    except (TemplateSyntaxError, UnicodeDecodeError) as e:
        line = f" (line {e.lineno})" if isinstance(e, TemplateSyntaxError) else ""
        raise ConfigError(f"{path}: not a valid prompt template{line}: {e}") from None


def check_template(tpl, path: str | Path) -> None:
    """Render once with placeholder values, so a misspelt variable fails at start-up naming the file, not at
    the first training step."""
    try:
        tpl.render(**_PLACEHOLDERS)
    except TemplateError as e:  # UndefinedError, SecurityError, ...
        known = ", ".join(VARIABLES)
        raise ConfigError(f"{path}: prompt template cannot render: {e} (variables: {known})") from None


class PromptBuilder:
    """Renders the student prompt x and the teacher prompt (x, r) of a sample as chat-formatted text."""

    def __init__(
        self, processor, student_template: str | Path, teacher_template: str | Path, teacher_info: str
    ):
        self.processor = processor
        self.student_tpl = load_template(student_template)
        self.teacher_tpl = load_template(teacher_template)
        check_template(self.student_tpl, student_template)
        check_template(self.teacher_tpl, teacher_template)
        self.teacher_info = teacher_info
        self.special = special_tokens(processor) if processor is not None else None

    def clean(self, text: str | None) -> str | None:
        """Special-token text (`<|image_pad|>`, `<|im_end|>`, ...) in data or model output made harmless."""
        return neutralize_special_tokens(text, self.special) if text else text

    def question_vars(self, s: Sample) -> dict:
        """The question's template variables: problem, options, and problem_type when the record has one."""
        out = {"problem": self.clean(s.problem), "options": [self.clean(o) for o in s.options]}
        if s.problem_type is not None:
            out["problem_type"] = s.problem_type
        return out

    def student(self, s: Sample) -> str:
        return chat_text(self.processor, self.student_tpl.render(**self.question_vars(s)), len(s.images))

    def teacher(self, s: Sample, demonstration: str | None = None, feedback: str | None = None) -> str:
        """The teacher prompt; `demonstration` is the correct sibling response SDPO conditions on
        (`teacher_info: sibling`, where it is required), `feedback` an incorrect one (`algo.sdpo_pick: shortest`)."""
        reference = s.answer
        if self.teacher_info == "solution":  # OPSD: the full reference solution, never the answer in its place
            if not (s.solution or "").strip():
                raise ValueError(f"record {s.id!r}: teacher_info 'solution' but the record has no solution text")
            reference = s.solution
        elif self.teacher_info == "sibling":
            if demonstration is None:
                raise ValueError(f"sample {s.id!r}: teacher_info 'sibling' needs a demonstration")
            reference = demonstration
        c = self.clean
        text = self.teacher_tpl.render(**self.question_vars(s), reference=c(reference), answer=c(s.answer),
                                       solution=c(s.solution), demonstration=c(demonstration) or "",
                                       feedback=c(feedback) or "")  # fmt: skip
        return chat_text(self.processor, text, len(s.images))

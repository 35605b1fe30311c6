"""Student and teacher prompts from Jinja template files, rendered into the chat template.

The student sees the question x; the teacher sees x plus the privileged information r (the reference answer, or
for OPSD the reference solution). Both get the same images in the same place (before the text), so the pixel
values and image grid are identical and only the text positions differ.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment

from mmrlsd.data.encoding import chat_text
from mmrlsd.errors import ConfigError
from mmrlsd.types import Sample

_ENV = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False)
VARIABLES = ("problem", "reference", "answer", "solution", "demonstration")
"""The variables a template may use: `problem` (student and teacher) and the privileged information
(`reference` is the one `teacher_info` selects: the answer, the solution, or for SDPO the `demonstration`)."""


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
        tpl.render(**dict.fromkeys(VARIABLES, "x"))
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

    def student(self, s: Sample) -> str:
        return chat_text(self.processor, self.student_tpl.render(problem=s.problem), len(s.images))

    def teacher(self, s: Sample, demonstration: str | None = None) -> str:
        """The teacher prompt; `demonstration` is the correct sibling response SDPO conditions on
        (`teacher_info: sibling`, where it is required)."""
        reference = s.answer
        if self.teacher_info == "solution":
            reference = s.solution or s.answer  # OPSD: the full reference solution when the record has one
        elif self.teacher_info == "sibling":
            if demonstration is None:
                raise ValueError(f"sample {s.id!r}: teacher_info 'sibling' needs a demonstration")
            reference = demonstration
        text = self.teacher_tpl.render(problem=s.problem, reference=reference, answer=s.answer,
                                       solution=s.solution, demonstration=demonstration or "")  # fmt: skip
        return chat_text(self.processor, text, len(s.images))

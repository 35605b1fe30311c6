"""Verifiable rewards: the shared answer checker (`answer`), the time-limited math-equivalence worker
(`verify`) and the reward functions registered by name (`rewards`).

Importing this package loads no torch, sympy or math-verify; the symbolic checker runs in a separate
worker process started on first use.
"""

from mmrlsd.reward.answer import (
    choice_equal,
    extract_answer,
    extract_answer_tag,
    extract_boxed,
    format_ok,
    normalize_choice,
    parse_number,
    strip_latex,
)
from mmrlsd.reward.rewards import REWARDS, RewardResult, get_reward, score_responses
from mmrlsd.reward.verify import math_equal, math_equal_batch

__all__ = [
    "REWARDS",
    "RewardResult",
    "get_reward",
    "math_equal",
    "math_equal_batch",
    "score_responses",
    "choice_equal",
    "extract_answer",
    "extract_answer_tag",
    "extract_boxed",
    "format_ok",
    "normalize_choice",
    "parse_number",
    "strip_latex",
]

"""Pure tensor functions: group advantages, RLSD token advantages, the methods' table, the PPO clipped loss,
OPSD/SDPO terms.

No model, config object, file or `self` in here: every scalar is an explicit argument, every shape is documented.
"""

from mmrlsd.algo.advantage import ADVANTAGES, get_advantage, grpo_advantages
from mmrlsd.algo.loss import ppo_clip_loss
from mmrlsd.algo.methods import METHODS, TokenRule, get_method, privileged_gain, token_advantages
from mmrlsd.algo.opsd import generalized_jsd
from mmrlsd.algo.rlsd import evidence_weights, lam_at, rlsd_token_advantages
from mmrlsd.algo.sdpo import demonstration_mask, pick_demonstrations

__all__ = [
    "ADVANTAGES",
    "METHODS",
    "TokenRule",
    "demonstration_mask",
    "evidence_weights",
    "generalized_jsd",
    "get_advantage",
    "get_method",
    "grpo_advantages",
    "lam_at",
    "pick_demonstrations",
    "ppo_clip_loss",
    "privileged_gain",
    "rlsd_token_advantages",
    "token_advantages",
]

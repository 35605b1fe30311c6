"""A reward plugin for tests: random tiny models never answer correctly, so the math reward is always 0 and GRPO
has no signal. This reward varies with the sampled text, so every group has non-zero advantages."""

from mmrlsd.reward.rewards import REWARDS, RewardResult, register_reward

if "charcount" not in REWARDS:

    @register_reward("charcount")
    def charcount(responses, answers, problem_types=None, **_):
        """reward = min(1, (# of 'e' and 's' characters) / 4)."""
        out = []
        for r in responses:
            v = min(1.0, (r.count("e") + r.count("s")) / 4)
            out.append(RewardResult(reward=v, accuracy=float(v == 1.0), format=0.0, extracted=None))
        return out

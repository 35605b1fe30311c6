"""Config keys whose valid values are the names a registry holds: the registries are the lists.

    algo.token_adv          mmrlsd.algo.methods.METHODS
    algo.adv                mmrlsd.algo.advantage.ADVANTAGES
    reward.name             mmrlsd.reward.rewards.REWARDS (after importing `reward.plugins`)
    model.packed_attention  mmrlsd.model.packing.ATTENTION_KERNELS

`mmrlsd.config.load_config` checks what the config itself defines (types, ranges, fixed choices); these keys are
checked here, by the layer that can see the registries, before any model is built (`train`, `mmrlsd validate`).
`mmrlsd ls` prints the same lists.
"""

from __future__ import annotations

import importlib

from mmrlsd.algo.advantage import ADVANTAGES
from mmrlsd.algo.methods import METHODS
from mmrlsd.config import Config
from mmrlsd.errors import ConfigError
from mmrlsd.model.packing import ATTENTION_KERNELS
from mmrlsd.reward.rewards import REWARDS


def registered_choices() -> dict[str, list[str]]:
    """Config key -> the names its registry holds now (in registration order)."""
    return {
        "algo.token_adv": list(METHODS),
        "algo.adv": list(ADVANTAGES),
        "reward.name": list(REWARDS),
        "model.packed_attention": list(ATTENTION_KERNELS),
    }


def check_registered(cfg: Config, src: str = "<config>") -> Config:
    """Import the reward plugins (they register rewards), then check every registry-backed key; returns `cfg`."""
    for module in cfg.reward.plugins:
        importlib.import_module(module)
    for key, names in registered_choices().items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in names:
            raise ConfigError(f"{src}: '{key}' is {value!r}; valid choices: {', '.join(names)}")
    return cfg

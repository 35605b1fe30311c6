"""Fault injection for the kill/resume tests: with `MMRLSD_FAULT=<point>:<step>` set, the process SIGKILLs itself
when training reaches that point of that step. Points: `rollout` (after sampling), `update` (after the first
micro-batch backward), `checkpoint` (after the weights are written, before the checkpoint is complete)."""

from __future__ import annotations

import os
import signal


def point(name: str, step: int) -> None:
    if os.environ.get("MMRLSD_FAULT") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)

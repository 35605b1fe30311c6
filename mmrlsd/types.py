"""Records handed between pipeline stages. Shapes: B prompts, G samples per prompt, N = B*G, P prompt width,
T response width."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sample:
    """One training/validation record after field remapping and validation."""

    id: str
    problem: str
    """The question text; its `<image>` markers, if any, are kept (one per image: where the images go)."""
    answer: str
    images: list[str] = field(default_factory=list)
    """Resolved image paths or URLs, or labels of images stored in the dataset (empty: a text-only problem)."""
    problem_type: str | None = None
    solution: str | None = None
    options: list[str] = field(default_factory=list)
    """Answer options of a multiple-choice record, when the data lists them apart from the question."""
    pil_images: list = field(default_factory=list)
    """Loaded RGB images (filled when a batch draws the sample, not serialised)."""
    image_data: list = field(default_factory=list)
    """What each of `images` loads from, when not the path itself: bytes, a PIL image, or a reference into
    the dataset's table (empty: load `images`)."""


@dataclass
class SeqBatch:
    """N full sequences `[left-padded prompt | right-padded response]` ready for one forward pass."""

    input_ids: torch.Tensor  # (N, P+T)
    attention_mask: torch.Tensor  # (N, P+T)
    mm_token_type_ids: torch.Tensor | None  # (N, P+T), 1 on image tokens
    pixel_values: torch.Tensor | None  # (patches, C·t·p·p) of all images, sequence order (or per group)
    image_grid_thw: torch.Tensor | None  # (n_images, 3), every sequence's images
    images_per_seq: list[int]  # (N,) images owned by each sequence, in order
    prompt_len: int  # P (response token t sits at column P + t)
    pixel_group_size: int = 1  # G > 1: pixel_values holds each group's first sequence's rows only

    @property
    def response_len(self) -> int:
        return self.input_ids.shape[1] - self.prompt_len


@dataclass
class Rollouts:
    """B*G sampled responses (prompt b owns rows b*G .. b*G+G-1)."""

    response_ids: torch.Tensor  # (N, T) right-padded with pad id
    response_mask: torch.Tensor  # (N, T) 1 up to and including the first EOS
    texts: list[str]  # (N,) decoded responses, special tokens removed
    group_size: int  # G

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)  # (N,)


@dataclass
class Groups:
    """B prompts with G sampled responses each, scored: what rollout, reward and group advantage hand on (and the
    unit a filter drops or a refill adds)."""

    samples: list[Sample]  # (B,)
    encoding: dict  # the B student prompts repeated G times: a processor encoding of B*G rows
    rollouts: Rollouts  # (B*G,) responses y
    results: list  # (B*G,) the reward's `RewardResult`s (reward, accuracy, format, extracted answer)
    rewards: torch.Tensor  # (B*G,) R
    adv: torch.Tensor  # (B*G,) A, the group advantage

    @property
    def group_size(self) -> int:
        return self.rollouts.group_size


@dataclass
class StepResult:
    """What one `rlsd_step` returns to the loop: scalar metrics and the per-token dump of the update."""

    metrics: dict[str, float]
    dump: list[dict]

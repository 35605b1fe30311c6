"""`mmrlsd sft`: supervised fine-tuning on reference solutions (how the tiny lab's starting model is made).

    mmrlsd sft configs/tiny_sft.yaml --output-dir runs/sft
    mmrlsd sft configs/tiny_sft.yaml --output-dir runs/sft optim.lr=1e-4 trainer.total_steps=50

The loss is the token-mean cross-entropy of the reference `solution` (plus the closing `<|im_end|>`), given the
student prompt; prompt and padding tokens carry no loss:

    L = -Σ_i Σ_t mask_it · log π(y_it | x_i, y_i<t) / Σ_i Σ_t mask_it

The prompt is the RL student prompt (same Jinja template, chat template and images), and the log-probs come from
the same forward pass RL uses (`mmrlsd.model.logprobs.forward_logprobs`), so RL starts from exactly the
distribution SFT trained. AdamW with linear warm-up, then cosine decay to `sft.min_lr_ratio`·lr.

With an empty `model.path` the model is built from scratch (`mmrlsd.model.tiny.make_tiny`, sized by the `init`
section), its byte-level BPE tokenizer trained on the training records' text. The run directory gets the
resolved config, `metrics.jsonl` and the final model + processor in Hugging Face format (`DIR/model/`), which
`model.path` of an RL config can point to.

Config: the RL sections `model`, `data`, `rollout` (validation decoding), `reward` (validation scoring), `optim`,
`trainer`, plus `sft` and `init` below, loaded with the same strict loader rules (unknown keys fail with a
suggestion). Keys of the RL sections that SFT does not use are ignored (e.g. `rollout.n`, `optim.mini_batches`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmrlsd.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    RolloutConfig,
    TrainerConfig,
    dump_config,
    load_dataclass,
)
from mmrlsd.data.encoding import encode
from mmrlsd.data.prompts import PromptBuilder
from mmrlsd.data.sanitize import PromptCheck, neutralize_special_tokens
from mmrlsd.data.sources import FieldMap, RecordLimits, load_dataset_files
from mmrlsd.errors import DataError
from mmrlsd.log import MetricsWriter
from mmrlsd.model.load import compute_autocast, load_model, resolve_device
from mmrlsd.model.logprobs import build_sequences, forward_logprobs, slice_seq
from mmrlsd.model.tiny import TinySize
from mmrlsd.train.validate import validate
from mmrlsd.types import Rollouts, Sample, SeqBatch

log = logging.getLogger("mmrlsd.sft")


@dataclass
class SFTSection:
    batch_size: int = 32
    """Sequences per optimizer step."""
    min_lr_ratio: float = 0.1
    """Cosine decay after warm-up ends at min_lr_ratio·lr on the last step (1: constant lr)."""
    val_items: int = 0
    """Validation items used by the periodic check during training (0: all of `data.val_files`)."""
    teacher_frac: float = 0.0
    """Fraction of training sequences shown the teacher prompt (question + privileged reference) instead of the
    student prompt, so the model learns to use a reference in context, as the paper's instruct models can."""
    teacher_infos: list[str] = field(default_factory=lambda: ["answer", "solution"])
    """Privileged information of those sequences, drawn uniformly per sequence: answer | solution."""


@dataclass
class InitConfig(TinySize):
    """The random-init tiny model built when `model.path` is empty: its widths (`TinySize`) and these."""

    arch: str = "qwen2_vl"
    """qwen2_vl | qwen2_5_vl | qwen3_vl."""
    vocab_size: int = 384
    """BPE vocabulary (special and added tokens included in the count the trainer aims for)."""
    added_tokens: list[str] = field(
        default_factory=lambda: ["<thought>", "</thought>", "<answer>", "</answer>"]
    )
    """Single tokens added to the tokenizer (the response tags)."""
    corpus_records: int = 4000
    """Training records whose question and solution texts train the tokenizer."""
    seed: int = 0
    """Seed of the random init."""


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sft: SFTSection = field(default_factory=SFTSection)
    init: InitConfig = field(default_factory=InitConfig)


def load_sft_config(path: str | Path | None, overrides: list[str] | None = None) -> SFTConfig:
    """Read the YAML at `path`, apply dotted overrides, type-check (same rules as `mmrlsd.config.load_config`)."""
    cfg = load_dataclass(SFTConfig, path, overrides)
    src = str(path) if path else "<defaults>"
    if not cfg.data.train_files:
        raise ConfigError(f"{src}: 'data.train_files' is required")
    for key, value in (("sft.batch_size", cfg.sft.batch_size), ("trainer.total_steps", cfg.trainer.total_steps),
                       ("optim.micro_batch_size", cfg.optim.micro_batch_size), ("optim.lr", cfg.optim.lr)):  # fmt: skip
        if value <= 0:
            raise ConfigError(f"{src}: '{key}' must be > 0, got {value!r}")
    if cfg.optim.lr > 1:
        raise ConfigError(f"{src}: 'optim.lr' must be <= 1, got {cfg.optim.lr!r}")
    if not 0 <= cfg.sft.teacher_frac <= 1:
        raise ConfigError(f"{src}: 'sft.teacher_frac' must be in [0, 1], got {cfg.sft.teacher_frac}")
    bad = [i for i in cfg.sft.teacher_infos if i not in ("answer", "solution")]
    if bad or not cfg.sft.teacher_infos:
        raise ConfigError(
            f"{src}: 'sft.teacher_infos' must be a non-empty list of answer | solution, got {bad}"
        )
    if not 0 <= cfg.sft.min_lr_ratio <= 1:
        raise ConfigError(f"{src}: 'sft.min_lr_ratio' must be in [0, 1], got {cfg.sft.min_lr_ratio}")
    return cfg


def lr_at(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up over `warmup` steps, then cosine decay
    from lr to min_ratio·lr at the last step.

    >>> [round(lr_at(s, 1.0, warmup=2, total=6, min_ratio=0.0), 3) for s in range(6)]
    [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = (step - warmup) / span
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def solution_batch(processor, samples: list[Sample], texts: list[str]) -> SeqBatch:
    """`[left-padded prompt | right-padded solution + <|im_end|>]` for each sample (`texts`: its
    chat-formatted prompt); the response mask covers the solution tokens and the end-of-turn token, exactly what
    a rollout's mask covers."""
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    enc = encode(processor, texts, [s.pil_images for s in samples])
    clean = [neutralize_special_tokens(s.solution or "", processor) for s in samples]  # no forged <|im_end|>
    targets = [tok(text, add_special_tokens=False)["input_ids"] + [eos] for text in clean]
    T = max(len(t) for t in targets)
    ids = torch.full((len(samples), T), tok.pad_token_id, dtype=torch.long)  # (N, T)
    mask = torch.zeros((len(samples), T), dtype=torch.long)  # (N, T)
    for i, t in enumerate(targets):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = 1
    return build_sequences(enc, Rollouts(response_ids=ids, response_mask=mask, texts=[], group_size=1))


def prompt_texts(
    builders: dict[str, PromptBuilder],
    samples: list[Sample],
    teacher_frac: float,
    infos: list[str],
    rng: random.Random,
) -> list[str]:
    """The chat prompt of each sample: the student prompt, or with probability `teacher_frac` the teacher prompt
    with privileged information drawn from `infos` (`builders` maps an info name to its prompt builder)."""
    texts = []
    for s in samples:
        if teacher_frac > 0 and rng.random() < teacher_frac:
            texts.append(builders[rng.choice(infos)].teacher(s))
        else:
            texts.append(builders["answer"].student(s))
    return texts


def sft_loss(policy, seq: SeqBatch, micro_batch_size: int, backward: bool = True) -> tuple[float, float]:
    """Token-mean NLL of the responses in `seq`, accumulated over micro-batches (each divided by the token count
    of the whole batch, so the gradient equals one big batch's). Returns `(loss, tokens)`."""
    n = seq.input_ids.shape[0]
    mask = seq.attention_mask[:, seq.prompt_len :].float()  # (N, T)
    tokens = float(mask.sum())
    total = 0.0
    device = next(policy.parameters()).device
    for start in range(0, n, micro_batch_size):
        stop = min(n, start + micro_batch_size)
        with torch.set_grad_enabled(backward):
            logp, _ = forward_logprobs(policy, slice_seq(seq, start, stop))  # (n, T)
            loss = -(logp * mask[start:stop].to(device)).sum() / max(tokens, 1.0)
        if backward:
            loss.backward()
        total += float(loss.detach())
    return total, tokens


def init_model(cfg: SFTConfig, out_dir: Path, corpus: list[str]) -> str:
    """Build the random-init tiny model under `out_dir/init` and return its path."""
    from mmrlsd.model.tiny import make_tiny

    i = cfg.init
    path = make_tiny(i.arch, out_dir / "init", seed=i.seed, size=i, extra_corpus=corpus,
                     vocab_size=i.vocab_size, max_pixels=cfg.model.max_pixels or 112 * 112,
                     added_tokens=list(i.added_tokens))  # fmt: skip
    return str(path)


def sft(cfg: SFTConfig, output_dir: str | Path, progress: bool = True) -> Path:
    """Run SFT; returns the directory of the final model (`output_dir/model`). The run directory is locked for
    the run (a second writer stops with an error naming the first)."""
    from mmrlsd.train import rundir

    run_dir = Path(output_dir)
    rundir.make_run_dir(run_dir)
    with rundir.RunLock(run_dir):
        return _sft(cfg, run_dir, progress)


def _sft(cfg: SFTConfig, run_dir: Path, progress: bool) -> Path:
    from tqdm.auto import tqdm

    from mmrlsd.data.synth import corpus as synth_corpus

    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.trainer.seed)
    max_pixels = cfg.model.max_pixels or 112 * 112
    train = load_dataset_files(cfg.data.train_files, FieldMap.from_config(cfg.data), cfg.data.train_split, seed=cfg.trainer.seed,
                               shuffle=cfg.data.shuffle, max_pixels=max_pixels,
                               limits=RecordLimits.from_config(cfg.data))  # fmt: skip
    train.samples = [s for s in train.samples if s.solution]
    if not train.samples:
        raise DataError(f"{cfg.data.train_files}: no records with a '{cfg.data.solution_key}' field")
    val: list[Sample] = []
    if cfg.data.val_files and cfg.trainer.val_every:
        val_data = load_dataset_files(
            cfg.data.val_files,
            FieldMap.from_config(cfg.data),
            cfg.data.val_split,
            shuffle=False,
            max_pixels=max_pixels,
            max_items=cfg.sft.val_items or cfg.data.max_val_items,
            limits=RecordLimits.from_config(cfg.data),
        )
        val = val_data.load_all()
    model_path = cfg.model.path
    if not model_path:
        texts = [t for s in train.samples[: cfg.init.corpus_records] for t in (s.problem, s.solution or "")]
        model_path = init_model(cfg, run_dir, synth_corpus() + texts)
    device = resolve_device(cfg.trainer.device)
    # float32 master weights and AdamW states; model.dtype is the compute dtype (autocast around the passes)
    policy, processor = load_model(model_path, dtype="float32", device=str(device),
                                   attn_implementation=cfg.model.attn_implementation,
                                   min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)  # fmt: skip
    log.info("model: %s (%.2fM parameters)", model_path, sum(p.numel() for p in policy.parameters()) / 1e6)
    builders = {info: PromptBuilder(processor, cfg.data.student_template, cfg.data.teacher_template, info)
                for info in ("answer", "solution")}  # fmt: skip
    prompts = builders["answer"]
    train.check = PromptCheck(builders["solution"], processor, cfg.data.max_prompt_tokens)  # the longer teacher
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                            betas=tuple(cfg.optim.betas))  # fmt: skip
    dump_config(cfg, run_dir / "config.yaml")
    metrics = MetricsWriter(run_dir)
    total = cfg.trainer.total_steps
    def compute():
        return compute_autocast(device, cfg.model.dtype, "float32")

    if val:
        with compute():
            metrics.write({"step": 0, **validate(policy, processor, prompts, val, cfg, cfg.trainer.seed)})
    bar = tqdm(range(1, total + 1), desc="sft", disable=not progress)
    for step in bar:
        t0 = time.perf_counter()
        lr = lr_at(step - 1, cfg.optim.lr, cfg.optim.warmup_steps, total, cfg.sft.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        samples = train.next_batch(cfg.sft.batch_size)
        rng = random.Random(cfg.trainer.seed * 1_000_003 + step)
        texts = prompt_texts(builders, samples, cfg.sft.teacher_frac, cfg.sft.teacher_infos, rng)
        seq = solution_batch(processor, samples, texts)
        policy.train()
        opt.zero_grad(set_to_none=True)
        with compute():
            loss, tokens = sft_loss(policy, seq, cfg.optim.micro_batch_size)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        opt.step()
        m = {
            "step": step,
            "sft/loss": loss,
            "sft/tokens": tokens,
            "actor/grad_norm": grad_norm,
            "optim/lr": lr,
            "data/epoch": float(train.pos // len(train.samples)),
            "time/step_s": time.perf_counter() - t0,
        }
        if val and (step == total or step % cfg.trainer.val_every == 0):
            t1 = time.perf_counter()
            with compute():
                m.update(validate(policy, processor, prompts, val, cfg, cfg.trainer.seed))
            m["time/val_s"] = time.perf_counter() - t1
            log.info("step %d: loss %.3f val/accuracy %.3f", step, loss, m["val/accuracy"])
        metrics.write(m)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        if cfg.trainer.save_every and step % cfg.trainer.save_every == 0 and step < total:
            save_model(policy, processor, run_dir / f"checkpoint-{step}")
    return save_model(policy, processor, run_dir / "model")


def save_model(policy, processor, out: Path) -> Path:
    """Model + processor in Hugging Face format (what `model.path` of an RL config loads)."""
    policy.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out

"""`mmrlsd train`: setup, the step loop, validation, logging, checkpoints and exact resume.

    mmrlsd train configs/tiny_cpu.yaml --output-dir runs/tiny
    mmrlsd train configs/tiny_cpu.yaml --output-dir runs/tiny --resume        # continue after a kill

The training step itself is `mmrlsd.train.step.rlsd_step`; this module only runs it.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mmrlsd.config import Config, ConfigError, dump_config, to_dict
from mmrlsd.data.prompts import PromptBuilder
from mmrlsd.data.sources import DataError, FieldMap, Skip, load_dataset_files
from mmrlsd.log import MetricsWriter, write_dump
from mmrlsd.model.load import load_model, resolve_device
from mmrlsd.reward.rewards import get_reward
from mmrlsd.train import checkpoint as ckpt
from mmrlsd.train import dist, fsdp
from mmrlsd.train.step import StepContext, rlsd_step
from mmrlsd.train.summary import format_summary, run_summary, write_summary
from mmrlsd.train.trackers import Trackers
from mmrlsd.train.validate import validate

log = logging.getLogger("mmrlsd.train")


def _fields(cfg: Config) -> FieldMap:
    d = cfg.data
    return FieldMap(problem=d.problem_key, answer=d.answer_key, images=d.images_key,
                    problem_type=d.problem_type_key, solution=d.solution_key, id=d.id_key)  # fmt: skip


def _lr_at(step: int, cfg: Config) -> float:
    w = cfg.optim.warmup_steps
    return cfg.optim.lr * min(1.0, (step + 1) / w) if w > 0 else cfg.optim.lr


def _sample_seed(cfg: Config, step: int) -> int:
    return cfg.trainer.seed * 1_000_003 + step


class _StopFlag:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit cleanly."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        log.warning("signal %s: checkpointing after this step, then exiting", signum)
        self.stop = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def build(cfg: Config):
    """Model, teacher, processor, optimizer and prompts for a run (sharded with FSDP2 under torchrun)."""
    for module in cfg.reward.plugins:
        importlib.import_module(module)
    get_reward(cfg.reward.name)  # fail now, listing the valid names, not after the first rollout
    distributed = fsdp.init_distributed(cfg.dist.backend)
    use_fsdp = cfg.dist.fsdp == "on" or (cfg.dist.fsdp == "auto" and distributed)
    if distributed and not use_fsdp:
        raise ConfigError("dist.fsdp=off under torchrun (WORLD_SIZE > 1) is not supported: use auto or on")
    device = resolve_device(cfg.trainer.device)
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", torch.cuda.current_device())
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.trainer.seed)
    load_kw = dict(dtype=cfg.model.dtype, device=str(device), trust_remote_code=cfg.model.trust_remote_code,
                   attn_implementation=cfg.model.attn_implementation, min_pixels=cfg.model.min_pixels,
                   max_pixels=cfg.model.max_pixels)  # fmt: skip
    policy, processor = load_model(cfg.model.path, **load_kw)
    if cfg.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.optim.freeze_vision:
        for name, p in policy.named_parameters():
            if ".visual." in f".{name}":
                p.requires_grad_(False)
    teacher = policy
    if cfg.algo.teacher_refresh > 0:
        teacher = load_model(cfg.model.path, **load_kw)[0] if use_fsdp else copy.deepcopy(policy)
        teacher.eval().requires_grad_(False)
        if not use_fsdp:
            fsdp.copy_weights(teacher, policy)
    if use_fsdp:
        fsdp.shard_model(policy, mixed_precision=cfg.dist.mixed_precision)
        if teacher is not policy:
            fsdp.shard_model(
                teacher, mixed_precision=cfg.dist.mixed_precision, offload=cfg.dist.teacher_offload
            )
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=tuple(cfg.optim.betas))  # fmt: skip
    prompts = PromptBuilder(
        processor, cfg.data.student_template, cfg.data.teacher_template, cfg.algo.teacher_info
    )
    engine = None
    if cfg.rollout.engine == "vllm":
        from mmrlsd.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(cfg.model.path, processor=processor, dtype=cfg.model.dtype,
                            seed=cfg.trainer.seed + dist.rank())  # fmt: skip
    return StepContext(cfg, policy, teacher, processor, optimizer, prompts, engine)


def shard(items: list, rank: int, world: int) -> list:
    """This rank's contiguous share of a global batch (the batch must divide evenly)."""
    if len(items) % world:
        raise ConfigError(
            f"rollout.batch_size ({len(items)}) must be divisible by the number of ranks ({world})"
        )
    k = len(items) // world
    return items[rank * k : (rank + 1) * k]


def train(
    cfg: Config, output_dir: str | Path | None = None, resume: bool = False, progress: bool = True
) -> Path:
    """Run training; returns the run directory. Ends by printing the run's summary (`RUN/summary.json`)."""
    t_start = time.perf_counter()
    run_dir = Path(output_dir or cfg.trainer.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = build(cfg)
    pix = ctx.processor.image_processor
    max_pixels = (
        cfg.model.max_pixels or getattr(pix, "max_pixels", None) or (pix.size or {}).get("longest_edge")
    )
    load_kw = dict(seed=cfg.trainer.seed, max_pixels=int(max_pixels or 1280 * 28 * 28))
    train_data = load_dataset_files(cfg.data.train_files, _fields(cfg), cfg.data.train_split,
                                    shuffle=cfg.data.shuffle, **load_kw)  # fmt: skip
    val = []
    if cfg.data.val_files and cfg.trainer.val_every:
        val_data = load_dataset_files(cfg.data.val_files, _fields(cfg), cfg.data.val_split, shuffle=False,
                                      max_items=cfg.data.max_val_items, **load_kw)  # fmt: skip
        val = val_data.next_batch(len(val_data.samples)) if val_data.samples else []
        train_data.skipped += [Skip(s.id, f"[val] {s.reason}") for s in val_data.skipped]
    if not train_data.samples:
        raise DataError(
            f"{cfg.data.train_files}: no usable training records ({len(train_data.skipped)} skipped)"
        )

    start, state = 0, {}
    latest = ckpt.latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        state = ckpt.load_checkpoint(latest, ctx.policy, ctx.optimizer, ctx.teacher)
        start = state["step"]
        train_data.pos = state["data_pos"]
        train_data.skipped = [Skip(i, r) for i, r in state.get("skipped", [])]
        log.info("resumed from %s (step %d)", latest, start)
        if ctx.engine is not None:
            ctx.engine.sync_weights(fsdp.gathered_weights(ctx.policy))
    elif resume:
        log.warning("--resume: no complete checkpoint in %s; starting from scratch", run_dir)
    main = dist.is_main()
    if main:
        dump_config(cfg, run_dir / "config.yaml")
    metrics = MetricsWriter(run_dir, resume_step=start if latest is not None else None) if main else None
    trackers = None
    if main:  # trainer.logger: console / tensorboard / wandb / mlflow, rank 0 only
        trackers = Trackers(cfg.trainer.logger, run_dir, to_dict(cfg), cfg.trainer.project_name,
                            cfg.trainer.experiment_name, cfg.trainer.total_steps,
                            resume_step=start if latest is not None else None)  # fmt: skip
    n_skipped_reported = state.get("skipped_total", 0)
    if latest is None and val:
        v = validate(ctx.policy, ctx.processor, ctx.prompts, val, cfg, cfg.trainer.seed)
        if main:
            metrics.write({"step": 0, **v})
            trackers.log({"step": 0, **v})

    bad_in_a_row = state.get("bad_in_a_row", 0)
    bar = tqdm(range(start + 1, cfg.trainer.total_steps + 1), desc="train", disable=not (progress and main),
               initial=start, total=cfg.trainer.total_steps)  # fmt: skip
    with _StopFlag() as flag, logging_redirect_tqdm([logging.getLogger("mmrlsd")]):  # log lines above the bar
        for step in bar:
            t0 = time.perf_counter()
            for group in ctx.optimizer.param_groups:
                group["lr"] = _lr_at(step - 1, cfg)
            samples = shard(train_data.next_batch(cfg.rollout.batch_size), dist.rank(), dist.world_size())
            result = rlsd_step(ctx, samples, step, seed=_sample_seed(cfg, step))
            m = {"step": step, **dist.reduce_metrics(result.metrics), "optim/lr": _lr_at(step - 1, cfg)}
            bad_in_a_row = bad_in_a_row + 1 if m["actor/skipped_updates"] >= cfg.optim.mini_batches else 0
            if bad_in_a_row >= cfg.trainer.max_bad_steps:
                raise RuntimeError(f"{bad_in_a_row} consecutive steps skipped (non-finite loss or gradient)")
            if ctx.engine is not None:  # push the new weights into the rollout engine, in memory
                ctx.engine.sync_weights(fsdp.gathered_weights(ctx.policy))
            if cfg.algo.teacher_refresh > 0 and step % cfg.algo.teacher_refresh == 0:
                fsdp.copy_weights(ctx.teacher, ctx.policy)
            m["data/skipped_total"] = float(len(train_data.skipped))
            m["data/epoch"] = float(train_data.pos // len(train_data.samples))
            m["time/step_s"] = time.perf_counter() - t0
            last = step == cfg.trainer.total_steps
            if val and (last or step % cfg.trainer.val_every == 0):  # collective under FSDP
                t1 = time.perf_counter()
                m.update(validate(ctx.policy, ctx.processor, ctx.prompts, val, cfg, cfg.trainer.seed))
                m["time/val_s"] = time.perf_counter() - t1
            if main:
                metrics.write(m)
                trackers.log(m)
                if cfg.trainer.dump_every and step % cfg.trainer.dump_every == 0:
                    write_dump(run_dir, step, result.dump)
                if len(train_data.skipped) > n_skipped_reported:
                    _write_skips(run_dir, train_data.skipped)
                    n_skipped_reported = len(train_data.skipped)
            bar.set_postfix(reward=f"{m['reward/mean']:.3f}", acc=f"{m['reward/accuracy']:.2f}",
                            lam=f"{m['rlsd/lam']:.2f}")  # fmt: skip
            stop = dist.any_rank(flag.stop)
            save_due = cfg.trainer.save_every and step % cfg.trainer.save_every == 0
            if save_due or last or stop:
                state = {"data_pos": train_data.pos, "bad_in_a_row": bad_in_a_row, "lam": m["rlsd/lam"],
                         "skipped_total": len(train_data.skipped),
                         "skipped": [[s.id, s.reason] for s in train_data.skipped]}  # fmt: skip
                ckpt.save_checkpoint(run_dir, step, ctx.policy, ctx.processor, ctx.optimizer, ctx.teacher, state,
                                     cfg.trainer.keep_last, hf_dtype=cfg.model.dtype if cfg.trainer.save_hf else None)  # fmt: skip
            if stop:
                log.warning("stopped cleanly at step %d; resume with --resume", step)
                break
    if main:
        _write_skips(run_dir, train_data.skipped)
        if train_data.skipped:
            log.warning("%d records skipped (see %s)", len(train_data.skipped), run_dir / "skipped.jsonl")
            log.warning(
                "skip reasons: %s", ", ".join(f"{k}: {v}" for k, v in train_data.skip_counts().items())
            )
        trackers.close()
        summary = run_summary(run_dir, total_steps=cfg.trainer.total_steps, wall_time_s=time.perf_counter() - t_start,
                              skip_counts=train_data.skip_counts(), n_skipped=len(train_data.skipped),
                              checkpoint=ckpt.latest_checkpoint(run_dir))  # fmt: skip
        write_summary(run_dir, summary)
        print(format_summary(summary), flush=True)
    fsdp.destroy_distributed()
    return run_dir


def _write_skips(run_dir: Path, skipped) -> None:
    with open(run_dir / "skipped.jsonl", "w") as f:
        for s in skipped:
            f.write(json.dumps({"id": s.id, "reason": s.reason}) + "\n")

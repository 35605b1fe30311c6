"""`mmrlsd train`: setup, the step loop, validation, logging, checkpoints and exact resume.

    mmrlsd train configs/tiny_cpu.yaml --output-dir runs/tiny
    mmrlsd train configs/tiny_cpu.yaml --output-dir runs/tiny --resume        # continue after a kill

The training step itself is `mmrlsd.train.step.rlsd_step`; this module only runs it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import signal
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mmrlsd import dist
from mmrlsd.config import Config, ConfigError, dump_config, to_dict
from mmrlsd.data.prompts import PromptBuilder
from mmrlsd.data.sanitize import PromptCheck
from mmrlsd.data.sources import DataError, FieldMap, RecordLimits, Skip, export_images, load_dataset_files
from mmrlsd.errors import CheckpointError, TrainingError
from mmrlsd.log import MetricsWriter, write_dump, write_jsonl
from mmrlsd.model.load import DTYPES, compute_autocast, load_model, master_dtype, resolve_device
from mmrlsd.train import checkpoint as ckpt
from mmrlsd.train import fsdp, preflight, rundir
from mmrlsd.train.step import StepContext, rlsd_step
from mmrlsd.train.summary import format_summary, run_summary, write_summary
from mmrlsd.train.trackers import Trackers
from mmrlsd.train.validate import ValidationStopped, validate

log = logging.getLogger("mmrlsd.train")


def _lr_at(step: int, cfg: Config) -> float:
    w = cfg.optim.warmup_steps
    return cfg.optim.lr * min(1.0, (step + 1) / w) if w > 0 else cfg.optim.lr


def _sample_seed(cfg: Config, step: int) -> int:
    return cfg.trainer.seed * 1_000_003 + step


class _StopFlag:
    """SIGTERM/SIGINT, from setup to the end: finish the current step (or cut validation short), checkpoint, exit
    cleanly. A second Ctrl-C (SIGINT, at least `FORCE_AFTER_S` after the first) raises KeyboardInterrupt at once;
    the newest complete checkpoint stays intact. Repeated SIGTERMs, and a SIGINT that arrives twice at once (the
    terminal's and torchrun's copy), only stop cleanly. Re-entrant: nested `with flag:` blocks share one state."""

    FORCE_AFTER_S = 0.5

    def __init__(self):
        self.stop = False
        self._old = {}
        self._depth = 0
        self._first = 0.0

    def __enter__(self):
        self._depth += 1
        if self._depth == 1:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass
        return self

    def _handle(self, signum, frame):
        if self.stop:
            if signum == signal.SIGINT and time.monotonic() - self._first >= self.FORCE_AFTER_S:
                log.warning("second Ctrl-C: exiting now")
                raise KeyboardInterrupt
            log.warning("signal %s: already stopping after this step", signum)
            return
        log.warning(
            "signal %s: stopping after this step (checkpointed; a second Ctrl-C exits at once)", signum
        )
        self.stop, self._first = True, time.monotonic()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for sig, old in self._old.items():
                signal.signal(sig, old)
            self._old = {}


def build(cfg: Config):
    """Model, teacher, processor, optimizer and prompts for a run (sharded with FSDP2 under torchrun)."""
    preflight.check_registered(
        cfg
    )  # reward plugins imported; method, reward, ... names checked before any model
    distributed = dist.init_distributed(cfg.dist.backend)
    use_fsdp = cfg.dist.fsdp == "on" or (cfg.dist.fsdp == "auto" and distributed)
    if distributed and not use_fsdp:
        raise ConfigError("dist.fsdp=off under torchrun (WORLD_SIZE > 1) is not supported: use auto or on")
    device = resolve_device(cfg.trainer.device)
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", torch.cuda.current_device())
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.trainer.seed)
    params_dtype = master_dtype(cfg.model.dtype, cfg.dist.mixed_precision)  # float32 master weights
    # Under FSDP on several ranks only rank 0 reads the weights (on the CPU); the other ranks build the model on
    # the meta device and receive their shards from rank 0 once it is sharded (fsdp.shard_model(from_rank0)).
    from_rank0 = use_fsdp and dist.enabled()
    load_kw = dict(dtype=params_dtype, device="cpu" if from_rank0 else str(device),
                   trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation,
                   min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels,
                   empty=from_rank0 and dist.rank() > 0)  # fmt: skip
    policy, processor = load_model(cfg.model.path, **load_kw)
    if params_dtype != "float32":
        log.warning("dist.mixed_precision is off: parameters and AdamW states in %s; at small learning rates "
                    "most updates round away", params_dtype)  # fmt: skip
    if cfg.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.optim.freeze_vision:
        for name, p in policy.named_parameters():
            if ".visual." in f".{name}":
                p.requires_grad_(False)
    teacher = policy
    compute = DTYPES[cfg.model.dtype]
    if use_fsdp:  # mixed precision when the parameters are float32
        fsdp.shard_model(policy, compute_dtype=compute, from_rank0=from_rank0)
    if cfg.algo.teacher_refresh > 0:  # the frozen snapshot is kept in the compute dtype (it is never updated)
        if use_fsdp:
            teacher = load_model(cfg.model.path, **{**load_kw, "dtype": cfg.model.dtype})[0]
        else:
            teacher = copy.deepcopy(policy).to(compute)
        teacher.eval().requires_grad_(False)
        if use_fsdp:
            fsdp.shard_model(
                teacher, compute_dtype=compute, offload=cfg.dist.teacher_offload, from_rank0=from_rank0
            )
        else:
            fsdp.copy_weights(teacher, policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=tuple(cfg.optim.betas))  # fmt: skip
    prompts = PromptBuilder(
        processor, cfg.data.student_template, cfg.data.teacher_template, cfg.algo.teacher_info
    )
    engine = None
    if cfg.rollout.engine == "vllm":
        from mmrlsd.rollout.vllm_engine import VLLMEngine, VLLMSettings

        settings = VLLMSettings.from_config(cfg.rollout)
        engine = VLLMEngine(cfg.model.path, processor=processor, dtype=cfg.model.dtype, settings=settings,
                            seed=cfg.trainer.seed + dist.rank() // settings.tensor_parallel_size,
                            world_size=dist.world_size(),
                            mm_processor_kwargs=image_budget(processor, cfg.model.min_pixels,
                                                             cfg.model.max_pixels))  # fmt: skip
    return StepContext(cfg, policy, teacher, processor, optimizer, prompts, engine)


def image_budget(processor, min_pixels: int = 0, max_pixels: int = 0) -> dict | None:
    """vLLM's `mm_processor_kwargs` for the pixel budget `model.min_pixels` / `max_pixels` that `processor` already
    applies (`set_pixel_budget`; None: neither set, both engines use the checkpoint's): the image processor's `size`
    as the policy's processor holds it, so vLLM resizes every image as training encodes it (transformers 5.19
    deprecates `min_pixels` / `max_pixels` as processor-call arguments)."""
    if not (min_pixels or max_pixels):
        return None
    return {"size": dict(processor.image_processor.size)}


def _compute(ctx: StepContext):
    """Autocast to `model.dtype` around a step or a validation when the parameters are float32 master weights."""
    cfg = ctx.cfg
    device = next(ctx.policy.parameters()).device
    return compute_autocast(device, cfg.model.dtype, master_dtype(cfg.model.dtype, cfg.dist.mixed_precision))


def shard(items: list, rank: int, world: int) -> list:
    """This rank's contiguous share of a global batch (the batch must divide evenly)."""
    if len(items) % world:
        raise ConfigError(
            f"rollout.batch_size ({len(items)}) must be divisible by the number of ranks ({world})"
        )
    k = len(items) // world
    return items[rank * k : (rank + 1) * k]


def train(cfg: Config, output_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
          overwrite: bool = False, allow_config_change: bool = False) -> Path:  # fmt: skip
    """Run training; returns the run directory. The directory is locked for the run; without `resume` it must be
    empty or hold a run that `overwrite` clears; with `resume` the config must match the run's (see rundir)."""
    preflight.check(cfg, output_dir=False)
    run_dir = Path(output_dir or cfg.trainer.output_dir)
    rundir.make_run_dir(run_dir)
    with rundir.RunLock(run_dir), _StopFlag() as flag:
        if resume:
            rundir.check_resume_config(run_dir, cfg, allow_config_change)
        else:
            rundir.check_fresh(run_dir, overwrite)
        return _train(cfg, run_dir, resume, progress, flag)


def _check_finite(policy, step: int, cfg: Config) -> None:
    """Abort before a non-finite checkpoint can be written (one reduction over all parameters, all ranks)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in policy.parameters()]
    # a sum is NaN/inf iff a weight is (or the weights are beyond ~1e38/numel): no bool copy of each tensor
    ok = torch.isfinite(torch.stack([p.sum(dtype=torch.float32) for p in local if p.numel()])).all().item()
    if dist.any_rank(not ok):
        raise TrainingError(
            f"step {step}: the policy weights are no longer finite (NaN/inf) after the optimizer step "
            f"(optim.lr={cfg.optim.lr:g}, optim.grad_clip={cfg.optim.grad_clip:g}); nothing was saved for this "
            "step: lower optim.lr, then --resume from the newest checkpoint or start again"
        )


def _train(cfg: Config, run_dir: Path, resume: bool, progress: bool, flag: _StopFlag) -> Path:
    t_start = time.perf_counter()
    ctx = build(cfg)
    pix = ctx.processor.image_processor
    max_pixels = (
        cfg.model.max_pixels or getattr(pix, "max_pixels", None) or (pix.size or {}).get("longest_edge")
    )
    load_kw = dict(seed=cfg.trainer.seed, max_pixels=int(max_pixels or 1280 * 28 * 28),
                   limits=RecordLimits.from_config(cfg.data))  # fmt: skip
    check = PromptCheck(ctx.prompts, ctx.processor, cfg.data.max_prompt_tokens)
    train_fields = dataclasses.replace(
        FieldMap.from_config(cfg.data), require_solution=cfg.algo.teacher_info == "solution"
    )
    train_data = load_dataset_files(cfg.data.train_files, train_fields, cfg.data.train_split,
                                    shuffle=cfg.data.shuffle, **load_kw)  # fmt: skip
    train_data.check = check
    val = []
    if cfg.data.val_files and cfg.trainer.val_every:
        val_data = load_dataset_files(cfg.data.val_files, FieldMap.from_config(cfg.data), cfg.data.val_split, shuffle=False,
                                      max_items=cfg.data.max_val_items, **load_kw)  # fmt: skip
        val_data.check = check
        val = val_data.load_all()
        train_data.skipped += [Skip(s.id, f"[val] {s.reason}") for s in val_data.skipped]
    if not train_data.samples:
        raise DataError(
            f"{cfg.data.train_files}: no usable training records ({len(train_data.skipped)} skipped)"
        )

    start = 0
    latest, state = (
        ckpt.resume_latest(run_dir, ctx.policy, ctx.optimizer, ctx.teacher) if resume else (None, {})
    )
    if latest is not None:
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
    if latest is None and val and not flag.stop:
        try:
            with _compute(ctx):
                v = validate(
                    ctx.policy, ctx.processor, ctx.prompts, val, cfg, cfg.trainer.seed, stop=lambda: flag.stop
                )
            if main:
                metrics.write({"step": 0, **v})
                trackers.log({"step": 0, **v})
        except ValidationStopped:
            pass
    if dist.any_rank(flag.stop) and start < cfg.trainer.total_steps:
        log.warning("stopped before step %d; nothing new to checkpoint%s", start + 1,
                    "; resume with --resume" if latest is not None else "")  # fmt: skip
        if main:
            trackers.close()
        dist.destroy_distributed()
        return run_dir

    bad_in_a_row = state.get("bad_in_a_row", 0)
    bar = tqdm(range(start + 1, cfg.trainer.total_steps + 1), desc="train", disable=not (progress and main),
               initial=start, total=cfg.trainer.total_steps)  # fmt: skip
    with flag, logging_redirect_tqdm([logging.getLogger("mmrlsd")]):  # log lines above the progress bar
        for step in bar:
            t0 = time.perf_counter()
            for group in ctx.optimizer.param_groups:
                group["lr"] = _lr_at(step - 1, cfg)

            def draw():  # this rank's share of the next global batch (online filtering draws more)
                return shard(train_data.next_batch(cfg.rollout.batch_size), dist.rank(), dist.world_size())

            samples = draw()
            with _compute(ctx):  # bf16 compute over float32 master weights (a no-op for float32 runs)
                result = rlsd_step(ctx, samples, step, seed=_sample_seed(cfg, step), more_prompts=draw)
            m = {"step": step, **dist.reduce_metrics(result.metrics), "optim/lr": _lr_at(step - 1, cfg)}
            bad_in_a_row = bad_in_a_row + 1 if m["actor/skipped_updates"] >= cfg.optim.mini_batches else 0
            if bad_in_a_row >= cfg.trainer.max_bad_steps:
                raise TrainingError(
                    f"step {step}: {bad_in_a_row} consecutive steps skipped (non-finite loss or gradient; "
                    "trainer.max_bad_steps); lower optim.lr or check the data"
                )
            _check_finite(ctx.policy, step, cfg)
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
                try:
                    with _compute(ctx):
                        m.update(validate(ctx.policy, ctx.processor, ctx.prompts, val, cfg, cfg.trainer.seed,
                                          stop=lambda: flag.stop))  # fmt: skip
                    m["time/val_s"] = time.perf_counter() - t1
                except ValidationStopped:
                    log.warning("validation of step %d cut short by the signal", step)
            if main:
                metrics.write(m)
                trackers.log(m)
                if cfg.trainer.dump_every and step % cfg.trainer.dump_every == 0:
                    saved = export_images(samples, run_dir)  # embedded images get a file the dump can name
                    for row in result.dump:
                        row["images"] = [saved.get(i, i) for i in row["images"]]
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
                _save(run_dir, step, ctx, state, cfg)
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
    dist.destroy_distributed()
    return run_dir


def _save(run_dir: Path, step: int, ctx: StepContext, state: dict, cfg: Config) -> None:
    """A checkpoint, or an error naming the run directory and the cause (a full disk, a read-only folder)."""
    try:
        ckpt.save_checkpoint(run_dir, step, ctx.policy, ctx.processor, ctx.optimizer, ctx.teacher, state,
                             cfg.trainer.keep_last, hf_dtype=cfg.model.dtype if cfg.trainer.save_hf else None)  # fmt: skip
    except (OSError, RuntimeError, CheckpointException) as e:
        cause = next((x for x, _ in e.failures.values()), e) if isinstance(e, CheckpointException) else e
        if dist.is_main():
            shutil.rmtree(run_dir / f".checkpoint-{step}.tmp", ignore_errors=True)  # give the space back
        raise CheckpointError(
            f"{run_dir}: writing checkpoint-{step} failed ({type(cause).__name__}: {str(cause)[:200]}); the "
            "complete checkpoints there are intact: free space or fix the folder, then --resume"
        ) from e


def _write_skips(run_dir: Path, skipped) -> None:
    write_jsonl(run_dir / "skipped.jsonl", [{"id": s.id, "reason": s.reason} for s in skipped])

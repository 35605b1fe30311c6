"""The speed benchmark: one process, one model, one batch, several ways to run an RL step.

    naive  mmrlsd's plain Hugging Face path: padded batches, full-vocabulary fp32 logits, the vision tower run
           for every response, an old-log-prob pass, the teacher pass, then the update (RLSD)
    grpo   mmrlsd's fast path with λ = 0 (no teacher pass): packing, vision shared per prompt, memory-lean
           log-probs, no old-log-prob pass (one optimizer step per rollout batch)
    rlsd   the same fast path running RLSD (λ = 0.5, a frozen teacher snapshot, its own teacher prompt)
    rlsd_generate  `rlsd` with the rollout's decode loop in Hugging Face `generate` (`rollout.hf_decode:
           generate`) instead of the lean loop: the same samples, so the rollout time of the two compares the loops
    rlsd_tower_loop  `rlsd` with the vision tower's attention run window by window, transformers' own loop
           (`model.vision_windows: false`): the same numbers, so the two compare the batched windows
    trl    TRL's GRPOTrainer on the same model, prompts, images, G, response length, micro-batch size and
           sampling (β = 0, DAPO token mean, clip 0.2/0.28: the same loss)

    mmrlsd perf --config cpu --out eval/results/perf/

Every variant starts from a copy of the same randomly initialised model and runs `warmup` + `repeats` steps on
the same prompts with the same seeds; the mmrlsd variants run interleaved (one step of each in turn), so a
change in machine load hits all of them. The learning rate is ~0 so the weights, hence the sampled responses,
stay the same from step to step and across the mmrlsd variants (TRL samples its own, of the same length limit).
Results: medians over the repeats, per-phase seconds, tokens/s, peak memory, the load average, and on GPU the
TFLOP/s and MFU of the update and teacher phases against a bf16 matmul peak measured here.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmrlsd.config import load_config, load_dataclass, packaged_prompt
from mmrlsd.model.tiny import ARCHS, TinySize
from mmrlsd.reward.rewards import REWARDS, RewardResult, register_reward
from mmrlsd.types import Sample

VARIANTS = ("naive", "grpo", "rlsd", "rlsd_generate", "rlsd_tower_loop", "trl")
PHASES = ("rollout", "reward", "old_logp", "teacher", "update")


@dataclass
class PerfConfig(TinySize):
    """One benchmark setting (`perf_configs/*.yaml` in this package); unknown keys are errors. The model's widths
    (`TinySize`) apply to the tiny shape."""

    arch: str = "qwen2_5_vl"
    """Architecture: qwen2_vl | qwen2_5_vl | qwen3_vl."""
    shape: str = "tiny"
    """tiny (the `TinySize` widths) | qwen2_5_vl_3b (Qwen2.5-VL-3B's widths, random init, 151,936-token vocab)."""
    vocab_size: int = 512
    """BPE vocabulary of the locally trained tokenizer (tiny shape)."""
    device: str = "auto"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    batch_size: int = 4
    """B prompts per step."""
    group_size: int = 8
    """G responses per prompt."""
    max_new_tokens: int = 64
    """T, the response length limit."""
    image_px: int = 224
    """Image side in pixels (one image per prompt)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward (all variants; the fast path packs by `token_budget` instead)."""
    packing: bool = True
    """Fast-path switches of the `grpo`/`rlsd` variants (`naive` has them all off)."""
    share_vision: bool = True
    share_prefix: bool = True
    share_prefill: bool = True
    """Rollout: each prompt's prefill once for its G samples (`rollout.share_prefill`)."""
    hf_decode: str = "lean"
    """Rollout decode loop of `grpo`/`rlsd` (`rollout.hf_decode`; `naive` and `rlsd_generate` use generate)."""
    cascade_attention: bool = True
    """Rollout of `grpo`/`rlsd`: cascade attention over the shared prefill (`rollout.cascade_attention`)."""
    token_budget: int = 2048
    logprob_chunk: int = 1024
    packed_attention: str = "auto"
    gradient_checkpointing: bool = False
    teacher_refresh: int = 10
    warmup: int = 1
    repeats: int = 3
    interleave: bool = True
    """Run the mmrlsd variants' steps in turn (all models in memory); false: one variant after another."""
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seed: int = 0


def load_perf_config(path: str | Path, overrides: list[str] | None = None) -> PerfConfig:
    """`PerfConfig` from YAML (`yaml.safe_load`) plus `key=value` overrides, type-checked by the training
    config's rules (`mmrlsd.config`: unknown keys fail with a suggestion); unknown variants, archs, shapes fail."""
    cfg = load_dataclass(PerfConfig, path, overrides)
    bad = [v for v in cfg.variants if v not in VARIANTS]
    if bad or cfg.arch not in ARCHS or cfg.shape not in ("tiny", "qwen2_5_vl_3b"):
        raise ValueError(f"{path}: variants {bad} / arch {cfg.arch!r} / shape {cfg.shape!r} not known")
    return cfg


# ---------------------------------------------------------------------------------------------- model and data


def _qwen25vl_3b_config(tok):
    """Qwen2.5-VL-3B-Instruct's published widths (config.json of the hub checkpoint), random init."""
    from transformers import Qwen2_5_VLConfig

    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"),
           ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
           ("vision_end_token_id", "<|vision_end|>"))}  # fmt: skip
    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                tie_word_embeddings=True, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                  window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_chans=3)  # fmt: skip
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)


def build_model(pc: PerfConfig, device: torch.device):
    """`(model, processor)`: a random-init model of the configured shape on `device`, in `pc.dtype`."""
    from transformers import AutoModelForImageTextToText

    from mmrlsd.model.load import DTYPES, load_model
    from mmrlsd.model.tiny import build_processor, build_tokenizer, make_tiny

    if pc.shape == "tiny":
        d = make_tiny(pc.arch, Path(tempfile.mkdtemp(prefix="mmrlsd_perf_")), seed=pc.seed, size=pc,
                      vocab_size=pc.vocab_size, max_pixels=pc.image_px**2)  # fmt: skip
        return load_model(
            str(d), dtype=pc.dtype, device=str(device), attn_implementation=pc.attn_implementation
        )
    tok = build_tokenizer(vocab_size=pc.vocab_size)
    tok.add_tokens([f"<x{i}>" for i in range(151936 - len(tok))])  # fill the vocabulary: sampled ids decode
    config = _qwen25vl_3b_config(tok)
    config._attn_implementation = pc.attn_implementation
    torch.manual_seed(pc.seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=DTYPES[pc.dtype])
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    processor = build_processor(pc.arch, tok, max_pixels=pc.image_px**2)
    processor.tokenizer.padding_side = "left"
    return model, processor


def make_samples(pc: PerfConfig, n: int) -> list[Sample]:
    """`n` counting questions, each with one `image_px`² picture of coloured squares (deterministic)."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(pc.seed)
    out = []
    for i in range(n):
        img = Image.new("RGB", (pc.image_px, pc.image_px), "white")
        draw = ImageDraw.Draw(img)
        k = rng.randint(1, 6)
        for _ in range(k):
            x, y = rng.randrange(0, pc.image_px - 20), rng.randrange(0, pc.image_px - 20)
            draw.rectangle([x, y, x + 18, y + 18], fill=rng.choice(["red", "blue", "green"]))
        out.append(Sample(id=f"perf{i}", problem="how many squares are there in the picture ?", answer=str(k),
                          images=[f"perf://{i}.png"], problem_type="numeric", pil_images=[img]))  # fmt: skip
    return out


def chars_reward_value(text: str) -> float:
    """The benchmark's reward: the fraction of characters that are 'e', 's' or '7'. A random model never answers
    correctly; this varies continuously with the sampled text (also the 3B shape's filler tokens `<x1737>`), so
    groups are practically never all-equal and every response carries a gradient signal."""
    return sum(text.count(c) for c in "es7") / max(len(text), 1)


if "perf_chars" not in REWARDS:

    @register_reward("perf_chars")
    def perf_chars(responses, answers, problem_types=None, **_):
        return [RewardResult(chars_reward_value(r), 0.0, 0.0, None) for r in responses]


# ---------------------------------------------------------------------------------------------- mmrlsd variants


def mmrlsd_config(pc: PerfConfig, variant: str):
    """The training config of an mmrlsd variant (`naive` = every fast-path switch off)."""
    fast = variant != "naive"
    decode = pc.hf_decode if variant in ("grpo", "rlsd", "rlsd_tower_loop") else "generate"
    o = {
        "model.path": "<in memory>", "data.train_files": "[<in memory>]", "reward.name": "perf_chars",
        "rollout.n": pc.group_size, "rollout.batch_size": pc.batch_size, "rollout.max_new_tokens": pc.max_new_tokens,
        "optim.micro_batch_size": pc.micro_batch_size, "optim.lr": 1e-10, "trainer.dump_every": 0,
        "algo.teacher_refresh": pc.teacher_refresh, "algo.lam0": 0.0 if variant == "grpo" else 0.5,
        "model.gradient_checkpointing": pc.gradient_checkpointing, "trainer.seed": pc.seed,
        # the fast path (`naive`: all off)
        "model.packing": fast and pc.packing, "model.share_vision": fast and pc.share_vision,
        "model.share_prefix": fast and pc.share_prefix, "model.logprob_chunk": pc.logprob_chunk if fast else 0,
        "rollout.share_prefill": fast and pc.share_prefill, "rollout.hf_decode": decode,
        "rollout.cascade_attention": fast and pc.cascade_attention,
        "model.vision_windows": fast and variant != "rlsd_tower_loop", "model.linear_patch_embed": fast,
        "model.packed_attention": pc.packed_attention,
        "optim.token_budget": pc.token_budget if fast else 0,
    }  # fmt: skip
    return load_config(None, [f"{k}={v}" for k, v in o.items()])


def make_context(cfg, model, processor):
    """`StepContext` around a copy of `model` (what `mmrlsd.train.loop.build` makes from a checkpoint)."""
    from mmrlsd.data.prompts import PromptBuilder
    from mmrlsd.train.step import StepContext

    policy = copy.deepcopy(model)
    if cfg.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    teacher = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.algo.teacher_refresh > 0 else policy
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.optim.lr,
                            weight_decay=cfg.optim.weight_decay)  # fmt: skip
    prompts = PromptBuilder(
        processor, packaged_prompt("student.jinja"), packaged_prompt("teacher.jinja"), cfg.algo.teacher_info
    )
    return StepContext(cfg, policy, teacher, processor, opt, prompts)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _record(rec: dict, t_step: float, metrics: dict, tokens: dict) -> None:
    rec["step_s"].append(t_step)
    for p in PHASES:
        rec["phases"].setdefault(p, []).append(metrics.get(f"time/{p}", 0.0))
    for k, v in tokens.items():
        rec.setdefault(k, []).append(v)


def run_mmrlsd_step(ctx, samples, step: int, seed: int, device) -> tuple[float, dict, dict]:
    from mmrlsd.train.step import rlsd_step

    _sync(device)
    t0 = time.perf_counter()
    result = rlsd_step(ctx, samples, step, seed)
    _sync(device)
    m = result.metrics
    tokens = {"response_len_mean": m["response/length_mean"]}
    return time.perf_counter() - t0, m, tokens


# ---------------------------------------------------------------------------------------------- TRL


def run_trl(pc: PerfConfig, model, processor, samples: list[Sample], device, on_step=None) -> dict:
    """TRL GRPOTrainer, `warmup + repeats` optimizer steps; per-step time and its generate+score time.
    `on_step(record)` is called after each step with the record so far."""
    from datasets import Dataset
    from transformers import TrainerCallback

    try:
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        raise ImportError("TRL is not installed (pip install 'mmrlsd[perf]')") from None

    from mmrlsd.data.prompts import load_template
    from mmrlsd.rollout.generate import eos_token_ids, vision_token_ids

    student = load_template(packaged_prompt("student.jinja"))
    rows = [{"prompt": [{"role": "user", "content": student.render(problem=s.problem)}], "image": s.pil_images[0]}
            for s in samples]  # fmt: skip
    rec = {"step_s": [], "phases": {"rollout": [], "update": []}, "response_len_mean": []}

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            _sync(device)
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            _sync(device)
            self.gen_s = getattr(self, "gen_s", 0.0) + time.perf_counter() - t0
            self.lengths = getattr(self, "lengths", []) + out["completion_mask"].sum(1).tolist()
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync(device)
            trainer.gen_s, trainer.lengths = 0.0, []
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            dt = time.perf_counter() - self.t0
            rec["step_s"].append(dt)
            rec["phases"]["rollout"].append(trainer.gen_s)
            rec["phases"]["update"].append(dt - trainer.gen_s)
            rec["response_len_mean"].append(sum(trainer.lengths) / max(len(trainer.lengths), 1))
            if on_step is not None:
                on_step(rec)

    n = pc.batch_size * pc.group_size
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="mmrlsd_perf_trl_"), use_cpu=device.type == "cpu",
        bf16=pc.dtype == "bfloat16", per_device_train_batch_size=pc.micro_batch_size,
        gradient_accumulation_steps=n // pc.micro_batch_size, num_generations=pc.group_size,
        max_completion_length=pc.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo",
        epsilon=0.2, epsilon_high=0.28, learning_rate=1e-10, max_steps=pc.warmup + pc.repeats, logging_steps=1,
        save_strategy="no", report_to="none", seed=pc.seed, disable_tqdm=True, dataloader_num_workers=0,
        gradient_checkpointing=pc.gradient_checkpointing, shuffle_dataset=False, log_completions=False,
        generation_kwargs={"suppress_tokens": vision_token_ids(processor), "eos_token_id": eos_token_ids(model, processor)},
    )  # fmt: skip

    def reward(prompts, completions, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [chars_reward_value(t if isinstance(t, str) else str(t)) for t in texts]

    trainer = Timed(model=copy.deepcopy(model), reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                    processing_class=processor, callbacks=[StepTimer()])  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if device.type == "cuda":
        rec["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return rec


# ---------------------------------------------------------------------------------------------- GPU FLOPs


def matmul_peak_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """Measured bf16 dense matmul throughput (TFLOP/s): the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def lm_flops_per_token(model, context: float) -> float:
    """Forward FLOPs per token of the language model: 2·(matmul parameters) + attention 4·layers·d·context."""
    lm = model.model.language_model
    n = sum(p.numel() for n_, p in lm.named_parameters() if p.ndim == 2 and "embed" not in n_)
    n += model.get_output_embeddings().weight.numel()
    c = lm.config
    return 2 * n + 4 * c.num_hidden_layers * c.hidden_size * context


# ---------------------------------------------------------------------------------------------- driver


def _median(x: list[float]) -> float:
    return statistics.median(x) if x else 0.0


def _summary(rec: dict, warmup: int) -> dict:
    keep = lambda xs: xs[warmup:] if len(xs) > warmup else xs  # noqa: E731
    steps = keep(rec["step_s"])
    return {
        "step_s": steps, "step_median_s": _median(steps),
        "phases": {p: _median(keep(v)) for p, v in rec["phases"].items()},
        "response_len_mean": _median(keep(rec.get("response_len_mean", []))),
    }  # fmt: skip


def device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({cpu}, {threads} threads)"


def result_path(out_dir: Path, device: torch.device, suffix: str = "") -> Path:
    """`<out_dir>/<YYYY-MM-DD>-<cpu|card><suffix>.json`, the card's name in file-name form (`nvidia-h200`)."""
    tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).lower().replace(" ", "-")
    return out_dir / f"{_dt.date.today().isoformat()}-{tag}{suffix}.json"


def run(pc: PerfConfig, out_dir: Path, on_partial=None) -> tuple[dict, Path]:
    """Run the benchmark, print a table, write `<out_dir>/<YYYY-MM-DD>-<cpu|card>.json`; returns both.

    The file is rewritten after every step (`"partial": true`), and `on_partial(result)` called with it, so a run
    cut short (killed, out of time) leaves the steps measured so far."""
    from mmrlsd.model.load import resolve_device

    if pc.threads:
        torch.set_num_threads(pc.threads)
    device = resolve_device(pc.device)
    load_before = os.getloadavg()
    base, processor = build_model(pc, device)
    base.requires_grad_(True)
    samples = make_samples(pc, pc.batch_size * (pc.warmup + pc.repeats))
    batches = [samples[i * pc.batch_size : (i + 1) * pc.batch_size] for i in range(pc.warmup + pc.repeats)]
    records: dict[str, dict] = {}
    errors: dict[str, str] = {}
    mm_variants = [v for v in pc.variants if v != "trl"]
    steps = range(len(batches))
    order = (
        [(i, v) for i in steps for v in mm_variants]
        if pc.interleave
        else [(i, v) for v in mm_variants for i in steps]
    )
    contexts: dict = {}
    path = result_path(out_dir, device)
    out_dir.mkdir(parents=True, exist_ok=True)

    def save_partial() -> None:
        partial = {**summarise(pc, records, errors, device, base, load_before), "partial": True}
        path.write_text(json.dumps(partial, indent=2) + "\n")
        if on_partial is not None:
            on_partial(partial)

    for i, v in order:
        if v in errors:
            continue
        records.setdefault(v, {"step_s": [], "phases": {}})
        try:
            if v not in contexts:
                if not pc.interleave:  # one variant's model, teacher and optimizer state in memory at a time
                    contexts.clear()
                    _free(device)
                contexts[v] = make_context(mmrlsd_config(pc, v), base, processor)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            dt, m, tok = run_mmrlsd_step(
                contexts[v], batches[i], i + 1, seed=pc.seed * 1000 + i, device=device
            )
            _record(records[v], dt, m, tok)
            if device.type == "cuda":
                records[v]["peak_mem_gb"] = max(records[v].get("peak_mem_gb", 0.0),
                                                torch.cuda.max_memory_allocated() / 2**30)  # fmt: skip
            print(f"[perf] {v} step {i + 1}: {dt:.2f}s", file=sys.stderr, flush=True)
        except Exception as e:  # a variant that fails is reported, not fatal to the others
            errors[v] = f"{type(e).__name__}: {e}"
            contexts.pop(v, None)
        save_partial()
    contexts.clear()
    _free(device)

    def trl_step(rec: dict) -> None:
        records["trl"] = rec
        save_partial()

    if "trl" in pc.variants:
        try:
            records["trl"] = run_trl(pc, base, processor, samples, device, on_step=trl_step)
        except Exception as e:
            errors["trl"] = f"{type(e).__name__}: {e}"
    result = summarise(pc, records, errors, device, base, load_before)
    result["prompt_tokens"] = prompt_lengths(pc, processor, samples[0])
    if device.type == "cuda":
        result.update(gpu_efficiency(pc, result["variants"], base, device, result["prompt_tokens"]))
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return result, path


def summarise(pc: PerfConfig, records: dict, errors: dict, device, model, load_before) -> dict:
    """The JSON written for one run (keys documented in eval/results/perf/README.md)."""
    import transformers

    variants = {v: _summary(r, pc.warmup) for v, r in records.items() if r["step_s"]}
    for v, r in records.items():
        if v in variants and "peak_mem_gb" in r:
            variants[v]["peak_mem_gb"] = r["peak_mem_gb"]
    step = {v: s["step_median_s"] for v, s in variants.items()}
    ratio = lambda a, b: (step[a] / step[b]) if a in step and b in step and step[b] > 0 else None  # noqa: E731
    n_resp = pc.batch_size * pc.group_size
    for s in variants.values():
        s["response_tokens_per_s"] = (
            n_resp * s["response_len_mean"] / s["step_median_s"] if s["step_median_s"] else 0
        )
        rollout = s["phases"].get("rollout", 0.0)
        s["rollout_tokens_per_s"] = n_resp * s["response_len_mean"] / rollout if rollout else 0
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    result = {
        "date": _dt.date.today().isoformat(),
        "device": device_name(device, torch.get_num_threads()),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
                     "python": platform.python_version()},  # fmt: skip
        "config": dataclasses.asdict(pc),
        "model_params": sum(p.numel() for p in model.parameters()),
        "load_avg_before": list(load_before), "load_avg_after": list(os.getloadavg()),
        "process_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rlsd_over_grpo_step_time": ratio("rlsd", "grpo"),
        "speedup_vs_trl": ratio("trl", "rlsd"),
        "grpo_speedup_vs_trl": ratio("trl", "grpo"),
        "speedup_vs_naive": ratio("naive", "rlsd"),
        "lean_step_speedup": ratio("rlsd_generate", "rlsd"),
        "vision_windows_step_speedup": ratio("rlsd_tower_loop", "rlsd"),
        "lean_rollout_speedup": (
            variants["rlsd_generate"]["phases"]["rollout"] / variants["rlsd"]["phases"]["rollout"]
            if "rlsd" in variants and "rlsd_generate" in variants and variants["rlsd"]["phases"].get("rollout")
            else None
        ),
        "phases": {v: s["phases"] for v, s in variants.items()},
        "variants": variants,
        "errors": errors,
    }  # fmt: skip
    return result


def prompt_lengths(pc: PerfConfig, processor, sample: Sample) -> dict[str, int]:
    """Tokens of the student and the teacher prompt of one sample (image tokens included)."""
    from mmrlsd.data.encoding import encode
    from mmrlsd.data.prompts import PromptBuilder

    pb = PromptBuilder(
        processor, packaged_prompt("student.jinja"), packaged_prompt("teacher.jinja"), "answer"
    )
    return {k: int(encode(processor, [f(sample)], [sample.pil_images])["input_ids"].shape[1])
            for k, f in (("student", pb.student), ("teacher", pb.teacher))}  # fmt: skip


def gpu_efficiency(pc: PerfConfig, variants: dict, model, device, prompts: dict[str, int]) -> dict:
    """TFLOP/s and MFU of the RLSD variant's update and teacher phases against the measured bf16 matmul peak.

    Model FLOPs of the language model on the tokens the phase computes (each prompt once per group when prefixes
    are shared): 2·N per token forward (N: matmul parameters, lm_head included) plus attention, 3x that for
    forward + backward; gradient checkpointing's recompute and the vision tower are not counted."""
    peak = matmul_peak_tflops(device)
    s = variants.get("rlsd")
    if s is None:
        return {"matmul_peak_tflops": peak, "update_mfu": None, "teacher_mfu": None}
    n, T = pc.batch_size * pc.group_size, s["response_len_mean"]

    def fwd_flops(P: int) -> float:
        prompt_rows = pc.batch_size if pc.share_prefix else n
        return (
            lm_flops_per_token(model, P / 2) * prompt_rows * P + lm_flops_per_token(model, P + T / 2) * n * T
        )

    upd = 3 * fwd_flops(prompts["student"]) / max(s["phases"].get("update", 0), 1e-9) / 1e12
    tea = fwd_flops(prompts["teacher"]) / max(s["phases"].get("teacher", 0), 1e-9) / 1e12
    return {"matmul_peak_tflops": peak, "update_tflops": upd, "teacher_tflops": tea, "update_mfu": upd / peak,
            "teacher_mfu": tea / peak, "prompt_tokens": prompts}  # fmt: skip


def table(result: dict) -> str:
    """A fixed-width table of the medians."""
    cols = ("step",) + PHASES
    lines = [f"{result['device']}  load {result['load_avg_before'][0]:.1f} -> {result['load_avg_after'][0]:.1f}",
             f"{'variant':14s}" + "".join(f"{c:>10s}" for c in cols) + f"{'resp tok/s':>12s}"]  # fmt: skip
    for v, s in result["variants"].items():
        vals = [s["step_median_s"]] + [s["phases"].get(p, 0.0) for p in PHASES]
        lines.append(f"{v:14s}" + "".join(f"{x:10.2f}" for x in vals) + f"{s['response_tokens_per_s']:12.1f}")
    for k in (
        "rlsd_over_grpo_step_time",
        "speedup_vs_trl",
        "grpo_speedup_vs_trl",
        "speedup_vs_naive",
        "lean_step_speedup",
        "lean_rollout_speedup",
        "vision_windows_step_speedup",
    ):
        if result.get(k) is not None:
            lines.append(f"{k}: {result[k]:.3f}")
    for v, e in result.get("errors", {}).items():
        lines.append(f"{v}: FAILED {e}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- rollout only

# The decode settings of the rollout-only comparison: `generate` arguments. Each must sample generate's ids except
# those in `ROLLOUT_NEAR`, whose scores differ from generate's by float rounding (their agreement is reported).
ROLLOUT_SETTINGS = {
    "generate": {"decode": "generate"},
    "lean": {"decode": "lean"},
    "lean_keep_rows": {"decode": "lean", "compact": False},
    "graph": {"decode": "graph"},
    "cascade": {"decode": "lean", "cascade": True},
    "graph_cascade": {"decode": "graph", "cascade": True},
    "compile_cascade": {"decode": "compile", "cascade": True},
}
ROLLOUT_NEAR = ("graph", "cascade", "graph_cascade", "compile_cascade")


def _agreement(new, ref) -> dict:
    """How far the responses of the `Rollouts` `new` follow `ref`'s: the share of rows equal throughout, and the
    median and smallest step of each row's first difference (the width where a row never differs)."""
    width = max(new.response_ids.shape[1], ref.response_ids.shape[1])

    def widen(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]))

    ids_a, ids_b = widen(new.response_ids), widen(ref.response_ids)
    in_either = widen(new.response_mask).bool() | widen(ref.response_mask).bool()
    differs = (ids_a != ids_b) & in_either  # (n, width)
    never = torch.full_like(ids_a[:, 0], width)
    first = torch.where(differs.any(1), differs.long().argmax(1), never)  # (n,)
    return {
        "rows_identical": float((first == width).float().mean()),
        "first_difference_median": float(first.float().median()),
        "first_difference_min": int(first.min()),
    }


def _rollout_breakdown(model, call) -> dict:
    """Where one `call()` spends its time: the first model forward (the shared prefill, vision tower included), and
    over the decode forwards the linear layers of the decoder layers, attention, the rest of the decoder layers
    (norms, rotary embedding, cache writes, residuals), the LM head, the rest of the model forward (embedding,
    mask, rotary tables, wrappers), and time outside the model (prompt preparation, logits processors, sampler,
    loop). Timers on every module call add a little time of their own."""
    import torch.nn.functional as F

    lm = model.model.language_model
    acc = dict.fromkeys(("linear", "attention", "layers", "lm_head"), 0.0)
    forwards, starts, rows, first = [], {}, [], {}
    sdpa = F.scaled_dot_product_attention

    def timed_sdpa(*a, **k):
        t = time.perf_counter()
        out = sdpa(*a, **k)
        acc["attention"] += time.perf_counter() - t
        return out

    def pre(key):
        def hook(mod, args, kwargs):
            starts[key] = time.perf_counter()
            if key == "model":
                rows.append(int(kwargs["input_ids"].shape[0]))

        return hook

    def post(key, slot):
        def hook(mod, args, kwargs, out):
            dt = time.perf_counter() - starts[key]
            if slot == "model":
                forwards.append(dt)
                if len(forwards) == 1:
                    first.update(acc)  # what the prefill spent, taken off the decode totals below
            else:
                acc[slot] += dt

        return hook

    mods = [("model", model), ("lm_head", model.lm_head)] + [("layers", layer) for layer in lm.layers]
    mods += [("linear", m) for m in lm.layers.modules() if isinstance(m, torch.nn.Linear)]
    hooks = []
    for i, (slot, mod) in enumerate(mods):
        key = "model" if slot == "model" else i
        hooks.append(mod.register_forward_pre_hook(pre(key), with_kwargs=True))
        hooks.append(mod.register_forward_hook(post(key, slot), with_kwargs=True))
    F.scaled_dot_product_attention = timed_sdpa
    try:
        t0 = time.perf_counter()
        call()
        total = time.perf_counter() - t0
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    dec = {k: acc[k] - first.get(k, 0.0) for k in acc}
    decode = sum(forwards[1:])
    out = {
        "total_s": total,
        "prefill_forward_s": forwards[0] if forwards else 0.0,
        "decode_forwards": len(forwards) - 1,
        "decode_forwards_s": decode,
        "decode_linear_s": dec["linear"],
        "decode_attention_s": dec["attention"],
        "decode_layers_other_s": dec["layers"] - dec["linear"] - dec["attention"],
        "decode_lm_head_s": dec["lm_head"],
        "decode_model_other_s": decode - dec["layers"] - dec["lm_head"],
        "outside_model_s": total - sum(forwards),
        "decode_batch_rows": rows[1:],
    }
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def rollout_ab(pc: PerfConfig, calls: int, out_dir: Path, settings: tuple[str, ...] | None = None,
               breakdown: bool = True) -> tuple[dict, Path]:  # fmt: skip
    """Rollout only: `mmrlsd.rollout.generate.generate` on the config's model and first batch (B prompts x G, the
    student prompt and image, T new tokens, seed 0), each of `settings` (default: all of `ROLLOUT_SETTINGS`) called
    in turn `calls` times in this process, the sampled ids asserted equal to generate's first call on every call
    (for the `ROLLOUT_NEAR` settings, and for every setting on a GPU, their agreement recorded instead: on an H200,
    bf16, two calls of `generate` itself sampled different ids); then, with `breakdown`, one more lean call with
    timers (`_rollout_breakdown`). A `compile` setting first runs once untimed: its first call of the process
    compiles for seconds (its time: `first_call_s`). Writes `<out_dir>/<YYYY-MM-DD>-<cpu|card>-rollout-ab.json`."""
    from mmrlsd.data.encoding import encode, repeat_encoding
    from mmrlsd.data.prompts import PromptBuilder
    from mmrlsd.model.load import resolve_device
    from mmrlsd.rollout.generate import generate

    if pc.threads:
        torch.set_num_threads(pc.threads)
    device = resolve_device(pc.device)
    load_before = os.getloadavg()
    model, processor = build_model(pc, device)
    model.eval()
    samples = make_samples(pc, pc.batch_size)
    pb = PromptBuilder(
        processor, packaged_prompt("student.jinja"), packaged_prompt("teacher.jinja"), "answer"
    )
    enc = repeat_encoding(encode(processor, [pb.student(s) for s in samples], [s.pil_images for s in samples]),
                          pc.group_size)  # fmt: skip

    def call(settings: dict):
        return generate(model, processor, enc, group_size=pc.group_size, max_new_tokens=pc.max_new_tokens,
                        seed=0, share_prefill=pc.share_prefill, **settings)  # fmt: skip

    names = tuple(settings or ROLLOUT_SETTINGS)
    if unknown := [k for k in names if k not in ROLLOUT_SETTINGS]:
        raise ValueError(f"rollout_ab: unknown setting(s) {unknown}; choose from {list(ROLLOUT_SETTINGS)}")
    ref = call(ROLLOUT_SETTINGS["generate"])  # warm-up, and the ids every call must give
    first_call_s = {}
    for name in names:
        if ROLLOUT_SETTINGS[name].get("decode") == "compile":
            t0 = time.perf_counter()
            call(ROLLOUT_SETTINGS[name])
            first_call_s[name] = round(time.perf_counter() - t0, 4)
    times: dict[str, list[float]] = {k: [] for k in names}
    agreement: dict[str, dict] = {}
    for _ in range(calls):
        for name in names:
            _sync(device)
            t0 = time.perf_counter()
            r = call(ROLLOUT_SETTINGS[name])
            _sync(device)
            times[name].append(round(time.perf_counter() - t0, 4))
            if name in ROLLOUT_NEAR or device.type == "cuda":
                agreement[name] = _agreement(r, ref)
            elif not torch.equal(r.response_ids, ref.response_ids):
                raise RuntimeError(f"rollout_ab: {name} sampled other ids than generate")
    lean_times = _rollout_breakdown(model, lambda: call(ROLLOUT_SETTINGS["lean"])) if breakdown else None
    lengths = ref.response_mask.sum(1).float()
    med = {k: _median(v) for k, v in times.items()}

    def speed(a: str, b: str) -> float | None:  # how many times faster b is than a
        return med[a] / med[b] if a in med and b in med and med[b] else None

    n = enc["input_ids"].shape[0]
    result = {
        "what": (f"Rollout only: generate() on the '{pc.arch}' perf model and batch ({pc.batch_size} prompts x "
                 f"G={pc.group_size}, {enc['input_ids'].shape[1]}-token prompts, {pc.max_new_tokens} new tokens, "
                 f"seed 0, {torch.get_num_threads()} thread(s)); the settings called in turn {calls} times in one "
                 "process, ids asserted equal to generate's on every call (agreement with generate's first call "
                 f"recorded instead for {', '.join(ROLLOUT_NEAR)}, and for every setting on a GPU). Seconds per call."),
        "date": _dt.date.today().isoformat(),
        "device": device_name(device, torch.get_num_threads()),
        "load_avg_before": list(load_before),
        "load_avg_after": list(os.getloadavg()),
        "settings": {k: {"generate_kwargs": ROLLOUT_SETTINGS[k], "median_s": med[k], "calls_s": times[k]}
                     for k in names},  # fmt: skip
        "lean_over_generate_speed": speed("generate", "lean"),
        "drop_rows_speedup": speed("lean_keep_rows", "lean"),
        "graph_over_lean_speed": speed("lean", "graph"),
        "graph_over_generate_speed": speed("generate", "graph"),
        "cascade_over_lean_speed": speed("lean", "cascade"),
        "cascade_over_generate_speed": speed("generate", "cascade"),
        "compile_cascade_over_generate_speed": speed("generate", "compile_cascade"),
        "agreement_with_generate": agreement,
        "first_call_s": first_call_s,
        "response_len_mean": float(lengths.mean()),
        "response_len_max": int(lengths.max()),
        "row_steps_fraction": float(lengths.sum() / (n * ref.response_ids.shape[1])),
        "lean_breakdown": lean_times,
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    path = result_path(out_dir, device, "-rollout-ab")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=1))
    return result, path

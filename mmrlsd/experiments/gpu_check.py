"""The GPU check in one command: step speed with MFU, a short bf16/fp32-master training run and packed-attention
parity, on one GPU with torch and transformers only (no vLLM, flash-attn, datasets or network; TRL is optional).

    python -m mmrlsd.experiments.gpu_check --out eval/results/perf/     # one H200: about 8 minutes (estimated)
    python -m mmrlsd.experiments.gpu_check --reduced --device cpu       # the same five parts, tiny, seconds

1. **perf**: the GPU perf config (`mmrlsd/experiments/perf_configs/gpu.yaml`: Qwen2.5-VL-3B's widths, random init,
   bf16): naive / GRPO / RLSD (and TRL when it imports) steps, MFU of the update and teacher passes.
   `datasets` (TRL's input) and TRL are optional: without them the `trl` variant is left out.
2. **train**: a few RLSD optimizer steps of the same model in bf16 compute with float32 master weights
   (`model.dtype: bfloat16`, `dist.mixed_precision: true`) at the paper's lr 1e-6: finite losses and gradient
   norms, float32 parameters, the share of one weight matrix's entries that moved (bf16 parameters would barely
   move at this lr), step time and peak memory.
3. **parity**: log-probs of packed sequences (flex_attention, and varlen_sdpa) against the unpacked sdpa forward
   on the same rollouts, in float32: the largest absolute difference per kernel.
4. **rollout**: the perf batch's rollout alone (`mmrlsd perf --rollout-ab 1`): `generate`, the lean decode loop
   and the CUDA-graph decode step (`rollout.hf_decode: graph`): their times, and for each the share of rows that
   sample the ids of a first `generate` call and where the others first differ (on an H200 in bf16 a second
   `generate` call already differs; on a CPU the run fails unless generate and lean agree exactly). On a CPU also
   where one lean call spends its time (prefill, decode forwards, linear layers, attention, outside the model).
5. **profile**: one RLSD step of the perf config under `torch.profiler` (after a warm-up step): its phases and the
   kernels with the most device time (`<YYYY-MM-DD>-<card>-profile.txt` holds the profiler's table).

Writes `<out>/<YYYY-MM-DD>-<card>.json`: the perf result (`update_mfu`, `teacher_mfu`, `rlsd_over_grpo_step_time`,
`speedup_vs_trl`, ...) plus `train`, `packed_attention_parity`, `rollout` and `profile` sections. A part that fails is recorded
under `errors` and the others still run; the exit status is 1 then. `--parts` picks and orders the parts, and
`--limit PART=SECONDS` bounds one: the file is rewritten after every part and every perf step, so a check that
runs out of time (or is killed) keeps what it measured (`"partial": true` marks a cut-short perf run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

from mmrlsd.experiments.perf import (
    PerfConfig,
    build_model,
    load_perf_config,
    make_context,
    make_samples,
    result_path,
    run,
)

CONFIGS = Path(__file__).resolve().parent / "perf_configs"
REDUCED = ["shape=tiny", "hidden=64", "layers=2", "heads=2", "kv_heads=1", "intermediate=128", "vision_hidden=32",
           "vision_depth=1", "vision_heads=1", "batch_size=2", "group_size=2", "max_new_tokens=6", "image_px=56",
           "micro_batch_size=4", "token_budget=512", "logprob_chunk=64", "gradient_checkpointing=false", "warmup=0",
           "repeats=1", "variants=[naive,grpo,rlsd]", "dtype=float32", "packed_attention=varlen_sdpa"]  # fmt: skip


def train_config(pc: PerfConfig, lr: float):
    """The RLSD training config of part 2: bf16 compute, float32 master weights, the fast path."""
    from mmrlsd.config import load_config

    o = {
        "model.path": "<in memory>", "data.train_files": "[<in memory>]", "reward.name": "perf_chars",
        "model.dtype": "bfloat16", "dist.mixed_precision": True, "optim.lr": lr, "optim.weight_decay": 0.01,
        "rollout.n": pc.group_size, "rollout.batch_size": pc.batch_size, "rollout.max_new_tokens": pc.max_new_tokens,
        "optim.micro_batch_size": pc.micro_batch_size, "trainer.dump_every": 0, "algo.lam0": 0.5,
        "algo.teacher_refresh": pc.teacher_refresh, "model.gradient_checkpointing": pc.gradient_checkpointing,
        "model.packing": pc.packing, "model.share_vision": pc.share_vision, "model.share_prefix": pc.share_prefix,
        "model.logprob_chunk": pc.logprob_chunk, "optim.token_budget": pc.token_budget,
        "model.packed_attention": pc.packed_attention, "trainer.seed": pc.seed,
    }  # fmt: skip
    return load_config(None, [f"{k}={v}" for k, v in o.items()])


def _watched(model) -> torch.Tensor:
    """One weight matrix of the language model (the first decoder layer's MLP down projection)."""
    return model.model.language_model.layers[0].mlp.down_proj.weight


def check_training(pc: PerfConfig, device: torch.device, steps: int, lr: float = 1e-6) -> dict:
    """Part 2: `steps` RLSD steps with float32 master weights under bf16 autocast."""
    from mmrlsd.model.load import compute_autocast, master_dtype
    from mmrlsd.train.step import rlsd_step

    cfg = train_config(pc, lr)
    fp32 = dataclasses.replace(pc, dtype="float32")
    model, processor = build_model(fp32, device)
    ctx = make_context(cfg, model, processor)
    del model
    ctx.teacher.to(torch.bfloat16)  # the frozen snapshot in the compute dtype, as training keeps it
    before = _watched(ctx.policy).detach().clone()
    samples = make_samples(pc, pc.batch_size * steps)
    params_dtype = master_dtype(cfg.model.dtype, cfg.dist.mixed_precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for i in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        with compute_autocast(device, cfg.model.dtype, params_dtype):
            m = rlsd_step(
                ctx, samples[i * pc.batch_size : (i + 1) * pc.batch_size], i + 1, seed=pc.seed + i
            ).metrics
        _sync(device)
        rows.append({"step": i + 1, "step_s": time.perf_counter() - t0, "loss": m.get("loss"),
                     "grad_norm": m.get("actor/grad_norm"), "skipped_updates": m.get("actor/skipped_updates"),
                     "response_len_mean": m.get("response/length_mean")})  # fmt: skip
        print(
            f"[gpu-check] train step {i + 1}: {rows[-1]['step_s']:.2f}s loss {m.get('loss')}", file=sys.stderr
        )
    after = _watched(ctx.policy).detach()
    out = {
        "compute_dtype": cfg.model.dtype, "master_dtype": str(next(ctx.policy.parameters()).dtype).removeprefix("torch."),
        "lr": lr, "steps": rows, "finite": all(_finite(r["loss"]) and _finite(r["grad_norm"]) and not r["skipped_updates"] for r in rows),
        "moved_fraction": float((after != before).float().mean()),
    }  # fmt: skip
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _finite(x) -> bool:
    return x is not None and bool(torch.isfinite(torch.tensor(float(x))))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_parity(pc: PerfConfig, device: torch.device, kernels: list[str]) -> dict:
    """Part 3: packed log-probs per kernel (plain segments and shared prefixes) against the unpacked sdpa
    forward, float32, on rollouts of 3 prompts (two images of different sizes, one text-only) x G."""
    from PIL import Image

    from mmrlsd.data.encoding import chat_text, encode
    from mmrlsd.model.logprobs import build_sequences, token_logprobs
    from mmrlsd.model.packing import FastOptions
    from mmrlsd.rollout.generate import generate

    small = dataclasses.replace(pc, dtype="float32")
    model, proc = build_model(small, device)
    model.eval()
    G = 2
    side = max(56, pc.image_px // 2)
    imgs = [[Image.new("RGB", (side, side), "red")], [Image.new("RGB", (side + 28, side), "blue")], []]
    texts = [chat_text(proc, "how many red shapes ?", 1), chat_text(proc, "a longer question about blue shapes", 1),
             chat_text(proc, "text only : 2 + 1 = ?", 0)]  # fmt: skip
    enc = encode(proc, [t for t in texts for _ in range(G)], [i for i in imgs for _ in range(G)])
    rollouts = generate(model, proc, enc, group_size=G, max_new_tokens=max(8, pc.max_new_tokens // 4), seed=0)
    seq, mask = build_sequences(enc, rollouts), rollouts.response_mask.bool()
    ref, _ = token_logprobs(model, seq, micro_batch_size=2)  # unpacked, padded sdpa
    out = {"dtype": "float32", "response_tokens": int(mask.sum())}
    for kernel in kernels:
        for share_prefix in (False, True):
            fast = FastOptions(packing=True, share_prefix=share_prefix, attention=kernel, group_size=G)
            lp, _ = token_logprobs(model, seq, micro_batch_size=6, fast=fast)
            key = f"{kernel}{'_shared_prefix' if share_prefix else ''}_max_abs_diff"
            out[key] = float((lp[mask] - ref[mask]).abs().max())
    return out


def check_profile(pc: PerfConfig, device: torch.device, out_dir: Path, top: int = 25) -> dict:
    """Part 5: one RLSD step of the perf config under `torch.profiler` after a warm-up step: its phases, the `top`
    kernels by their own device time (on a CPU: operators by their own CPU time) with their share of the total,
    and on a GPU also the `top` host-side operators by their own CPU time (launch-bound and synchronising code
    shows there). The profiler's tables go to `<out_dir>/<YYYY-MM-DD>-<card>-profile.txt`."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from mmrlsd.experiments.perf import mmrlsd_config, run_mmrlsd_step

    model, processor = build_model(pc, device)
    model.requires_grad_(True)
    ctx = make_context(mmrlsd_config(pc, "rlsd"), model, processor)
    del model
    samples = make_samples(pc, 2 * pc.batch_size)
    run_mmrlsd_step(ctx, samples[: pc.batch_size], 1, seed=pc.seed, device=device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step_s, metrics, _ = run_mmrlsd_step(
            ctx, samples[pc.batch_size :], 2, seed=pc.seed + 1, device=device
        )
    events = prof.key_averages()

    def ranked(own: str) -> tuple[list[dict], float, str]:
        # kernels (device events) for device time, operators (host events) for CPU time: an operator's own device
        # time is its kernels', which would count them twice
        kind = DeviceType.CUDA if own == "self_device_time_total" else DeviceType.CPU
        mine = [e for e in events if e.device_type == kind]
        total = sum(getattr(e, own) for e in mine)
        rows = sorted(mine, key=lambda e: getattr(e, own), reverse=True)[:top]
        out = [{"name": e.key[:200], "calls": e.count, "own_s": getattr(e, own) / 1e6,
                "share": getattr(e, own) / total if total else 0.0} for e in rows]  # fmt: skip
        return out, total / 1e6, events.table(sort_by=own, row_limit=top, max_name_column_width=100)

    result = {"step_s": step_s,
              "phases_s": {k.removeprefix("time/"): v for k, v in metrics.items() if k.startswith("time/")}}  # fmt: skip
    host, host_total, host_table = ranked("self_cpu_time_total")
    if cuda:
        result["top"], result["own_time_total_s"], table = ranked("self_device_time_total")
        result["host_top"], result["host_own_time_total_s"] = host, host_total
        table += "\n\nHost-side operators by their own CPU time\n" + host_table
    else:
        result["top"], result["own_time_total_s"], table = host, host_total, host_table
    path = result_path(out_dir, device, "-profile").with_suffix(".txt")
    path.write_text(table + "\n")
    result["table"] = path.name
    return result


PARTS = ("perf", "train", "packed_attention_parity", "rollout", "profile")


class PartTimeout(BaseException):
    """A part ran past its time limit (a BaseException: the perf loop's per-variant `except Exception` must not
    swallow it)."""


@contextmanager
def time_limit(seconds: float | None, part: str):
    """Raise `PartTimeout` in the main thread after `seconds` (None: no limit). An alarm already armed (pytest-timeout,
    say) keeps its deadline: if it comes first its handler runs, and it is re-armed for what is left on exit."""
    if not seconds:
        yield
        return
    start, outer = time.monotonic(), signal.getitimer(signal.ITIMER_REAL)[0]

    def fire(signum, frame):
        if outer and outer <= seconds and callable(old):  # the outer deadline came first
            return old(signum, frame)
        raise PartTimeout(f"{part} ran past its {seconds:g} s limit")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer) if outer else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        left = outer - (time.monotonic() - start) if outer else 0.0
        if left > 0:
            signal.setitimer(signal.ITIMER_REAL, left)


def check_rollout(pc: PerfConfig, device: torch.device, out_dir: Path) -> dict:
    """Part 4: `rollout_ab` with one call per setting (it also writes its own `*-rollout-ab.json`). On a GPU the
    settings that differ there (generate, lean, graph, graph with cascade attention: the default) and no breakdown
    (host timers say little about a graph)."""
    from mmrlsd.experiments.perf import rollout_ab

    cuda = device.type == "cuda"
    settings = ("generate", "lean", "graph", "graph_cascade") if cuda else None
    result, _ = rollout_ab(pc, 1, out_dir, settings=settings, breakdown=not cuda)
    return {k: v for k, v in result.items() if k not in ("date", "device")}


def gpu_check(out_dir: Path, *, reduced: bool = False, device: str = "auto", overrides: list[str] | None = None,
              train_steps: int = 2, parts: tuple[str, ...] = PARTS,
              limits: dict[str, float] | None = None) -> tuple[dict, Path]:  # fmt: skip
    """Run `parts` in order, each under its time limit in `limits` (seconds); the JSON is rewritten after each
    part, so a check cut short keeps what it measured. Returns the combined result and the JSON path."""
    from mmrlsd.model.load import resolve_device

    sets = (REDUCED if reduced else []) + [f"device={device}"] + list(overrides or [])
    pc = load_perf_config(CONFIGS / "gpu.yaml", sets)
    if "trl" in pc.variants and not _has_trl():
        pc = dataclasses.replace(pc, variants=[v for v in pc.variants if v != "trl"])
        print("[gpu-check] TRL/datasets not installed: the trl variant is left out", file=sys.stderr)
    dev = resolve_device(pc.device)
    path = result_path(out_dir, dev)
    small = dataclasses.replace(pc, shape="tiny", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512,
                                vision_hidden=64, vision_depth=2, vision_heads=2) if not reduced else pc  # fmt: skip
    kernels = ["varlen_sdpa"] if dev.type == "cpu" else ["flex_attention", "varlen_sdpa"]
    saved: dict = {}  # the perf run's latest partial result: what a perf part cut short keeps
    runs = {"perf": lambda: run(pc, out_dir, on_partial=saved.update)[0],
            "train": lambda: check_training(pc, dev, 1 if reduced else train_steps),
            "packed_attention_parity": lambda: check_parity(small, dev, kernels),
            "rollout": lambda: check_rollout(pc, dev, out_dir),
            "profile": lambda: check_profile(pc, dev, out_dir)}  # fmt: skip
    result: dict = {}
    errors: dict[str, str] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in parts:
        t0 = time.perf_counter()
        try:
            with time_limit((limits or {}).get(name), name):
                part = runs[name]()
        except PartTimeout as e:
            part, errors[name] = None, f"PartTimeout: {e}"
        except Exception as e:
            part, errors[name] = None, _err(e)
        if name == "perf":
            result.update(part or saved)
        elif part is not None:
            result[name] = part
        print(f"[gpu-check] {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        result["gpu_check"] = {"reduced": reduced, "parts": list(parts), "perf_config": dataclasses.asdict(pc),
                               "errors": {**result.get("errors", {}), **errors}}  # fmt: skip
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result, path


def _has_trl() -> bool:
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def _err(e: Exception) -> str:
    return f"{type(e).__name__}: {e} | {traceback.format_exc(limit=3).splitlines()[-1]}"


def summary(result: dict) -> str:
    keys = ("update_mfu", "teacher_mfu", "rlsd_over_grpo_step_time", "speedup_vs_trl")
    lines = [f"{k}: {result.get(k)}" for k in keys]
    t = result.get("train", {})
    if t:
        lines.append(f"train: {t['master_dtype']} master, {t['compute_dtype']} compute, finite {t['finite']}, "
                     f"moved {t['moved_fraction']:.3f} of a weight's entries")  # fmt: skip
    for k, v in result.get("packed_attention_parity", {}).items():
        if k.endswith("max_abs_diff"):
            lines.append(f"parity {k}: {v:.2e}")
    errs = result.get("gpu_check", {}).get("errors")
    if errs:
        lines.append(f"errors: {errs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mmrlsd.experiments.gpu_check", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--out", default="eval/results/perf", help="directory for <YYYY-MM-DD>-<card>.json")
    ap.add_argument("--device", default="auto", help="cuda | cpu | auto")
    ap.add_argument(
        "--reduced", action="store_true", help="tiny shapes: the same parts in seconds (tests, CPU)"
    )
    ap.add_argument("--train-steps", type=int, default=2, help="optimizer steps of the training part")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a perf config key"
    )
    ap.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated, run in this order: {', '.join(PARTS)}"
    )
    ap.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                    help="time limit of a part: past it the part stops, is recorded under errors, and the "
                    "steps it measured are kept")  # fmt: skip
    args = ap.parse_args(argv)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    if unknown := [p for p in parts if p not in PARTS]:
        ap.error(f"--parts: unknown part(s) {unknown}; choose from {list(PARTS)}")
    limits = {}
    for item in args.limit:
        name, _, secs = item.partition("=")
        try:
            limits[name] = float(secs)
        except ValueError:
            ap.error(f"--limit {item!r}: expected PART=SECONDS")
        if name not in PARTS:
            ap.error(f"--limit {item!r}: unknown part {name!r}; choose from {list(PARTS)}")
    result, path = gpu_check(Path(args.out), reduced=args.reduced, device=args.device, overrides=args.set,
                             train_steps=args.train_steps, parts=parts, limits=limits)  # fmt: skip
    print(summary(result))
    print(f"wrote {path}")
    return 1 if result["gpu_check"]["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`mmrlsd eval`: generate and score a benchmark, or score an existing predictions file.

Parses arguments and dispatches to `mmrlsd.bench.run`; nothing heavy is imported at parse time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "generate and/or score a benchmark"
EXAMPLES = """examples:
  # generate with a model and score (writes predictions.jsonl, scores.json, summary.md)
  mmrlsd eval --bench mathvista --model runs/rlsd/checkpoint-500 --data MathVista/data/testmini.json
  mmrlsd eval --bench mmmu --model Qwen/Qwen2.5-VL-7B-Instruct --split validation --limit 30 --output-dir runs/eval/mmmu
  mmrlsd eval --bench zerobench --model Qwen/Qwen2.5-VL-7B-Instruct --split zerobench_subquestions
  # score an existing predictions file (ours or an official format) against local gold
  mmrlsd eval --bench mathvista --predictions MathVista/results/bard/output_bard.json \\
      --data MathVista/data/testmini.json --mode official --output bard.json
  mmrlsd eval --bench mmmu --predictions MMMU/mmmu/example_outputs/llava1.5_13b \\
      --data MMMU/mmmu/answer_dict_val.json --output llava.json
  mmrlsd eval --bench zerobench --predictions runs/eval/zerobench_zerobench/predictions.jsonl \\
      --data zerobench/data/zerobench-00000-of-00001.parquet --mode official --output zerobench.json
  # MathVista with the official LLM extraction step, against a judge you run (OpenAI-compatible)
  mmrlsd eval --bench mathvista --predictions runs/eval/mathvista_testmini/predictions.jsonl --data testmini.json \\
      --mode llm --judge-url http://localhost:8000/v1 --judge-model Qwen/Qwen2.5-72B-Instruct --output llm.json

MathVista/ and MMMU/ are clones of github.com/lupantech/MathVista and github.com/MMMU-Benchmark/MMMU;
zerobench/ is a download of the Hugging Face dataset jonathan-roberts1/zerobench. Without --data, records
come from the Hugging Face hub.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the `eval` flags to `p`."""
    p.add_argument("--bench", required=True, help="benchmark name (see `mmrlsd ls`)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory or hub id: generate answers, then score them")
    src.add_argument("--predictions", help="score this predictions file/folder instead of generating")
    p.add_argument("--data", help="local gold data in the official format (default: the Hugging Face hub)")
    p.add_argument("--split", help="split (default: the protocol file's, else the benchmark's default)")
    p.add_argument(
        "--mode", help="scoring mode (default: official when scoring a file; the protocol file's otherwise)"
    )
    p.add_argument("--limit", type=int, help="only the first N records (generation)")
    p.add_argument(
        "--output-dir", help="where generation writes its files (default: runs/eval/<bench>_<split>)"
    )
    p.add_argument(
        "--output", help="score-only: write the result JSON here (default: print the summary only)"
    )
    p.add_argument(
        "--config", help="protocol settings YAML (default: the packaged mmrlsd/bench/protocols/<bench>.yaml)"
    )
    p.add_argument(
        "--image-root", help="folder that image paths in --data resolve against (default: its folder)"
    )
    p.add_argument("--engine", default="auto", help="auto, hf or vllm (auto: vllm when installed and on GPU)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--max-new-tokens", type=int, help="override the config's max_new_tokens")
    p.add_argument("--batch-size", type=int, help="override the config's batch_size")
    p.add_argument(
        "--samples", type=int, help="override the config's samples: k sampled answers for pass@k (0: none)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--judge-url", help="mode llm (MathVista): OpenAI-compatible base URL, e.g. http://localhost:8000/v1"
    )
    p.add_argument("--judge-model", help="mode llm: the judge model name")
    p.add_argument(
        "--judge-key-env", default="OPENAI_API_KEY", help="mode llm: env variable holding the API key"
    )


def _score_only(bench, args: argparse.Namespace) -> int:
    from mmrlsd.bench.base import restrict_to_gold
    from mmrlsd.bench.run import summary_markdown, write_json, write_result

    split = args.split or bench.default_split
    if args.output and Path(args.output).is_dir():
        print(f"error: --output {args.output}: is a directory (give a file name for the result JSON)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        gold = bench.load(args.data, split)
        predictions, warnings = restrict_to_gold(bench, gold, bench.read_predictions(args.predictions))
        result = bench.score(gold, predictions, mode=args.mode or "official", split=split)
    except (ValueError, KeyError) as e:  # duplicate ids, damaged rows, missing fields: named by the readers
        if getattr(args, "debug", False):
            raise
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    if warnings:
        result["warnings"] = [*result.get("warnings", []), *warnings]
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.output), result)
    if args.output_dir:
        write_result(Path(args.output_dir), result)
    print(summary_markdown(result))
    return 0


def _generate(bench, args: argparse.Namespace) -> int:
    import dataclasses

    from mmrlsd.bench.run import default_config_path, evaluate, load_eval_config, pick_engine
    from mmrlsd.model.load import resolve_model_path

    model = resolve_model_path(args.model)  # RUN/checkpoint-N (or RUN) -> its Hugging Face folder
    cfg = load_eval_config(args.config or default_config_path(bench.name))
    overrides = {"split": args.split, "mode": args.mode, "max_new_tokens": args.max_new_tokens,
                 "batch_size": args.batch_size, "samples": args.samples}  # fmt: skip
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    split = cfg.split or bench.default_split
    records = bench.load(args.data, split)
    if args.limit is not None:
        records = records[: args.limit]
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    data_root = Path(args.image_root) if args.image_root else (Path(args.data).parent if args.data else None)
    out_dir = Path(args.output_dir or f"runs/eval/{bench.name}_{split}")
    engine = pick_engine(args.engine)
    result = evaluate(bench, records, model, out_dir, cfg, data_root=data_root, engine=engine, dtype=dtype,
                      device=device, progress=not args.no_progress)  # fmt: skip
    if result is None:
        print(
            f"{bench.name} {split}: answers withheld; wrote {out_dir / 'predictions.jsonl'} ({len(records)} rows)"
        )
        return 0
    print((out_dir / "summary.md").read_text())
    print(f"wrote {out_dir}/predictions.jsonl, scores.json, summary.md")
    return 0


def model_problem(model: str) -> str | None:
    """Why `model` cannot load, found without reading anything heavy, else None.

    A path that exists is fine. One written as a local path (absolute, starting with ``.`` or ``~``, or with
    two or more ``/``; a hub id is ``ORG/NAME``) that does not exist is an error. A hub id is left to the
    loader, except offline (``HF_HUB_OFFLINE``), where it must already be in the Hugging Face cache."""
    import os

    if Path(model).expanduser().exists():
        return None
    if os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") >= 2:
        return "no such file or directory (hub ids have the form ORG/NAME)"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # noqa: BLE001 - an id the hub would reject is not in the cache either
            cached = None
        if not isinstance(cached, str):
            return "no such folder, and not in the Hugging Face cache (HF_HUB_OFFLINE is set)"
    return None


def run(args: argparse.Namespace) -> int:
    """Run `mmrlsd eval` for parsed `args`; returns the exit status (2 for a usage error)."""
    from mmrlsd.bench import get_bench

    try:
        bench = get_bench(args.bench)()
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    mode = args.mode
    if mode is not None and mode not in bench.modes:
        print(f"error: {bench.name}: unknown mode {mode!r}; known: {', '.join(bench.modes)}", file=sys.stderr)
        return 2
    split = args.split
    if split is not None and split not in bench.splits:
        print(
            f"error: {bench.name}: unknown split {split!r}; known: {', '.join(bench.splits)}", file=sys.stderr
        )
        return 2
    if args.judge_url or args.judge_model:
        if not hasattr(bench, "judge") or not (args.judge_url and args.judge_model):
            print(
                f"error: {bench.name}: --judge-url and --judge-model are for mode llm (MathVista)",
                file=sys.stderr,
            )
            return 2
        import os

        from mmrlsd.bench.mathvista import Judge

        bench.judge = Judge(
            url=args.judge_url, model=args.judge_model, api_key=os.environ.get(args.judge_key_env, "")
        )
    problem = model_problem(args.model) if args.model else None
    if problem:
        print(f"error: --model {args.model}: {problem}", file=sys.stderr)
        return 2
    try:
        bench.setup()  # before any data is read: a missing dependency fails here, not after generation
    except Exception as e:  # noqa: BLE001 - reported as one line
        print(f"error: {bench.name}: {e}", file=sys.stderr)
        return 1
    if args.predictions:
        return _score_only(bench, args)
    return _generate(bench, args)

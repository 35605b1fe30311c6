"""`mmrlsd viz`: the token-and-image view of one dumped response, without Jupyter (argparse only at import).

    mmrlsd viz runs/tiny --step 2 --sample 0 --out view.html            # hover a token for its numbers
    mmrlsd viz runs/tiny --step 2 --sample 0 --out view.png --signal token_adv

The image overlay needs one forward pass with a checkpoint of the run (`checkpoint-N/`); `--no-overlay` skips it.
"""

from __future__ import annotations

import argparse

HELP = "render RLSD token credit (text + image overlay) to HTML or PNG"
EXAMPLES = """examples:
  mmrlsd viz runs/tiny --step 2 --sample 0 --out view.html
  mmrlsd viz runs/tiny --out view.png --signal token_adv       # newest step with an image, its first such sample
  mmrlsd viz runs/tiny --step 2 --out view.png --method grad --tokens 3,4,5
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory (with metrics.jsonl, rollouts/, checkpoint-N/)")
    p.add_argument("--step", type=int, help="dumped step (default: the newest with an image)")
    p.add_argument(
        "--sample", type=int, help="response index in the dump (default: first with an image and A != 0)"
    )
    p.add_argument("--out", required=True, help="FILE.html (hoverable) or FILE.png (one figure)")
    p.add_argument("--signal", default="w", choices=["w", "token_adv", "delta"],
                   help="token colouring: w (neutral 1), token_adv (Â, neutral A), delta (Δ, neutral 0)")  # fmt: skip
    p.add_argument("--method", default="attention", choices=["attention", "grad"],
                   help="image overlay: attention (eager) or gradient x input")  # fmt: skip
    p.add_argument(
        "--tokens", help="comma-separated response token indices for the overlay (default: top --top-k)"
    )
    p.add_argument("--top-k", type=int, default=5, help="tokens furthest from neutral used for the overlay")
    p.add_argument("--device", default="cpu", help="device of the overlay forward pass (cpu, cuda)")
    p.add_argument("--no-overlay", action="store_true", help="skip the image overlay (no model is loaded)")


def run(args: argparse.Namespace) -> int:
    """Render the view; returns the exit status (2 for a usage error, printed as `error: ...`)."""
    import sys

    try:  # the package pulls in matplotlib (the notebook extra)
        from mmrlsd.viz.data import default_sample, default_step, open_run
        from mmrlsd.viz.report import render
    except ImportError as e:
        print(f"error: mmrlsd viz needs matplotlib ({e}); pip install 'mmrlsd[notebook]'", file=sys.stderr)
        return 2
    if not args.out.lower().endswith((".html", ".png")):
        print(f"error: --out {args.out}: must end in .html or .png", file=sys.stderr)
        return 2
    try:
        run = open_run(args.run_dir)
        step = default_step(run) if args.step is None else args.step
        sample = default_sample(run.rows(step)) if args.sample is None else args.sample
        n = len(run.row(step, sample)["tokens"])  # fail here, listing the valid steps/samples
        tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else None
        if tokens and not all(0 <= t < n for t in tokens):
            raise ValueError(
                f"--tokens {args.tokens}: indices must be in 0..{n - 1} (the response has {n} tokens)"
            )
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    kw = {"overlay": False} if args.no_overlay else {"method": args.method, "k": args.top_k, "tokens": tokens,
                                                     "device": args.device}  # fmt: skip
    out = render(run, step, sample, args.out, signal=args.signal, **kw)
    print(f"wrote {out} (step {step}, sample {sample}, signal {args.signal})")
    return 0

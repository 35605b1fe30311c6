"""Time the rollout of `mmrlsd perf --config cpu`'s batch with the code of another commit, for a same-machine
comparison across commits (`2026-12-05-cpu-rollout-vs-6429516.json`).

    git worktree add /tmp/old 6429516
    for i in 1 2; do
      (cd /tmp/old && PYTHONPATH=$PWD python $REPO/eval/results/perf/scripts/rollout_vs_commit.py old old_$i.pt)
      PYTHONPATH=$REPO python eval/results/perf/scripts/rollout_vs_commit.py generate generate_$i.pt
      PYTHONPATH=$REPO python eval/results/perf/scripts/rollout_vs_commit.py compile compile_$i.pt
    done

`old`: the tree's own `generate` defaults (at 6429516: Hugging Face `generate` after the shared prefill);
`generate` / `compile`: `hf_decode` of the tree on PYTHONPATH (`compile` with cascade attention), with its vision
tower's patch embedding as a matrix multiply where the tree has that default (`model.linear_patch_embed`). One
thread, seed 0, 2 warm-up calls, then `calls` timed ones; saves the ids, mask and times to `out` (compare the ids
across files).
"""

import statistics
import sys
import time
from importlib.resources import files

import torch

from mmrlsd.data.encoding import encode, repeat_encoding
from mmrlsd.data.prompts import PromptBuilder
from mmrlsd.experiments import perf
from mmrlsd.model import vision
from mmrlsd.rollout.generate import generate


def main(mode: str, out: str, calls: int = 7) -> None:
    pc = perf.load_perf_config(str(files("mmrlsd.experiments") / "perf_configs/cpu.yaml"), [])
    torch.set_num_threads(1)
    model, processor = perf.build_model(pc, torch.device("cpu"))
    model.eval()
    if hasattr(vision, "linear_patch_embed"):  # the default since 00a70d3 (`model.linear_patch_embed`)
        vision.linear_patch_embed(model)
    samples = perf.make_samples(pc, pc.batch_size)
    template = getattr(perf, "packaged_prompt", None) or perf.template  # renamed after 6429516
    prompts = PromptBuilder(processor, template("student.jinja"), template("teacher.jinja"), "answer")
    texts, images = [prompts.student(s) for s in samples], [s.pil_images for s in samples]
    enc = repeat_encoding(encode(processor, texts, images), pc.group_size)
    kw = {} if mode == "old" else {"decode": mode, "cascade": mode == "compile"}

    def call():
        return generate(model, processor, enc, group_size=pc.group_size, max_new_tokens=pc.max_new_tokens, seed=0,
                        share_prefill=True, **kw)  # fmt: skip

    for _ in range(2):
        call()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        r = call()
        times.append(time.perf_counter() - t)
    torch.save({"ids": r.response_ids, "mask": r.response_mask, "times": times}, out)
    print(mode, "median", round(statistics.median(times), 4), "tokens", int(r.response_mask.sum()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))

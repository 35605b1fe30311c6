"""The tiny lab: its task mix and data, and the GRPO / RLSD / OPSD / SDPO comparison at toy scale.

    mmrlsd lab data --out data/tiny/lab                                  # the committed RL data
    mmrlsd lab data --out data/synth_sft --n 24000 --n-val 0 --seed 1    # the SFT data
    mmrlsd lab check                                                     # time + judge the default run
    mmrlsd lab compare trainer.threads=1                                 # the comparison (2 runs at a time)
    mmrlsd lab compare --add --methods sdpo trainer.threads=1            # one more method, same budget

The lab trains a ~1M-parameter Qwen2-VL (`data/tiny/sft-qwen2vl/`, made by `mmrlsd sft configs/tiny_sft.yaml`)
on four synthetic families (`mmrlsd.data.synth`) at difficulty levels 1-2. Three of them are multi-step
(`count_two_colors`: count two colours, add; `add_digits`: read two digits, add; `bar_diff`: read two bars,
subtract), so a reference answer constrains the intermediate steps and gives the teacher something to say.

One module per job: `data` (the records), `runs` (one `mmrlsd train` process per method and seed), `stats`
(curves, token credit, summaries over seeds), `report` (the figure and the results tables), `compare` (runs,
statistics and report of a comparison), `check` (the default run timed and judged against its bar).
"""

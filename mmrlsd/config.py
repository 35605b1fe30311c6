"""Typed, strict configuration: one dataclass per section, loaded from YAML (`yaml.safe_load` only).

Unknown keys and wrong types fail before any model is built, naming the key and the closest valid one:

    configs/x.yaml: unknown key 'algo.eps_W'; did you mean 'algo.eps_w'?

Dotted overrides come from the command line (`trainer.total_steps=3 algo.lam0=0`); their values are parsed as
YAML scalars. `mmrlsd validate CONFIG` runs this same loader.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mmrlsd.errors import ConfigError

T = TypeVar("T")


@dataclass
class ModelConfig:
    path: str = ""
    """Hub id or local directory of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint (also `RUN/checkpoint-N`). A
    relative path in a config file is looked up next to the file, then in the current directory."""
    dtype: str = "float32"
    """Compute dtype of the forward and backward passes: float32 | bfloat16 | float16 (bf16 is ~16x slower than
    fp32 on CPUs). Parameters, gradients and AdamW states stay float32 unless `dist.mixed_precision` is off."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa | eager | flash_attention_2."""
    trust_remote_code: bool = False
    """Off unless you trust the checkpoint's code."""
    min_pixels: int = 0
    """Lower pixel budget per image (0: the processor's default); smaller images are upscaled to it."""
    max_pixels: int = 0
    """Upper pixel budget per image (0: the processor's default); larger images are resized down."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (memory for speed)."""
    packing: bool = False
    """Padding-free packing of the log-prob passes (teacher, old policy, update): block-diagonal attention, no pad
    tokens."""
    share_prefix: bool = False
    """With packing: a prompt's G responses share one segment, so the prompt (images included) is computed once."""
    share_vision: bool = False
    """Vision features once per prompt, shared by its G responses (the tower's backward runs once per prompt)."""
    logprob_chunk: int = 0
    """Tokens per chunk of the lm_head projection + logsumexp on the fast path (0: full [tokens, vocab] fp32
    logits)."""
    packed_attention: str = "auto"
    """Packed attention kernel: auto (flash_attention_2 if loaded, flex_attention on CUDA, else varlen_sdpa) |
    varlen_sdpa | flex_attention | flash_attention_2."""
    vision_windows: bool = True
    """With sdpa attention: the vision tower attends within its windows (each image; Qwen2.5-VL's 8x8-patch
    windows) in one batched call per distinct window length, not one call per window (transformers' sdpa path);
    the same arithmetic. Off: transformers' own loop."""
    linear_patch_embed: bool = True
    """The vision tower's patch embedding (a 3-D convolution whose kernel is its stride) as one matrix multiply
    over the flattened patches: the same sums in another order, ~6x faster on a CPU. Off: transformers'
    convolution."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Local JSONL/parquet files, or one hub dataset id (`hub:org/name`). Relative paths in a config file: next
    to the file first, then the current directory (overrides: the current directory)."""
    val_files: list[str] = field(default_factory=list)
    """Validation files (same format); empty: no validation."""
    train_split: str = "train"
    """Split to read when a source is a hub dataset."""
    val_split: str = "test"
    """Split to read for validation hub datasets."""
    problem_key: str = "problem"
    """Field holding the question text."""
    answer_key: str = "answer"
    """Field holding the reference final answer (the privileged information r)."""
    images_key: str = "images"
    """Field holding the record's images: paths relative to the data file, `{bytes, path}` structs (parquet
    written by `datasets`, hub datasets), PIL images or URLs (may be absent: text-only)."""
    problem_type_key: str = "problem_type"
    """Optional field: numeric | multiple_choice | ... (chooses the reward's matcher)."""
    solution_key: str = "solution"
    """Field holding a reference solution or reasoning trace: the teacher's privileged text under
    `algo.teacher_info: solution` (OPSD; the release reads its dataset's reasoning-trace column,
    `qwen3vl_235b_thinking_response`). Required then: training records without it are skipped and counted."""
    id_key: str = "id"
    """Optional field: record id (default: `<file>:<line>`)."""
    options_key: str = "options"
    """Optional field: a list of answer options, listed under the question by templates that use `options`."""
    student_template: str = "student.jinja"
    """Jinja template of the student's user turn (variables: problem, problem_type, options); images go where
    the rendered text has `<image>` markers, else first. A path (relative: to the config file, then the current
    directory), or the file name of a template shipped in `mmrlsd/prompts/`."""
    teacher_template: str = "teacher.jinja"
    """Jinja template of the teacher's user turn (variables: problem, problem_type, options, reference, answer,
    solution). Found like `student_template`."""
    max_val_items: int = 0
    """Cap on validation items (0: all)."""
    shuffle: bool = True
    """Shuffle the training data each epoch (seeded)."""
    max_prompt_tokens: int = 16384
    """Longest prompt, student or teacher, image tokens included; longer records are skipped and counted (0: no
    limit)."""
    max_images: int = 32
    """Most images in one record; records with more are skipped and counted (0: no limit)."""
    allow_remote_images: bool = False
    """Fetch `http(s)` image URLs (off: such records are skipped). Fetches have a timeout and a size cap and
    never go to loopback, private or link-local addresses."""
    remote_image_timeout: float = 10.0
    """Seconds for one remote image's whole download."""
    remote_image_max_bytes: int = 20_000_000
    """Largest remote image accepted, in bytes."""
    allow_external_images: bool = False
    """Allow image paths outside the data file's folder (absolute paths, `..`, symlinks pointing out)."""


@dataclass
class RolloutConfig:
    engine: str = "hf"
    """Rollout engine: hf | vllm."""
    n: int = 8
    """G: responses sampled per prompt."""
    batch_size: int = 8
    """B: prompts per step (B*G responses)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling."""
    top_k: int = 0
    """Top-k sampling (0: off)."""
    max_new_tokens: int = 256
    """Longest response."""
    gen_batch_size: int = 0
    """Sequences per `generate` call (0: all B*G at once)."""
    share_prefill: bool = True
    """HF rollout: each prompt's prefill (images included) runs once and its KV cache is copied to its G samples;
    `gen_batch_size` then counts whole groups."""
    hf_decode: str = "auto"
    """HF rollout's decode loop: auto (graph on a GPU, lean elsewhere) | lean (a plain loop of forwards over a KV
    cache with room for the whole response; on a CPU running one thread, finished rows leave the batch) | graph
    (lean, with each decode forward after the first replayed as a CUDA graph over a static KV cache: the same ids
    as lean up to float near-ties; sdpa attention only, a single process: under FSDP it decodes as lean, and on a
    CPU it gains nothing) | compile (graph's static step compiled by `torch.compile` instead of captured: on a
    CPU ~1.5x faster than lean per rollout after seconds of compiling per process and prompt-length bucket; the
    same ids as lean up to float near-ties; not measured on a GPU) | generate (Hugging Face `generate`). lean and
    generate sample the same ids. None of them applies the logits processors a checkpoint's generation config adds
    (e.g. Qwen2.5-VL's repetition_penalty 1.05; a warning names them): samples follow the policy, as with vLLM."""
    cascade_attention: bool = True
    """HF rollout with the shared prefill and the lean or graph loop: each prompt's keys and values stay in the KV
    cache once (not copied to its G samples), and each decode step attends to them for the G samples in one matrix
    multiply plus to each sample's own tokens (cascade attention). Reads G times fewer prompt key/value bytes per
    step and holds G times less prompt cache; the same ids up to float near-ties (false: the exact lean loop)."""
    val_temperature: float = 0.7
    """Temperature of `val/sample_accuracy` samples (the paper's validation used 0.7)."""
    val_n: int = 1
    """Samples per validation item for `val/sample_accuracy`."""
    val_top_p: float = 1.0
    """Nucleus sampling of the `val/sample_accuracy` samples (the paper's validation: 0.8)."""
    val_top_k: int = 0
    """Top-k of the `val/sample_accuracy` samples (0: off; the paper's validation: 20)."""
    val_presence_penalty: float = 0.0
    """Presence penalty of the `val/sample_accuracy` samples: each token already in the response has its logit
    lowered by this much before temperature, top-k and top-p (vLLM's definition; the released script: 1.5)."""
    vllm_gpu_memory_utilization: float = 0.5
    """vLLM: fraction of the GPU's memory its engine may take (weights + KV cache), in (0, 1]; the policy, teacher
    and optimizer state need the rest. Ignored on CPU (see vllm_cpu_kvcache_gb)."""
    vllm_max_model_len: int = 0
    """vLLM: longest prompt + response in tokens (0: the model's own limit); at most the model's positions."""
    vllm_tensor_parallel_size: int = 1
    """vLLM: GPUs per engine; under torchrun the ranks of one tensor-parallel group share one engine and
    must divide the world size."""
    vllm_enforce_eager: bool = False
    """vLLM: no CUDA graphs (faster start, slower decoding)."""
    vllm_max_num_seqs: int = 0
    """vLLM: most sequences decoded at once (0: vLLM's default)."""
    vllm_cpu_kvcache_gb: float = 1.0
    """vLLM's CPU build: KV-cache size in GiB (its default takes a large share of RAM)."""
    vllm_sleep: str = "auto"
    """vLLM: release its weights and KV cache while the policy trains: auto (on CUDA) | on | off."""
    vllm_in_process: bool = True
    """vLLM: run its engine core inside the training process (weights pushed through `reload_weights`); false
    runs it in its own process (single-process runs; weights through vLLM's RL weight transfer, CUDA IPC)."""


@dataclass
class RewardConfig:
    name: str = "math"
    """Reward function (registry in mmrlsd.reward.rewards)."""
    acc_weight: float = 0.9
    """reward = acc_weight * accuracy + format_weight * format (multiple choice: accuracy only)."""
    format_weight: float = 0.1
    """Weight of the <thought>...</thought><answer>...</answer> format check."""
    timeout: float = 5.0
    """Seconds per answer in the math-equivalence worker; slower answers score 0."""
    plugins: list[str] = field(default_factory=list)
    """Python modules imported before training that register extra rewards with
    `@mmrlsd.reward.rewards.register_reward(name)` (your own code: nothing from data or model output is run)."""


@dataclass
class AlgoConfig:
    token_adv: str = "rlsd"
    """Token advantage: rlsd | grpo | opsd | grpo_opsd (registry in mmrlsd.algo). SDPO is opsd with
    teacher_info sibling."""
    adv: str = "grpo"
    """Group advantage estimator (registry in mmrlsd.algo.advantage)."""
    norm_std: bool = True
    """A = (R - mean) / (std + eps) if true, else R - mean."""
    lam0: float = 0.5
    """λ_0 of Â_t = A·((1-λ) + λ·clip(w_t, 1-ε_w, 1+ε_w)); 0 gives exactly GRPO."""
    lam_decay_steps: int = 50
    """D: λ decays linearly from λ_0 to 0 over D optimizer steps (paper 50; released script 60). Steps count from
    1, as in the release: the first update uses λ_0·(1 - 1/D) and λ is 0 from step D on."""
    lam_warmup_steps: int = 0
    """W: linear warm-up of λ, λ_0·step/W before step W, then the decay from step W (0 in the release)."""
    eps_w: float = 0.2
    """ε_w: clip range of the evidence weight w_t = exp(sign(A)·Δ_t)."""
    clip_low: float = 0.2
    """ε_low of the PPO ratio clip."""
    clip_high: float = 0.28
    """ε_high of the PPO ratio clip (clip-higher)."""
    clip_c: float = 3.0
    """Dual-clip constant c for negative advantages (0: off)."""
    teacher_refresh: int = 10
    """K: refresh the frozen teacher snapshot every K optimizer steps (0: the live policy)."""
    opsd_coef: float = 1.0
    """Coefficient of the distillation term in grpo_opsd (Â_t = A + coef·Δ_t)."""
    teacher_info: str = "answer"
    """Privileged information in the teacher prompt: answer | solution (OPSD uses the solution) | sibling
    (SDPO: a correct response of the same group, another row than the one scored; rows whose group has none
    get Δ_t = 0)."""
    distill: str = "sampled"
    """How opsd and grpo_opsd distil: sampled (reverse KL on the sampled tokens, Â_t = Δ_t) | jsd (the
    full-vocabulary generalised JSD_β between teacher and student, added to the loss; plain update path only)."""
    jsd_beta: float = 0.5
    """β of the generalised JSD (0: forward KL(T||S), 1: reverse KL(S||T)); with algo.distill jsd."""
    teacher_diagnostics: bool = False
    """Run the teacher pass even when it cannot change the update (GRPO), to log Δ and w for comparison."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (A = 0) before the teacher pass and update."""
    sdpo_pick: str = "first"
    """SDPO (teacher_info sibling): which correct sibling the teacher sees: first (the first other correct
    response of the group) | shortest (the release's form: the shortest other correct one, plus the shortest other
    incorrect one as the template's `feedback`)."""
    rlsd_thought_only: bool = False
    """The teacher reweights only tokens inside <thought>...</thought> (the tags excluded); the answer and format
    tokens keep Â_t = A (the release's `rlsd_thought_only`; tags are matched on token ids, as there)."""
    rlsd_negative_only: bool = False
    """The teacher reweights only responses with A < 0; the others keep Â_t = A (the release's
    `rlsd_negative_only`)."""
    online_filtering: bool = False
    """Keep only groups whose mean `filter_key` lies strictly inside (filter_low, filter_high), rolling out more
    prompts until the batch is full again (the release's online filtering; off there by default)."""
    filter_key: str = "reward"
    """What online filtering averages per group: reward (the release's `overall`) | accuracy."""
    filter_low: float = 0.01
    """Online filtering: a group's mean must be > filter_low."""
    filter_high: float = 0.99
    """Online filtering: a group's mean must be < filter_high."""
    max_refill_tries: int = 20
    """Online filtering: rollout rounds per step (the first included) before training on the groups kept so far
    (the release's `max_try_make_batch`, which raises instead)."""


@dataclass
class OptimConfig:
    lr: float = 1e-6
    """AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Max global grad norm (0: off)."""
    warmup_steps: int = 0
    """Linear lr warm-up steps."""
    micro_batch_size: int = 8
    """Sequences per forward/backward; accumulation gives the same update as one big batch."""
    mini_batches: int = 1
    """Optimizer steps per rollout batch (1: the old-policy log-probs equal the current ones)."""
    token_budget: int = 0
    """Real tokens per micro-batch when packing (0: micro_batch_size rows)."""
    freeze_vision: bool = False
    """Freeze the vision tower (the paper trains it)."""


@dataclass
class TrainerConfig:
    total_steps: int = 100
    """Optimizer steps (rollout batches) to run."""
    save_every: int = 50
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints to keep (0: all)."""
    save_hf: bool = True
    """Also write `checkpoint-N/hf/`, a plain Hugging Face model folder (weights in `model.dtype`) that
    `from_pretrained`, vLLM, lmms-eval and VLMEvalKit load unchanged; off: `mmrlsd export` makes it later."""
    val_every: int = 0
    """Validate every N steps, plus before the first and after the last (0: never)."""
    dump_every: int = 1
    """Write a rollout dump every N steps (0: never)."""
    dump_max: int = 64
    """Responses per rollout dump."""
    seed: int = 0
    """Seeds data order, sampling and init."""
    output_dir: str = "runs/latest"
    """Run directory (overridden by --output-dir)."""
    device: str = "auto"
    """cpu | cuda | auto."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    max_bad_steps: int = 10
    """Abort after this many consecutive skipped steps (non-finite loss, empty batch)."""
    logger: list[str] = field(default_factory=lambda: ["console"])
    """Experiment trackers besides `metrics.jsonl` (always written): console | tensorboard | wandb | mlflow (each
    needs its package: `pip install 'mmrlsd[tensorboard]'` etc.). Scalars keep their `metrics.jsonl` names."""
    project_name: str = "mmrlsd"
    """W&B project / MLflow experiment."""
    experiment_name: str = ""
    """W&B / MLflow run name (empty: the run directory's name)."""


@dataclass
class DistConfig:
    fsdp: str = "auto"
    """FSDP2 sharding: auto (on when launched by torchrun with WORLD_SIZE > 1) | on | off."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl with CUDA, else gloo) | nccl | gloo."""
    mixed_precision: bool = True
    """Float32 master weights, gradient reduction and AdamW states, computing in `model.dtype` (FSDP2
    `MixedPrecisionPolicy` when sharded, `torch.autocast` in one process). false: parameters and AdamW states in
    `model.dtype` itself (half the memory, but at lr ~1e-6 most bf16 updates round away)."""
    teacher_offload: bool = False
    """Keep the frozen teacher snapshot's shards on CPU (FSDP2 CPU offload); saves GPU memory, costs transfers."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    dist: DistConfig = field(default_factory=DistConfig)


# Keys whose choices are a registry's names (algo.token_adv, algo.adv, reward.name, model.packed_attention) are
# checked by `mmrlsd.train.preflight.check_registered`, which can see the registries.
CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2", "flex_attention"),
    "rollout.engine": ("hf", "vllm"),
    "rollout.hf_decode": ("auto", "lean", "graph", "compile", "generate"),
    "rollout.vllm_sleep": ("auto", "on", "off"),
    "algo.teacher_info": ("answer", "solution", "sibling"),
    "algo.distill": ("sampled", "jsd"),
    "algo.filter_key": ("reward", "accuracy"),
    "algo.sdpo_pick": ("first", "shortest"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "dist.fsdp": ("auto", "on", "off"),
    "dist.backend": ("auto", "nccl", "gloo"),
}
POSITIVE = ("rollout.n", "rollout.batch_size", "rollout.max_new_tokens", "optim.micro_batch_size",
            "optim.mini_batches", "trainer.total_steps", "algo.lam_decay_steps", "optim.lr", "reward.timeout",
            "trainer.max_bad_steps", "rollout.val_n", "data.remote_image_timeout",
            "data.remote_image_max_bytes", "algo.max_refill_tries", "rollout.vllm_tensor_parallel_size",
            "rollout.vllm_cpu_kvcache_gb")  # fmt: skip
NON_NEGATIVE = ("model.logprob_chunk", "optim.token_budget", "algo.eps_w", "algo.clip_low", "algo.clip_high", "algo.lam0", "algo.teacher_refresh",
                "trainer.save_every", "trainer.val_every", "trainer.keep_last", "optim.grad_clip",
                "optim.weight_decay", "rollout.temperature", "optim.warmup_steps", "algo.lam_warmup_steps",
                "rollout.top_k", "rollout.gen_batch_size", "model.min_pixels", "model.max_pixels",
                "data.max_val_items", "trainer.dump_every", "trainer.dump_max", "trainer.threads",
                "rollout.val_temperature", "rollout.val_top_k", "rollout.val_presence_penalty",
                "data.max_prompt_tokens", "data.max_images", "rollout.vllm_max_model_len",
                "rollout.vllm_max_num_seqs")  # fmt: skip


AT_MOST = {"optim.lr": 1.0, "optim.weight_decay": 1.0, "optim.grad_clip": 1e6, "rollout.temperature": 10.0,
           "rollout.val_temperature": 10.0, "algo.clip_low": 0.99, "algo.clip_high": 10.0, "algo.clip_c": 1e3,
           "reward.timeout": 3600.0, "algo.opsd_coef": 1e3}  # fmt: skip
"""Upper bounds on values no run can mean (an lr of 1e308 writes an all-NaN checkpoint)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load` semantics, but a key given twice in one mapping is an error (not a silent overwrite)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: let SafeLoader report it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {first} and {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )  # fmt: skip
        return super().construct_mapping(node, deep=deep)


def _safe_load(text: str, where: str):
    """YAML -> Python with SafeLoader semantics; every failure is a ConfigError naming `where`."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no Python objects
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a config") from None


def _check_type(value: Any, tp: Any, key: str, src: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _check_type(value, args[0], key, src)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{src}: '{key}' must be a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_type(v, item_tp, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-6` as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):  # `.nan`, `.inf`, "nan"
        raise ConfigError(f"{src}: '{key}' must be a finite number, got {value!r}")
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{src}: '{key}' must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _merge(obj: Any, data: dict, prefix: str, src: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(full, valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"{src}: unknown key '{full}'{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{src}: '{full}' must be a mapping (a config section), got {value!r}")
            _merge(current, value, f"{full}.", src)
        else:
            setattr(obj, key, _check_type(value, hints[key], full, src))


def _validate(cfg: Config, src: str) -> None:
    for key, choices in CHOICES.items():
        value = get_key(cfg, key)
        if value not in choices:
            raise ConfigError(f"{src}: '{key}' is {value!r}; valid choices: {', '.join(choices)}")
    for key in POSITIVE:
        if get_key(cfg, key) <= 0:
            raise ConfigError(f"{src}: '{key}' must be > 0, got {get_key(cfg, key)!r}")
    for key in NON_NEGATIVE:
        if get_key(cfg, key) < 0:
            raise ConfigError(f"{src}: '{key}' must be >= 0, got {get_key(cfg, key)!r}")
    for key, hi in AT_MOST.items():
        if get_key(cfg, key) > hi:
            raise ConfigError(f"{src}: '{key}' must be <= {hi:g}, got {get_key(cfg, key)!r}")
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"{src}: 'optim.betas' must be in [0, 1), got {cfg.optim.betas}")
    if 0 < cfg.algo.clip_c <= 1:
        raise ConfigError(f"{src}: 'algo.clip_c' must be 0 (off) or > 1, got {cfg.algo.clip_c}")
    for key in ("reward.acc_weight", "reward.format_weight"):
        if get_key(cfg, key) < 0:
            raise ConfigError(f"{src}: '{key}' must be >= 0, got {get_key(cfg, key)!r}")
    if not cfg.model.path:
        raise ConfigError(f"{src}: 'model.path' is required (a hub id or a local checkpoint directory)")
    if not cfg.data.train_files:
        raise ConfigError(f"{src}: 'data.train_files' is required (a JSONL/parquet path or hub:org/name)")
    if cfg.rollout.n < 2 and (cfg.algo.token_adv != "opsd" or cfg.algo.teacher_info == "sibling"):
        what = "sibling demonstrations" if cfg.algo.teacher_info == "sibling" else "group advantages"
        raise ConfigError(f"{src}: 'rollout.n' must be >= 2 for {what}, got {cfg.rollout.n}")
    if not 0 <= cfg.algo.jsd_beta <= 1:
        raise ConfigError(f"{src}: 'algo.jsd_beta' must be in [0, 1], got {cfg.algo.jsd_beta}")
    if not 0 <= cfg.algo.lam0 <= 1:
        raise ConfigError(f"{src}: 'algo.lam0' must be in [0, 1], got {cfg.algo.lam0}")
    if (cfg.algo.rlsd_thought_only or cfg.algo.rlsd_negative_only) and cfg.algo.token_adv != "rlsd":
        raise ConfigError(
            f"{src}: 'algo.rlsd_thought_only' / 'algo.rlsd_negative_only' need 'algo.token_adv' rlsd, "
            f"got {cfg.algo.token_adv!r}"
        )
    if cfg.algo.filter_low >= cfg.algo.filter_high:
        raise ConfigError(
            f"{src}: 'algo.filter_low' ({cfg.algo.filter_low}) must be < 'algo.filter_high' ({cfg.algo.filter_high})"
        )
    if cfg.algo.eps_w > 1:
        raise ConfigError(
            f"{src}: 'algo.eps_w' must be <= 1 (a clip floor 1-eps_w below 0 would flip the sign of A)"
        )
    for key in ("rollout.top_p", "rollout.val_top_p", "rollout.vllm_gpu_memory_utilization"):
        if not 0 < get_key(cfg, key) <= 1:
            raise ConfigError(f"{src}: '{key}' must be in (0, 1], got {get_key(cfg, key)}")
    if cfg.reward.acc_weight + cfg.reward.format_weight <= 0:
        raise ConfigError(f"{src}: 'reward.acc_weight' + 'reward.format_weight' must be > 0")
    if cfg.optim.mini_batches > cfg.rollout.batch_size * cfg.rollout.n:
        raise ConfigError(
            f"{src}: 'optim.mini_batches' ({cfg.optim.mini_batches}) exceeds the B*G responses per step"
        )
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"{src}: 'optim.betas' must have 2 values, got {cfg.optim.betas}")
    _validate_trackers(cfg, src)
    _validate_conflicts(cfg, src)


TRACKERS = {"console": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""`trainer.logger` choices and the package each one imports (installed by the extra of the same name)."""


def _validate_trackers(cfg: Config, src: str) -> None:
    import importlib.util

    for i, name in enumerate(cfg.trainer.logger):
        if name not in TRACKERS:
            valid = ", ".join(TRACKERS)
            raise ConfigError(f"{src}: 'trainer.logger[{i}]' is {name!r}; valid choices: {valid}")
        package = TRACKERS[name]
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"{src}: 'trainer.logger' {name} needs the {package!r} package, which is not installed: "
                f"pip install 'mmrlsd[{name}]'"
            )


def _validate_conflicts(cfg: Config, src: str) -> None:
    """Settings that are valid alone but contradict each other (one of them would be silently ignored)."""
    m = cfg.model
    if m.min_pixels and m.max_pixels and m.min_pixels > m.max_pixels:
        raise ConfigError(f"{src}: 'model.min_pixels' ({m.min_pixels}) > 'model.max_pixels' ({m.max_pixels})")
    if m.attn_implementation == "flash_attention_2" and cfg.trainer.device == "cpu":
        raise ConfigError(f"{src}: 'model.attn_implementation' flash_attention_2 needs 'trainer.device' cuda")
    a = cfg.algo
    if a.distill == "jsd" and a.token_adv not in ("opsd", "grpo_opsd"):
        raise ConfigError(
            f"{src}: 'algo.distill' jsd needs 'algo.token_adv' opsd or grpo_opsd, got {a.token_adv!r}"
        )
    fast = [
        k
        for k in ("model.packing", "model.share_vision", "model.share_prefix", "model.logprob_chunk")
        if get_key(cfg, k)
    ]
    if a.distill == "jsd" and fast:
        raise ConfigError(
            f"{src}: 'algo.distill' jsd runs on the plain update path; set {', '.join(fast)} to false/0"
        )
    r = cfg.rollout
    if r.vllm_max_model_len and r.vllm_max_model_len <= r.max_new_tokens:
        raise ConfigError(
            f"{src}: 'rollout.vllm_max_model_len' ({r.vllm_max_model_len}) must exceed 'rollout.max_new_tokens' "
            f"({r.max_new_tokens}): it holds the prompt and the response"
        )
    if cfg.trainer.val_every and not cfg.data.val_files:
        raise ConfigError(f"{src}: 'trainer.val_every' needs 'data.val_files' (it is empty)")


def get_key(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def parse_overrides(overrides: list[str]) -> dict:
    """`["a.b=3", "c.d=[x, y]"]` -> nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: {key!r} is not a dotted key like section.key")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"override {item!r}: '{'.'.join(parts[: i + 1])}' was already set to a value by another "
                    "override, so it has no keys"
                )
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(
                f"override {item!r}: '{key}' is a section already given keys by another override"
            )
        shown = item if len(item) <= 80 else item[:77] + "..."
        node[parts[-1]] = _safe_load(raw, f"override {shown!r}") if raw.strip() else ""
    return tree


PATH_KEYS = (
    "model.path",
    "data.train_files",
    "data.val_files",
    "data.student_template",
    "data.teacher_template",
)
"""Config values that name local files or folders (a model folder, data sources, prompt templates)."""
TEMPLATE_KEYS = ("data.student_template", "data.teacher_template")


def packaged_prompt(name: str) -> Path:
    """A prompt template shipped with the package (`mmrlsd/prompts/<name>`)."""
    from importlib.resources import files

    return Path(str(files("mmrlsd").joinpath("prompts", name)))


def _resolve_path(value: str, bases: list[Path], template: bool) -> str:
    """An absolute path for `value` when it names an existing file or folder: an absolute path as it is, a
    relative one tried against each of `bases` in order. A template given by file name alone (or under the old
    `configs/prompts/` folder) that is found nowhere else is the packaged one. Anything else is returned unchanged
    (a hub id, a `hub:` dataset, a missing path that training's pre-flight check reports)."""
    if not value or value.startswith("hub:"):
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    for base in bases:
        if (base / p).exists():
            return os.path.abspath(base / p)
    if template and (len(p.parts) == 1 or p.parent == Path("configs/prompts")):
        if packaged_prompt(p.name).is_file():
            return str(packaged_prompt(p.name))
    return value


def _resolve_keys(cfg, keys, bases: list[Path]) -> None:
    for key in keys:
        section, name = key.split(".")
        if not hasattr(getattr(cfg, section, None), name):
            continue
        value = get_key(cfg, key)
        values = [
            _resolve_path(v, bases, key in TEMPLATE_KEYS)
            for v in (value if isinstance(value, list) else [value])
        ]
        setattr(getattr(cfg, section), name, values if isinstance(value, list) else values[0])


def resolve_paths(cfg, file_data: dict | None, file_path: Path | None, override_data: dict | None) -> None:
    """Resolve the path keys (see `load_config`): those set in the file against its folder then the current
    directory, those set by overrides against the current directory, and default templates to the packaged ones."""

    def set_in(data: dict | None) -> list[str]:
        return [k for k in PATH_KEYS if data and k.split(".")[1] in (data.get(k.split(".")[0]) or {})]

    overridden = set_in(override_data)
    if file_path is not None:
        file_keys = [k for k in set_in(file_data) if k not in overridden]
        _resolve_keys(cfg, file_keys, [Path(file_path).resolve().parent, Path.cwd()])
    _resolve_keys(cfg, overridden, [Path.cwd()])
    _resolve_keys(cfg, TEMPLATE_KEYS, [])  # anything still a bare file name: the packaged template


def read_yaml_file(path: str | Path) -> dict:
    """A config file's top-level mapping; a missing file, a directory, non-UTF-8 bytes, invalid or too deeply
    nested YAML, a key given twice and a non-mapping top level are ConfigErrors naming the file."""
    src, p = str(path), Path(path)
    if p.is_dir():
        raise ConfigError(f"{src}: is a directory, not a config file")
    if not p.is_file():
        raise ConfigError(f"{src}: config file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{src}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ConfigError(f"{src}: cannot be read ({e.strerror})") from None
    data = _safe_load(text, src) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_dataclass(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """`cls()` with the YAML mapping at `path` (may be None) and the dotted overrides merged in, type-checked, paths
    resolved: the one loader of every dataclass config (training, SFT, perf, eval). An unknown key, a wrong type or
    an unreadable file raises `ConfigError` naming the file and the key; range checks are the caller's.

    Paths (`PATH_KEYS`, where `cls` has them): a relative path in the file is tried against the config file's folder
    first, then the current directory; one in an override against the current directory. Found paths become
    absolute (the run's `config.yaml` then works from anywhere); absolute paths, hub ids and `hub:` datasets are
    left as they are. Prompt templates given by file name alone are the packaged ones (`mmrlsd/prompts/`) unless
    such a file exists there. Whether the files exist is checked before training (`mmrlsd.train.preflight`)."""
    cfg = cls()
    src = str(path) if path else "<defaults>"
    data = read_yaml_file(path) if path is not None else None
    if data:
        _merge(cfg, data, "", src)
    tree = parse_overrides(overrides) if overrides else None
    if tree:
        _merge(cfg, tree, "", f"{src} (command-line override)")
    resolve_paths(cfg, data, Path(path) if path is not None else None, tree)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None, validate: bool = True) -> Config:
    """The training config at `path` (may be None) with dotted overrides (`load_dataclass`), validated."""
    cfg = load_dataclass(Config, path, overrides)
    if validate:
        _validate(cfg, str(path) if path else "<defaults>")
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")

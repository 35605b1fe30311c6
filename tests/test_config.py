import subprocess
import sys

import pytest

from mmrlsd.config import ConfigError, load_config, parse_overrides

BASE = ["model.path=/m", "data.train_files=[t.jsonl]"]


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_suggests_closest(tmp_path):
    p = _write(tmp_path, "model: {path: m}\ndata: {train_files: [x]}\nalgo:\n  eps_W: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'algo.eps_W'; did you mean 'algo.eps_w'\?"):
        load_config(p)
    with pytest.raises(
        ConfigError, match="unknown key 'trainer.total_step'; did you mean 'trainer.total_steps'"
    ):
        load_config(None, BASE + ["trainer.total_step=3"])
    with pytest.raises(ConfigError, match="unknown key 'algoo'"):
        load_config(None, BASE + ["algoo.lam0=0"])


def test_wrong_types_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'trainer.total_steps' must be int, got str 'ten'"):
        load_config(None, BASE + ["trainer.total_steps=ten"])
    with pytest.raises(ConfigError, match="'algo.norm_std' must be bool"):
        load_config(None, BASE + ["algo.norm_std=3"])
    with pytest.raises(ConfigError, match="'rollout' must be a mapping"):
        load_config(_write(tmp_path, "rollout: 3\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [\n"))


def test_values_and_overrides():
    cfg = load_config(
        None, BASE + ["trainer.total_steps=3", "algo.lam0=0", "optim.lr=1e-5", "trainer.save_every=1"]
    )
    assert cfg.trainer.total_steps == 3 and cfg.trainer.save_every == 1
    assert cfg.algo.lam0 == 0.0 and isinstance(cfg.algo.lam0, float)
    assert cfg.optim.lr == 1e-5  # YAML 1.1 reads 1e-5 as a string; the loader converts it
    assert parse_overrides(["a.b=[1, 2]", "c=x"]) == {"a": {"b": [1, 2]}, "c": "x"}


@pytest.mark.parametrize(
    "override,msg",
    [
        ("rollout.engine=tgi", "'rollout.engine' is 'tgi'; valid choices: hf, vllm"),
        ("rollout.n=0", "'rollout.n' must be > 0"),
        ("rollout.n=1", "'rollout.n' must be >= 2"),
        ("algo.eps_w=-0.1", "'algo.eps_w' must be >= 0"),
        ("algo.lam0=1.5", "'algo.lam0' must be in \\[0, 1\\]"),
        ("optim.micro_batch_size=0", "'optim.micro_batch_size' must be > 0"),
        ("model.dtype=fp32", "'model.dtype' is 'fp32'; valid choices"),
        (
            "rollout.vllm_gpu_memory_utilization=1.2",
            "'rollout.vllm_gpu_memory_utilization' must be in \\(0, 1\\]",
        ),
        (
            "rollout.vllm_gpu_memory_utilization=0",
            "'rollout.vllm_gpu_memory_utilization' must be in \\(0, 1\\]",
        ),
        ("rollout.vllm_tensor_parallel_size=0", "'rollout.vllm_tensor_parallel_size' must be > 0"),
        ("rollout.vllm_max_model_len=-1", "'rollout.vllm_max_model_len' must be >= 0"),
        (
            "rollout.vllm_max_model_len=200",
            "'rollout.vllm_max_model_len' \\(200\\) must exceed 'rollout.max_new_tokens'",
        ),
        ("rollout.vllm_sleep=always", "'rollout.vllm_sleep' is 'always'; valid choices: auto, on, off"),
        ("rollout.vllm_enforce_eager=3", "'rollout.vllm_enforce_eager' must be bool"),
    ],
)
def test_invalid_values(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, BASE + [override])


def test_missing_required():
    with pytest.raises(ConfigError, match="'model.path' is required"):
        load_config(None, ["data.train_files=[x]"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.yaml")


def test_shipped_configs_validate():
    from pathlib import Path

    import yaml

    from mmrlsd.recipes.sft import load_sft_config

    configs = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml"))  # configs/release/ too
    assert len([c for c in configs if c.parent.name == "release"]) >= 2, configs
    for c in configs:
        is_sft = "sft" in (yaml.safe_load(c.read_text()) or {})  # `mmrlsd sft` recipes have their own loader
        (load_sft_config if is_sft else load_config)(c)


def test_validate_cli_and_help():
    r = subprocess.run([sys.executable, "-m", "mmrlsd", "validate", "configs/tiny_cpu.yaml", "algo.lam0=0"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    # validate runs train's pre-model checks: a 7B recipe's data must exist on this machine
    r = subprocess.run([sys.executable, "-m", "mmrlsd", "validate", "configs/qwen2vl_7b.yaml"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "error: data.train_files: data/mmfinereason/" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "mmrlsd", "validate", "configs/qwen2vl_7b.yaml", "--no-data-check"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and "warning: data.train_files: data/mmfinereason/" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "mmrlsd", "validate", "configs/qwen2vl_7b.yaml", "algo.eps_W=0"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "did you mean 'algo.eps_w'" in r.stderr


def test_release_configs_hold_the_released_script_values():
    """configs/release/ carries the released launch script's values; its GRPO twin differs in algo.lam0 only."""
    from mmrlsd.config import to_dict

    rlsd = load_config("configs/release/rlsd_qwen3vl_8b.yaml")
    a, r, t = rlsd.algo, rlsd.rollout, rlsd.trainer
    assert (a.lam0, a.lam_decay_steps, a.lam_warmup_steps, a.teacher_refresh) == (0.5, 60, 0, 20)
    assert (a.eps_w, a.clip_low, a.clip_high, a.clip_c, rlsd.data.shuffle, t.val_every) == (
        0.2, 0.2, 0.28, 3.0, False, 5)  # fmt: skip
    assert (r.n, r.batch_size, r.temperature, r.top_p, r.max_new_tokens, r.val_n) == (
        8,
        256,
        1.0,
        1.0,
        4096,
        1,
    )
    assert (r.val_temperature, r.val_top_p, r.val_top_k, r.val_presence_penalty) == (0.7, 0.8, 20, 1.5)
    assert (rlsd.model.min_pixels, rlsd.model.max_pixels, rlsd.reward.name) == (262144, 1048576, "unified")
    assert (rlsd.optim.lr, rlsd.optim.weight_decay, rlsd.optim.grad_clip, rlsd.optim.mini_batches) == (
        1e-6, 0.01, 1.0, 1)  # fmt: skip
    grpo = to_dict(load_config("configs/release/grpo_qwen3vl_8b.yaml"))
    flat = lambda d: {f"{s}.{k}": v for s, sec in d.items() for k, v in sec.items()}  # noqa: E731
    diff = {k for k, v in flat(grpo).items() if flat(to_dict(rlsd))[k] != v}
    assert diff == {"algo.lam0"}


def test_validate_command_accepts_every_shipped_config(capsys):
    """`mmrlsd validate` (its run function, in-process) passes on every config under configs/, SFT recipes too; the
    paper recipes' data is not on this machine, so their data files are checked only where they ship (tiny)."""
    import argparse
    from pathlib import Path

    from mmrlsd.cli import validate

    configs = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml"))
    for c in configs:
        local = c.name.startswith(("tiny", "grpo_tiny", "opsd_tiny", "sdpo_tiny", "credit"))
        assert validate.run(argparse.Namespace(config=str(c), overrides=[], no_data_check=not local)) == 0, c
    out = capsys.readouterr().out
    assert out.count(": OK (") == len(configs) and "tiny_sft.yaml: OK" in out


def test_registry_backed_choices_come_from_the_registries(monkeypatch):
    """`algo.token_adv`, `algo.adv`, `reward.name` and `model.packed_attention` accept exactly what their registries
    hold: an unknown name fails listing them, and a newly registered one is accepted without touching the config."""
    from mmrlsd.algo.methods import METHODS, get_method
    from mmrlsd.train.preflight import check_registered, registered_choices

    for key, value in (("algo.token_adv", "ppo"), ("algo.adv", "rloo"), ("model.packed_attention", "sdpa")):
        names = registered_choices()[key]
        with pytest.raises(ConfigError, match=f"'{key}' is '{value}'; valid choices: {', '.join(names)}$"):
            check_registered(load_config(None, BASE + [f"{key}={value}"]))
    rewards = ", ".join(sorted(registered_choices()["reward.name"]))
    with pytest.raises(ConfigError, match=f"reward.name: unknown reward 'maths'; known: {rewards}$"):
        check_registered(load_config(None, BASE + ["reward.name=maths"]))
    assert registered_choices()["algo.token_adv"] == [
        "rlsd",
        "grpo",
        "opsd",
        "grpo_opsd",
        "opsd_release",
        "grpo_opsd_release",
    ]
    monkeypatch.setitem(METHODS, "ppo", get_method("grpo"))
    assert check_registered(load_config(None, BASE + ["algo.token_adv=ppo"])).algo.token_adv == "ppo"


def test_field_map_reads_every_data_key():
    from mmrlsd.data.sources import FieldMap

    keys = ["problem", "answer", "images", "problem_type", "solution", "id", "options"]
    cfg = load_config(None, BASE + [f"data.{k}_key=col_{k}" for k in keys])
    assert FieldMap.from_config(cfg.data) == FieldMap(**{k: f"col_{k}" for k in keys})
    assert FieldMap.from_config(load_config(None, BASE).data) == FieldMap()  # the same defaults

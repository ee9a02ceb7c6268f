"""The Hydra configuration: presets compose, match the released numbers, and bad values fail loudly."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import List, Optional

import hydra
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from magi_train.config import ConfigError, TrainConfig, config_dir, register_configs, to_train_config, validate

CONF_DIR = config_dir()  # conf/ of this clone, as the entry points find it


def compose(overrides: Optional[List[str]] = None, with_hydra: bool = False) -> DictConfig:
    register_configs()
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra.compose("config", overrides=overrides or [], return_hydra_config=with_hydra)


def load(overrides: Optional[List[str]] = None) -> TrainConfig:
    return to_train_config(compose(overrides))


# --- composition ------------------------------------------------------------------------------------


def test_default_composes_and_validates():
    cfg = load()
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.name == "tiny"
    assert cfg.experiment is None
    # data.latent_frames_per_chunk follows model.chunk_width through an interpolation.
    assert cfg.data.latent_frames_per_chunk == cfg.model.chunk_width == 6


def test_register_configs_is_idempotent():
    register_configs()
    register_configs()
    assert load().model.name == "tiny"


def test_import_has_no_side_effects():
    code = (
        "import magi_train.config\n"
        "from hydra.core.config_store import ConfigStore\n"
        "assert 'train_schema.yaml' not in ConfigStore.instance().list('/')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


RELEASED_4_5B = dict(
    num_layers=34, hidden_size=3072, ffn_hidden_size=12288, num_attention_heads=24, num_query_groups=8,
    kv_channels=128, layernorm_epsilon=1e-6, apply_layernorm_1p=True, x_rescale_factor=1.0,
    half_channel_vae=False, params_dtype="bfloat16", patch_size=2, t_patch_size=1, in_channels=16,
    out_channels=16, cond_hidden_ratio=0.25, caption_channels=4096, caption_max_length=800,
    xattn_cond_hidden_ratio=1.0, cond_gating_ratio=1.0, gated_linear_unit=False, distill=False,
    proj_interleave_groups=8, chunk_width=6,
)
RELEASED_24B = dict(
    RELEASED_4_5B, num_layers=48, hidden_size=6144, ffn_hidden_size=16384, num_attention_heads=48,
    x_rescale_factor=0.1, half_channel_vae=True, in_channels=32, out_channels=32, gated_linear_unit=True,
)


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("magi1_4.5b", RELEASED_4_5B),
        ("magi1_24b", RELEASED_24B),
        ("magi1_4.5b_distill", dict(RELEASED_4_5B, distill=True)),
        ("magi1_24b_distill", dict(RELEASED_24B, distill=True)),
    ],
)
def test_released_presets(preset, expected):
    # Training a distilled preset means distilling it (the base trainer feeds no step-size input).
    distill = ["distill.enabled=true", "distill.teacher=/ckpt/base", "diffusion.caption_dropout=0"]
    cfg = load([f"model={preset}"] + (distill if expected.get("distill") else []))
    assert cfg.model.name == preset
    actual = {name: getattr(cfg.model, name) for name in expected}
    assert actual == expected


def test_a_distilled_preset_trains_only_by_distillation():
    with pytest.raises(ConfigError, match="set distill.enabled=true"):
        load(["model=magi1_4.5b_distill"])


def test_experiment_distill_tiny():
    cfg = load(["experiment=distill_tiny", "distill.teacher=runs/tiny/checkpoints"])
    assert cfg.model.distill and cfg.distill.enabled and cfg.diffusion.caption_dropout == 0
    assert cfg.distill.step_cycle == [1, 1, 2, 4, 8, 16]  # balanced for a CPU-sized run (the preset says why)


def test_tiny_preset_is_small():
    m = load(["model=tiny"]).model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.kv_channels) == (2, 256, 4, 64)
    assert (m.num_query_groups, m.ffn_hidden_size, m.gated_linear_unit) == (2, 512, False)
    assert (m.caption_channels, m.caption_max_length, m.proj_interleave_groups) == (64, 64, 8)
    assert (m.params_dtype, m.chunk_width) == ("float32", 6)


def test_experiment_tiny():
    cfg = load(["experiment=tiny"])
    assert cfg.experiment == "tiny"
    assert cfg.model.name == "tiny"
    d = cfg.data
    assert (d.chunks_per_sample, d.latent_frames_per_chunk, d.latent_height, d.latent_width) == (2, 6, 8, 8)
    assert (d.num_blobs, d.micro_batch_size) == (1, 4)
    assert 1e-3 <= cfg.optimizer.lr <= 2e-3
    assert cfg.optimizer.decay == "cosine"
    t = cfg.trainer
    assert (t.log_every, t.save_every, t.keep_last, t.output_dir) == (20, 100, 2, "runs/tiny")
    assert t.wandb.mode == "offline"


def test_command_line_overrides():
    assert load(["optimizer.lr=3e-4"]).optimizer.lr == pytest.approx(3e-4)
    # The command line wins over the experiment file.
    assert load(["experiment=tiny", "trainer.max_steps=5"]).trainer.max_steps == 5


def test_hydra_run_dir_follows_output_dir():
    cfg = compose(["trainer.output_dir=runs/x"], with_hydra=True)
    assert cfg.hydra.run.dir.startswith("runs/x/hydra/")
    assert cfg.hydra.job.chdir is False


def test_hydra_multirun_jobs_get_a_directory_each():
    # Hydra's sweep directory is the output dir, each job's logs in <job number>/hydra/ next to its run
    # (magi_train/train.py trains job N in trainer.output_dir/N).
    cfg = compose(["trainer.output_dir=runs/x"], with_hydra=True)
    assert cfg.hydra.sweep.dir == "runs/x"
    assert OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"].startswith("${hydra.job.num}/hydra/")


def test_run_directory_fields_compose_with_safe_defaults():
    t = load().trainer
    assert (t.overwrite, t.allow_config_change, t.exit_with_launcher) == (False, [], True)
    assert load(["trainer.allow_config_change=[data.shards,trainer.seed,data]"]).trainer.allow_config_change == [
        "data.shards", "trainer.seed", "data"]  # dotted keys and section prefixes


def test_plain_dict_round_trip():
    # A config saved as YAML (e.g. next to a checkpoint) types and validates the same way.
    cfg = load(["experiment=tiny"])
    saved = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    assert to_train_config(OmegaConf.create(saved)) == cfg


# --- unknown keys and wrong types ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.hiden_size=3", "model.hiden_size"),
        ("+model.foo=1", "model.foo"),
        ("+trainer.wandb.bar=1", "trainer.wandb.bar"),
    ],
)
def test_unknown_key_fails_naming_it(override, key):
    # A plain override fails at composition; `+key=...` composes but to_train_config rejects it.
    with pytest.raises((ConfigCompositionException, ConfigError)) as info:
        load([override])
    assert key in str(info.value)


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as info:
        compose(["model.num_layers=abc"])
    assert "model.num_layers" in str(info.value)
    with pytest.raises(ConfigError, match="model.num_layers"):
        to_train_config({"model": {"num_layers": "abc"}})


# --- cross-field rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        # model
        (["model.hidden_size=512"], "model.hidden_size (512) must equal model.num_attention_heads x "
                                    "model.kv_channels (4 x 64 = 256)"),
        (["model.kv_channels=120", "model.hidden_size=240"], "model.kv_channels (120)"),
        (["model.num_query_groups=3"], "model.num_query_groups (3)"),
        (["model.proj_interleave_groups=3"], "model.proj_interleave_groups (3)"),
        (["model.cond_gating_ratio=0.5"], "model.cond_gating_ratio (0.5)"),
        (["model.cond_hidden_ratio=0.001"], "model.cond_hidden_ratio"),
        (["model.null_caption_length=65"], "model.null_caption_length (65)"),
        (["model.attention_backend=flash3"], "model.attention_backend ('flash3')"),
        (["model.patch_size=0"], "model.patch_size (0)"),
        (["model.t_patch_size=0"], "model.t_patch_size (0)"),
        (["model.num_layers=0"], "model.num_layers (0)"),
        (["model.layernorm_epsilon=0"], "model.layernorm_epsilon (0.0)"),
        (["model.half_channel_vae=true"], "data.latent_channels (16) must equal model.in_channels // 2"),
        (["model.half_channel_vae=true", "model.in_channels=33", "model.out_channels=33"],
         "model.in_channels (33) must be even"),
        (["model.in_channels=32"], "data.latent_channels (16) must equal model.in_channels (32)"),
        (["model.out_channels=32"], "model.out_channels (32)"),
        # data
        (["data.latent_frames_per_chunk=4"], "data.latent_frames_per_chunk (4) must equal model.chunk_width"),
        (["data.latent_height=7"], "data.latent_height (7)"),
        (["data.latent_width=2"], "data.latent_width // model.patch_size (2 // 2 = 1)"),
        (["data.caption_length=65"], "data.caption_length (65)"),
        (["data.chunks_per_sample=1"], "data.chunks_per_sample (1)"),
        (["data.micro_batch_size=0"], "data.micro_batch_size (0)"),
        (["data.kind=webdataset"], "data.shards ('') must name the training shards"),
        # diffusion
        (["diffusion.t_shift=0"], "diffusion.t_shift (0.0)"),
        (["diffusion.t_logit_std=-1"], "diffusion.t_logit_std (-1.0)"),
        (["diffusion.clean_prefix_prob=1.5"], "diffusion.clean_prefix_prob (1.5)"),
        (["diffusion.i2v_prob=-0.1"], "diffusion.i2v_prob (-0.1)"),
        (["diffusion.i2v_prob=0.8", "diffusion.clean_prefix_prob=0.3"], "diffusion.i2v_prob (0.8) + diffusion.clean_prefix_prob (0.3) must be <= 1"),
        (["diffusion.caption_dropout=1.0"], "diffusion.caption_dropout (1.0)"),
        (["diffusion.clean_t_min=0"], "diffusion.clean_t_min (0.0)"),
        (["diffusion.clean_t_min=1.1"], "diffusion.clean_t_min (1.1)"),
        (["diffusion.motion_weight=-1"], "diffusion.motion_weight (-1.0) must be >= 0"),
        (["diffusion.motion_scale=0"], "diffusion.motion_scale (0.0) must be > 0"),
        # optimizer
        (["optimizer.lr=0"], "optimizer.lr (0.0)"),
        (["optimizer.min_lr=1"], "optimizer.min_lr (1.0)"),
        (["optimizer.min_lr=-1"], "optimizer.min_lr (-1.0)"),
        (["optimizer.beta1=1.0"], "optimizer.beta1 (1.0)"),
        (["optimizer.beta2=-0.1"], "optimizer.beta2 (-0.1)"),
        (["optimizer.warmup_steps=-1"], "optimizer.warmup_steps (-1)"),
        (["optimizer.decay_steps=500"], "optimizer.decay_steps (500) must be > optimizer.warmup_steps (1000)"),
        (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay (-0.1)"),
        (["optimizer.clip_grad=-1"], "optimizer.clip_grad (-1.0)"),
        # trainer
        (["trainer.max_steps=0"], "trainer.max_steps (0)"),
        (["trainer.resume=''"], "trainer.resume"),
        (["trainer.keep_last=-1"], "trainer.keep_last (-1)"),
        (["trainer.save_every=-1"], "trainer.save_every (-1)"),
        (["trainer.log_every=0"], "trainer.log_every (0)"),
        (["trainer.overwrite=true", "trainer.resume=auto"],
         "trainer.overwrite=true replaces the run in trainer.output_dir and goes with trainer.resume=none (got 'auto')"),
        (["trainer.allow_config_change=[dta.shards]"], "trainer.allow_config_change: 'dta.shards' names no config field"),
        # parallel
        (["parallel.tp=0"], "parallel.tp (0)"),
        (["parallel.dp=0"], "parallel.dp (0)"),
        (["parallel.dp=-2"], "parallel.dp (-2)"),
        (["parallel.tp=3"], "model.num_attention_heads (4) must be divisible by parallel.tp (3)"),
        (["model=magi1_4.5b", "parallel.tp=3"], "model.num_query_groups (8) and parallel.tp (3): one must divide the other"),
        (["model=magi1_24b", "parallel.tp=16"], "model.proj_interleave_groups (8) must be divisible by parallel.tp (16)"),
        (["parallel.tp=2", "parallel.cp=4"], "model.num_attention_heads / parallel.tp (2) must be divisible by parallel.cp (4)"),
        (["parallel.pp=3"], "model.num_layers (2) must be divisible by parallel.pp x parallel.vpp (3 x 1)"),
        (["parallel.vpp=2"], "parallel.vpp (2) > 1 goes with parallel.pp_schedule=interleaved_1f1b"),
        (["parallel.tp=2", "parallel.cp=2", "parallel.sequence_parallel=true", "data.latent_height=6",
          "data.latent_width=6", "data.chunks_per_sample=1", "diffusion.clean_prefix_prob=0"],
         "tokens per sample (54 = data.chunks_per_sample x frames x height x width in patches) must be divisible by "
         "parallel.cp x parallel.tp (sequence_parallel) (4)"),
        (["data.global_batch_size=3"], "data.global_batch_size (3) must be a multiple of data.micro_batch_size (2)"),
        (["trainer.fp8_recipe=delayed"], "trainer.fp8_recipe ('delayed') needs model.layer_spec=te"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    ],
)
def test_validate_rule_names_the_field(overrides, message):
    with pytest.raises(ConfigError) as info:
        load(overrides)
    assert message in str(info.value)


# Closed sets: the schema types these fields with the enums of magi_train/config/choices.py. The allowed values
# are written out here, as the released code and our presets use them.
CLOSED_SETS = [
    ("model.params_dtype", "float64", ["float32", "bfloat16", "float16"]),
    ("model.layer_spec", "cuda", ["local", "te"]),
    ("data.kind", "parquet", ["synthetic", "webdataset"]),
    ("optimizer.decay", "step", ["constant", "cosine", "linear"]),
    ("optimizer.name", "sgd", ["adamw"]),
    ("trainer.precision", "fp16", ["fp32", "bf16"]),
    ("trainer.wandb.mode", "cloud", ["auto", "offline", "online", "disabled"]),
    ("trainer.recompute", "some", ["none", "full", "selective"]),
    ("trainer.sample_vae", "vae", ["vit", "preview"]),
    ("parallel.pp_schedule", "zb", ["1f1b", "interleaved_1f1b", "gpipe"]),
    ("parallel.backend", "mpi", ["auto", "gloo", "nccl"]),
    ("parallel.cp_impl", "ring", ["auto", "ulysses", "magi"]),
    ("distill.shortcut_model", "teacher", ["ema", "student"]),
]


def _nested(key: str, value: object) -> dict:
    head, _, rest = key.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _with(cfg: TrainConfig, key: str, value: object) -> TrainConfig:
    *path, name = key.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, name, value)
    return cfg


@pytest.mark.parametrize("key, value, allowed", CLOSED_SETS)
def test_value_outside_a_closed_set_names_the_key_the_value_and_the_choices(key, value, allowed):
    def assert_names_all(message: str) -> None:
        assert key in message and repr(value) in message, message
        assert all(choice in message for choice in allowed), message

    # On the command line, Hydra refuses it while composing ...
    with pytest.raises(ConfigCompositionException) as info:
        compose([f"{key}={value}"])
    assert_names_all(f"{info.value} {info.value.__cause__}")
    # ... in a plain config (a saved config.yaml), to_train_config does ...
    with pytest.raises(ConfigError) as info:
        to_train_config(_nested(key, value))
    assert_names_all(str(info.value))
    # ... and in a dataclass built in Python, validate() does, with the rule's own message.
    with pytest.raises(ConfigError) as info:
        validate(_with(TrainConfig(), key, value))
    assert f"{key} ({value!r}) must be one of {', '.join(repr(a) for a in allowed)}" in str(info.value)


@pytest.mark.parametrize("key, value, allowed", CLOSED_SETS)
def test_closed_set_values_are_plain_strings_everywhere(key, value, allowed):
    """Every allowed value composes from the command line and reads back as that string: equal to it,
    printed as it, and written as it to the JSON and YAML that checkpoints and runs keep."""
    import json

    from magi_train.config import config_to_dict

    for choice in allowed:
        overrides = [f"{key}={choice}"]
        # Some choices need a partner setting to be a valid run (they are then not what this test is about).
        overrides += {"interleaved_1f1b": ["parallel.vpp=2"], "webdataset": ["data.shards=/d", "data.seq_length=64", "data.caption_length=50",
                                                                            "data.micro_batch_size=1"]}.get(choice, [])
        if key == "distill.shortcut_model":
            overrides += ["experiment=distill_tiny", "distill.teacher=/ckpt"]
        if key == "model.layer_spec" and choice == "te":
            continue  # needs a GPU to build, but composes: checked by the enum test below
        cfg = load(overrides)
        got = _get(cfg, key)
        assert got == choice and str(got) == choice and f"{got}" == choice
        assert _get_dict(json.loads(json.dumps(config_to_dict(cfg))), key) == choice
        assert type(_get_dict(config_to_dict(cfg), key)) is str
        assert OmegaConf.to_yaml(OmegaConf.structured(cfg)).count(f": {choice}\n") >= 1
        # JSON written from plain asdict (trainer.json) reads back as the same typed config.
        assert to_train_config(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _get_dict(d, key):
    for part in key.split("."):
        d = d[part]
    return d


def test_layer_spec_te_composes():
    assert load(["model.layer_spec=te"]).model.layer_spec == "te"


def test_registry_fields_are_checked_against_the_registry():
    # Attention backends and fp8 recipes are registries in model code: validate reads them from there.
    from magi_train.model.attention import ATTENTION_BACKENDS
    from magi_train.model.te_spec import FP8_RECIPES

    for name in [*ATTENTION_BACKENDS, "flex", "flash", "magi", "auto"]:
        assert load([f"model.attention_backend={name}"]).model.attention_backend == name
    with pytest.raises(ConfigError, match=r"model.attention_backend \('flash3'\) must be one of 'torch', 'sdpa', 'flex', "
                                          r"'flash', 'magi', 'auto'"):
        load(["model.attention_backend=flash3"])
    with pytest.raises(ConfigError, match="trainer.fp8_recipe \\('e5m2'\\) must be one of " + ", ".join(
            repr(r) for r in FP8_RECIPES)):
        load(["trainer.fp8_recipe=e5m2"])


def test_validate_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        load(["optimizer.lr=0", "trainer.max_steps=0"])
    assert "optimizer.lr" in str(info.value) and "trainer.max_steps" in str(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.resume=auto"],
        ["trainer.resume=/some/checkpoint/dir"],
        ["parallel.dp=4"],
        ["parallel.tp=2", "parallel.cp=2", "parallel.sequence_parallel=true"],
        # MagiAttention's dispatch keeps whole heads and pads the token split.
        ["parallel.tp=2", "parallel.cp=4", "parallel.cp_impl=magi"],
        ["parallel.cp=4", "parallel.cp_impl=magi", "data.latent_height=6", "data.latent_width=6",
         "data.chunks_per_sample=1", "diffusion.clean_prefix_prob=0"],
        ["parallel.pp=2", "parallel.vpp=1", "data.global_batch_size=8"],
        ["model=magi1_24b", "parallel.tp=8", "parallel.cp=6", "parallel.pp=4", "trainer.recompute=full"],
        ["trainer.max_steps=3"],  # a smoke test shorter than the 1000-step warm-up is allowed
        ["optimizer.decay=linear", "optimizer.decay_steps=2000"],
        ["model=magi1_24b", "trainer.precision=bf16"],
        ["diffusion.clean_prefix_prob=0", "data.chunks_per_sample=1"],
    ],
)
def test_valid_variants_pass(overrides):
    load(overrides)


def test_world_size_must_fit_the_layout():
    from magi_train.config.schema import ParallelConfig
    from magi_train.parallel.groups import check_world

    assert check_world(ParallelConfig(tp=2, cp=2), 8) == 2
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by parallel.tp x parallel.cp x parallel.pp = 2 x 2 x 1 = 4"):
        check_world(ParallelConfig(tp=2, cp=2), 6)
    with pytest.raises(ValueError, match=r"parallel.dp=3 but the world of 8 ranks with tp x cp x pp = 2 leaves 4"):
        check_world(ParallelConfig(tp=2, dp=3), 8)

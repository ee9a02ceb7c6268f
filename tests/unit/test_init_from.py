"""trainer.init_from: a new run starts from released weights, a run directory or one checkpoint of ours, with
nothing else of them (step 0, a fresh optimizer); fp8 weights dequantised; a wrong preset names the fields."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from magi_train.checkpoint.distributed import read_full_model_state, read_trainer_state
from magi_train.checkpoint.magi1 import save_magi1_checkpoint
from magi_train.config import validate
from magi_train.parallel.groups import init_parallel
from magi_train.training.trainer import Trainer
from tests.configs import tiny_model, tiny_train_config

TINY_BASE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_base"
TINY_FILE = TINY_BASE / "inference_weight" / "model.safetensors"


def _config(out, model=None, **trainer):
    """tiny_train_config with the tiny_base fixture's data shape (its 64-wide captions)."""
    cfg = tiny_train_config(out, **trainer)
    if model is not None:
        cfg = replace(cfg, model=model)
    return validate(cfg)


def _trainer(cfg) -> Trainer:
    return Trainer(cfg, init_parallel(cfg.parallel))


def _assert_equal_state(model, expected):
    got = model.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == torch.float32, key
        assert torch.equal(got[key], value.to(got[key].dtype)), key


def test_released_dir_weights_bit_for_bit_step_0_fresh_optimizer(tmp_path, capsys):
    released = load_file(str(TINY_FILE))
    with _trainer(_config(tmp_path / "run", max_steps=2, init_from=str(TINY_BASE))) as trainer:
        _assert_equal_state(trainer.model, released)
        assert trainer.step == 0 and trainer.resumed_from is None
        assert trainer.optimizer.owned_state() == {} or all(
            float(s["step"].sum()) == 0 for s in trainer.optimizer.owned_state().values())
        assert "initialised from released base weights" in capsys.readouterr().out
        # A random init differs from the released weights (the test would pass vacuously otherwise).
        with _trainer(_config(tmp_path / "scratch", max_steps=2)) as scratch:
            assert not torch.equal(scratch.model.state_dict()["x_embedder.weight"], released["x_embedder.weight"])
        trainer.fit()
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    record = read_trainer_state(ckpt)["init_from"]
    assert record["kind"] == "released" and record["variant"] == "base"
    assert record["sha256"] == hashlib.sha256(TINY_FILE.read_bytes()).hexdigest()
    assert record["path"] == str(TINY_BASE)


def test_run_dir_and_checkpoint_and_resume_keeps_its_own(tmp_path, capsys):
    with _trainer(_config(tmp_path / "a", max_steps=2)) as first:
        first.fit()
    ckpt = sorted((tmp_path / "a" / "checkpoints").glob("step_*"))[-1]
    weights = read_full_model_state(ckpt)
    for spec in (tmp_path / "a", ckpt):  # the run directory (its newest checkpoint) and the checkpoint itself
        out = tmp_path / f"b_{spec.name}"
        with _trainer(_config(out, max_steps=4, save_every=2, init_from=str(spec))) as trainer:
            _assert_equal_state(trainer.model, weights)
            assert trainer.step == 0
            trainer.fit(until=2)
    marker = hashlib.sha256((ckpt / "complete.json").read_bytes()).hexdigest()
    out = tmp_path / f"b_{ckpt.name}"
    assert read_trainer_state(out / "checkpoints" / "step_00000002")["init_from"]["sha256"] == marker
    capsys.readouterr()
    # A resume of that run takes its own checkpoint; init_from (now another source) is not applied, and said so.
    cfg = _config(out, max_steps=4, save_every=2, resume="auto", init_from=str(TINY_BASE))
    with _trainer(cfg) as resumed:
        assert resumed.step == 2
        _assert_equal_state(resumed.model, read_full_model_state(out / "checkpoints" / "step_00000002"))
        text = capsys.readouterr().out
        assert "trainer.init_from=" in text and "is not applied" in text
        assert "is not the weights the run started from" in text
        assert resumed.init_from["sha256"] == marker  # the record goes on with the run
        resumed.fit()
    last = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert read_trainer_state(last)["init_from"]["sha256"] == marker


def test_wrong_preset_names_the_fields(tmp_path):
    with pytest.raises(ValueError, match=r"model\.num_layers: weights 2, model=tiny 3"):
        _trainer(_config(tmp_path / "r", model=tiny_model(num_layers=3), init_from=str(TINY_BASE)))
    with pytest.raises(ValueError, match=r"model\.ffn_hidden_size: weights 512, model=tiny 384"):
        _trainer(_config(tmp_path / "r2", model=tiny_model(ffn_hidden_size=384), init_from=str(TINY_BASE)))
    # A base preset never starts from distilled weights; the directory's variants are named.
    distilled = tmp_path / "distilled"
    save_magi1_checkpoint(load_file(str(TINY_FILE)), distilled / "inference_weight.distill")
    with pytest.raises(ValueError, match=r"inference_weight\.distill.*model\.distill=False"):
        _trainer(_config(tmp_path / "r3", init_from=str(distilled)))
    with pytest.raises(FileNotFoundError, match="trainer.init_from=.*does not exist"):
        _trainer(_config(tmp_path / "r4", init_from=str(tmp_path / "nowhere")))
    # A checkpoint of another width: its saved config names the field.
    with _trainer(_config(tmp_path / "narrow", model=tiny_model(ffn_hidden_size=384), max_steps=1)) as narrow:
        narrow.fit()
    with pytest.raises(ValueError, match=r"model\.ffn_hidden_size: checkpoint 384, model=tiny 512"):
        _trainer(_config(tmp_path / "r5", init_from=str(tmp_path / "narrow")))


def _fp8_release(tmp_path):
    """A 3-layer tiny model quantised to the released fp8 layout (layer 1 in fp8), as a base model's fp8
    variant (inference_weight.fp8/: the trainer trains a distilled preset only under experiment=distill) and
    as the released distilled one."""
    from magi_train.model.fp8 import quantize_dit_state_dict

    model = tiny_model(num_layers=3, params_dtype="bfloat16")
    with _trainer(_config(tmp_path / "src", model=model, max_steps=1)) as src:
        state = {k: v.detach().clone() for k, v in src.model.state_dict().items()}
    fp8 = quantize_dit_state_dict(state, 3)
    save_magi1_checkpoint(fp8, tmp_path / "release" / "inference_weight.fp8")
    save_magi1_checkpoint(fp8, tmp_path / "release_distill" / "inference_weight.fp8.distill")
    return model, state, fp8


def test_fp8_release_is_dequantised_to_the_map_its_kernels_apply(tmp_path, capsys):
    from magi_train.checkpoint.weights import dequantize_fp8_state_dict
    from magi_train.model.fp8 import Fp8PerChannelLinear, Fp8PerTensorLinear

    model_cfg, original, fp8 = _fp8_release(tmp_path)
    deq, count = dequantize_fp8_state_dict(fp8)
    assert count == 7 and all(t.dtype != torch.float8_e4m3fn for t in deq.values())
    assert set(deq) == set(original)
    # A distilled preset finds the released fp8.distill weights when the directory has no bf16 ones.
    from magi_train.training.init_from import resolve_init_source

    found = resolve_init_source(str(tmp_path / "release_distill"), replace(model_cfg, distill=True))
    assert found.variant == "fp8.distill" and found.resolved.endswith("inference_weight.fp8.distill")
    cfg = _config(tmp_path / "run", model=replace(model_cfg, params_dtype="float32"),
                  init_from=str(tmp_path / "release"))
    with _trainer(cfg) as trainer:
        assert "7 fp8 linears" in capsys.readouterr().out
        got = trainer.model.state_dict()
        for key, value in deq.items():
            assert torch.equal(got[key], value.to(got[key].dtype)), key
    # Each dequantised weight is the linear map of the released fp8 forward: on activations that fp8 holds
    # exactly (x / divisor representable), the fp8 module's bf16 output equals x @ W^T rounded to bf16.
    g = torch.Generator().manual_seed(0)
    for name, cls in (("self_attention.linear_qkv.q", Fp8PerTensorLinear), ("mlp.linear_fc2", Fp8PerChannelLinear)):
        prefix = f"videodit_blocks.layers.1.{name}"
        params = {k[len(prefix) + 1:]: v for k, v in fp8.items() if k.startswith(prefix + ".")}
        out_f, in_f = params["weight"].shape[1:]
        linear = cls(in_f, out_f)
        linear.load_state_dict(params)
        a = (torch.randn(5, in_f, generator=g) * 4).to(torch.float8_e4m3fn)
        divisor = linear.activation_divisor().float().reshape(1, -1)
        x = a.float() * divisor
        assert torch.equal((x / divisor).to(torch.bfloat16).to(torch.float8_e4m3fn).float(), a.float())
        y_fp8 = linear(x).double()
        y_deq = x.double() @ deq[f"{prefix}.weight"].double().t()
        err = ((y_fp8 - y_deq).abs() / y_deq.abs().clamp_min(1e-3 * float(y_deq.abs().max()))).max()
        assert float(err) < 2 ** -7, (name, float(err))  # bf16 output rounding (and fp32 sums) only
        # and close to the weights before quantisation (fp8 keeps ~2 significant digits)
        w = original[f"{prefix}.weight"].double()
        assert float((deq[f"{prefix}.weight"].double() - w).abs().max() / w.abs().max()) < 0.1


def test_a_record_whose_weights_changed_is_refused(tmp_path):
    """A run that loads its init_from weights again (a LoRA base rebuilt on resume) checks they are the same."""
    import shutil

    from magi_train.parallel.plan import plan_of
    from magi_train.training.init_from import resolve_init_source
    from magi_train.training.startup import load_init_weights

    copy = tmp_path / "copy"
    shutil.copytree(TINY_BASE, copy)
    cfg = _config(tmp_path / "run", max_steps=1)
    record = resolve_init_source(str(copy), cfg.model).record()
    with _trainer(cfg) as trainer:
        models, shapes = trainer.models, plan_of(trainer.models[0]).full_shapes
        load_init_weights(cfg, trainer.parallel, record, models, shapes)  # unchanged: loads
        state = load_file(str(TINY_FILE))
        state["x_embedder.weight"] = state["x_embedder.weight"] + 1
        save_magi1_checkpoint(state, copy / "inference_weight")
        with pytest.raises(ValueError, match="the weights changed since the run recorded them"):
            load_init_weights(cfg, trainer.parallel, record, models, shapes)


def test_init_from_inside_the_output_dir_is_refused_before_anything_is_deleted(tmp_path):
    with _trainer(_config(tmp_path / "run", max_steps=1)) as first:
        first.fit()
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"trainer.init_from=.* lies inside trainer.output_dir"):
            _trainer(_config(tmp_path / "run", max_steps=1, init_from=str(ckpt), overwrite=overwrite))
        assert (ckpt / "complete.json").is_file()


def test_distillation_student_from_init_from_teacher_unchanged(tmp_path):
    """experiment=distill with trainer.init_from: the student starts from those weights (here the tiny_base
    release, a base model starting the distilled preset), the teacher stays distill.teacher."""
    from magi_train.config.schema import DiffusionConfig, DistillConfig

    with _trainer(_config(tmp_path / "teacher", max_steps=1)) as first:
        first.fit()
    teacher = tmp_path / "teacher" / "checkpoints"
    cfg = _config(tmp_path / "distill", max_steps=1, init_from=str(TINY_BASE))
    cfg = validate(replace(cfg, model=replace(cfg.model, distill=True),
                           distill=DistillConfig(enabled=True, teacher=str(teacher), ema_decay=0.9),
                           diffusion=DiffusionConfig(caption_dropout=0.0)))
    with _trainer(cfg) as trainer:
        _assert_equal_state(trainer.model, load_file(str(TINY_FILE)))
        taught = read_full_model_state(sorted(teacher.glob("step_*"))[-1])
        for name, p in trainer.objective.teacher.state_dict().items():
            assert torch.equal(p, taught[name]), name
        # ... and the EMA starts from the student's (init_from) weights.
        shadow = trainer.callbacks[0].weights[0].state_dict()
        assert all(torch.equal(shadow[n], p.float()) for n, p in trainer.model.named_parameters())


def test_init_from_ema_takes_a_checkpoints_ema_weights(tmp_path):
    with _trainer(_config(tmp_path / "a", max_steps=2, ema_decay=0.5)) as first:
        first.fit()
        shadow = {n: t.clone() for n, t in first.callbacks[0].weights[0].state_dict().items()}
        trained = _params_of(first.model)
    assert any(not torch.equal(shadow[n], trained[n]) for n in shadow)
    with _trainer(_config(tmp_path / "b", max_steps=1, init_from=str(tmp_path / "a"), init_from_ema=True)) as t:
        got = _params_of(t.model)
        assert all(torch.equal(got[n], shadow[n]) for n in shadow)
        assert t.init_from["ema"] is True
    with pytest.raises(ValueError, match="holds no EMA weights"):
        with _trainer(_config(tmp_path / "c", max_steps=1)) as plain:
            plain.fit()
        _trainer(_config(tmp_path / "d", init_from=str(tmp_path / "c"), init_from_ema=True))
    with pytest.raises(ValueError, match="needs a checkpoint of ours"):
        _trainer(_config(tmp_path / "e", init_from=str(TINY_BASE), init_from_ema=True))
    with pytest.raises(ValueError, match="init_from_ema=true without trainer.init_from"):
        _trainer(_config(tmp_path / "f", init_from_ema=True))


def _params_of(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}

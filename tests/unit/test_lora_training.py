"""LoRA training on one process (tiny preset): the base frozen (no gradient, no optimizer state, unchanged),
checkpoints of the adapters alone plus adapter files, an exact resume, and a loss that falls
(the layouts: tests/distributed/test_lora_parallel.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from magi_train.checkpoint.distributed import read_full_weights
from magi_train.config import validate
from magi_train.config.schema import LoraConfig, TrainConfig
from magi_train.model.lora import is_lora_parameter, lora_state_dict
from magi_train.parallel.groups import init_parallel
from magi_train.training.trainer import Trainer
from tests.configs import tiny_train_config


@pytest.fixture(scope="module")
def parallel():
    return init_parallel(TrainConfig().parallel)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, parallel):
    """A tiny base model trained for a few steps (its output layer has left zero, so adapters get gradients)."""
    out = tmp_path_factory.mktemp("base")
    Trainer(tiny_train_config(out, max_steps=40), parallel).fit()
    return out


def lora_cfg(out, base, **trainer):
    cfg = tiny_train_config(out, init_from=str(base), **trainer)
    return validate(replace(cfg, lora=LoraConfig(rank=4, alpha=8.0),
                            optimizer=replace(cfg.optimizer, weight_decay=0.0)))


def test_the_base_is_frozen_unchanged_and_outside_the_optimizer(tmp_path, base_run, parallel):
    base = read_full_weights(sorted((base_run / "checkpoints").iterdir())[-1])
    with Trainer(lora_cfg(tmp_path, base_run, max_steps=3), parallel) as t:
        lora = {n for n, _ in t.named_parameters() if is_lora_parameter(n)}
        assert len(lora) == 2 * 7 * t.cfg.model.num_layers  # A and B of the 7 default targets per layer
        assert set(t.optimizer.params) == lora
        first = t.train_step()
        assert first["grad_norm"] > 0
        for name, p in t.named_parameters():
            if name in lora:
                assert p.requires_grad
            else:
                assert not p.requires_grad and p.grad is None, name
        # Optimizer state exists for adapters only.
        assert set(t.optimizer.owned_state()) == lora
        t.train_step()
        # The base is bit-for-bit the weights it started from; B has left zero.
        state = t.model.state_dict()
        for key, value in base.items():
            wrapped = key.rsplit(".", 1)
            key_now = key if key in state else f"{wrapped[0]}.base_layer.{wrapped[1]}"
            assert torch.equal(state[key_now], value), key
        b = t.model.videodit_blocks.layers[0].mlp.linear_fc1.lora_B["default"].weight
        assert float(b.detach().abs().max()) > 0


def test_a_fresh_adapter_changes_nothing(tmp_path, base_run, parallel):
    """Step 0 of a LoRA run (B = 0) evaluates exactly like the base model it starts from."""
    plain = tiny_train_config(tmp_path / "plain", init_from=str(base_run), eval_batches=1)
    with Trainer(plain, parallel) as t:
        want = t.evaluate()
    cfg = lora_cfg(tmp_path / "lora", base_run, eval_batches=1)
    with Trainer(cfg, parallel) as t:
        assert t.evaluate() == want


def test_checkpoints_hold_the_adapters_alone_and_the_adapter_files_match(tmp_path, base_run, parallel):
    from magi_train.checkpoint.adapters import read_adapter

    cfg = lora_cfg(tmp_path, base_run, max_steps=4, save_every=2)
    t = Trainer(cfg, parallel)
    t.fit()
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    index = json.loads((ckpt / "index.json").read_text())
    keys = list(index.get("tensors", index))
    assert keys and all(is_lora_parameter(k.split(".", 1)[1].rsplit(".", 1)[0] if k.startswith("optim.") else
                                          k.split(".", 1)[1]) for k in keys), keys[:5]
    assert any(k.startswith("optim.") and k.endswith(".exp_avg") for k in keys)
    trainer_state = json.loads((ckpt / "trainer.json").read_text())
    assert trainer_state["lora"]["rank"] == 4 and trainer_state["init_from"]["path"] == str(base_run)
    # The adapter export of the last save: the model's adapter, whole shapes, step recorded.
    adapter = read_adapter(tmp_path / "adapter")
    assert adapter.config["step"] == 4 and adapter.config["rank"] == 4 and adapter.config["alpha"] == 8.0
    mine = lora_state_dict(t.model)
    assert set(adapter.tensors) == set(mine)
    for key, value in mine.items():
        assert torch.equal(adapter.tensors[key], value), key
    # A LoRA run is no base to start another run from: init_from says what to do instead.
    with pytest.raises(ValueError, match="holds adapters only.*tools/merge_lora.py"):
        Trainer(tiny_train_config(tmp_path / "next", init_from=str(tmp_path)), parallel)


def test_resume_is_exact_and_reloads_the_same_base(tmp_path, base_run, parallel):
    cfg = lora_cfg(tmp_path / "straight", base_run, max_steps=6, save_every=3)
    straight = [r["loss"] for r in Trainer(cfg, parallel).fit()]
    resumed_cfg = replace(cfg, trainer=replace(cfg.trainer, resume=str(tmp_path / "straight" / "checkpoints" /
                                                                         "step_00000003")))
    resumed = Trainer(resumed_cfg, parallel)
    assert resumed.step == 3
    again = [r["loss"] for r in resumed.fit()]
    assert again == straight[3:]


def test_resume_refuses_another_base_and_a_full_run(tmp_path, base_run, parallel, monkeypatch):
    """The fingerprint of the rebuilt base must equal the one the adapters were trained on; a run without LoRA
    cannot resume a LoRA checkpoint."""
    cfg = lora_cfg(tmp_path, base_run, max_steps=2)
    Trainer(cfg, parallel).fit()
    import magi_train.parallel.lora as parallel_lora

    real = parallel_lora.frozen_fingerprint
    monkeypatch.setattr(parallel_lora, "frozen_fingerprint", lambda m, p: [x * 1.001 for x in real(m, p)])
    with pytest.raises(ValueError, match="is not the base its adapters were trained on"):
        Trainer(replace(cfg, trainer=replace(cfg.trainer, resume="auto")), parallel)
    monkeypatch.undo()
    # A LoRA checkpoint holds no base: a full run cannot resume it.
    full = replace(cfg, lora=LoraConfig(), trainer=replace(cfg.trainer, resume="auto", init_from=None))
    with pytest.raises(ValueError, match="is a LoRA checkpoint .* resume it with lora.rank=4"):
        Trainer(full, parallel)


def test_a_few_lora_steps_lower_the_held_out_loss(tmp_path, base_run, parallel):
    cfg = lora_cfg(tmp_path, base_run, max_steps=60, eval_batches=1)
    cfg = replace(cfg, optimizer=replace(cfg.optimizer, lr=5e-3, min_lr=5e-4))
    with Trainer(cfg, parallel) as t:
        before = t.evaluate()["eval_loss"]
    t = Trainer(replace(cfg, trainer=replace(cfg.trainer, output_dir=str(tmp_path / "run"))), parallel)
    t.fit()
    after = t.evaluate()["eval_loss"]
    # Measured 0.876 -> 0.841 (the base's output layer and adaLN stay frozen; rank 4 on a 2-layer model).
    assert after < 0.97 * before, (before, after)


def test_bf16_base_trains_fp32_adapters(tmp_path, base_run, parallel):
    cfg = lora_cfg(tmp_path, base_run, max_steps=2, precision="bf16")
    cfg = validate(replace(cfg, lora=replace(cfg.lora, base_dtype="bfloat16")))
    with Trainer(cfg, parallel) as t:
        rec = t.train_step()
        assert rec["grad_norm"] > 0
        from magi_train.model.lora import lora_modules

        # The frozen linears in bf16 (norm gains and biases keep fp32), the adapters fp32.
        assert {p.dtype for n, p in t.named_parameters() if is_lora_parameter(n)} == {torch.float32}
        for name, module in lora_modules(t.model).items():
            assert module.base_layer.weight.dtype == torch.bfloat16, name
        assert t.model.videodit_blocks.layers[0].self_attn_post_norm.weight.dtype == torch.float32

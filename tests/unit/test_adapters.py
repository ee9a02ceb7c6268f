"""Adapter files (magi_train/checkpoint/adapters.py): the documented layout, written atomically, read back into
a model exactly, and every kind of damage refused with the key or field named."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open

from magi_train.checkpoint.adapters import (CONFIG_NAME, WEIGHTS_NAME, base_model_identity, read_adapter,
                                            write_adapter)
from magi_train.model.dit import build_dit
from magi_train.model.lora import (adapter_names, apply_lora, load_adapter, lora_modules, lora_state_dict,
                                   save_adapter)
from tests.configs import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ["*.self_attention.linear_qkv.q", "*.mlp.linear_fc2"]


def trained_adapter(seed: int = 1):
    """A tiny DiT with a LoRA whose B is random (as after training)."""
    model = build_dit(tiny_model(num_layers=2))
    apply_lora(model, TARGETS, rank=3, alpha=6.0, dropout=0.05, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B["default"].weight.normal_(0.0, 0.1, generator=g)
    return model


def test_layout_and_round_trip(tmp_path):
    model = trained_adapter()
    out = save_adapter(model, tmp_path / "adapter", targets=TARGETS, step=120)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((out / CONFIG_NAME).read_text())
    cfg = model.cfg
    assert config["format"] == "magi-lora" and config["version"] == 1
    assert (config["rank"], config["alpha"], config["dropout"], config["step"]) == (3, 6.0, 0.05, 120)
    assert config["targets"] == TARGETS
    assert config["modules"] == [f"videodit_blocks.layers.{i}.{m}" for i in range(2)
                                 for m in ("self_attention.linear_qkv.q", "mlp.linear_fc2")]
    assert config["base_model"] == {"num_layers": 2, "hidden_size": cfg.hidden_size, "name": cfg.name,
                                    "distill": cfg.distill}
    with safe_open(str(out / WEIGHTS_NAME), "pt") as f:
        assert f.metadata() == {"format": "magi-lora"}
        keys = set(f.keys())
        q_a = f.get_tensor("videodit_blocks.layers.0.self_attention.linear_qkv.q.lora_A.weight")
        fc2_b = f.get_tensor("videodit_blocks.layers.1.mlp.linear_fc2.lora_B.weight")
    assert keys == {f"{m}.lora_{x}.weight" for m in config["modules"] for x in "AB"}
    assert q_a.shape == (3, cfg.hidden_size) and q_a.dtype == torch.float32
    assert fc2_b.shape == (cfg.hidden_size, 3)

    fresh = build_dit(tiny_model(num_layers=2))
    name = load_adapter(fresh, out, scale=0.5, base_model=base_model_identity(fresh.cfg))
    assert name == "adapter" and adapter_names(fresh) == ["adapter"]
    m = fresh.get_submodule("videodit_blocks.layers.1.mlp.linear_fc2")
    assert m.scales["adapter"] == 0.5 and m.alphas["adapter"] == 6.0 and m.ranks["adapter"] == 3
    want = lora_state_dict(model)
    got = lora_state_dict(fresh, "adapter")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_bf16_storage_and_replacing_an_adapter(tmp_path):
    model = trained_adapter()
    out = save_adapter(model, tmp_path / "a", dtype=torch.bfloat16)
    adapter = read_adapter(out / WEIGHTS_NAME)  # the file's path works too
    assert all(t.dtype == torch.bfloat16 for t in adapter.tensors.values())
    save_adapter(trained_adapter(seed=2), out, step=5)  # an adapter directory is replaced whole
    assert read_adapter(out).config["step"] == 5
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="todo.txt"):
        save_adapter(model, tmp_path / "notes")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def _rewrite(directory, tensors=None, config=None, metadata=None):
    """Damage an adapter: replace its tensors / config / safetensors metadata."""
    from magi_train.checkpoint.tensorfile import write_tensor_file

    adapter = read_adapter(directory)
    if tensors is not None or metadata is not None:
        (directory / WEIGHTS_NAME).unlink()
        write_tensor_file(directory / WEIGHTS_NAME, list((adapter.tensors if tensors is None else tensors).items()),
                          metadata={"format": "magi-lora"} if metadata is None else metadata)
    if config is not None:
        (directory / CONFIG_NAME).write_text(json.dumps(config))


@pytest.mark.parametrize("damage, message", [
    ("missing", r"missing 1 tensor\(s\).*layers\.1\.mlp\.linear_fc2\.lora_B\.weight"),
    ("extra", r"unexpected tensor.*layers\.0\.mlp\.linear_fc1\.lora_A\.weight"),
    ("shape", r"layers\.0\.self_attention\.linear_qkv\.q\.lora_A\.weight has shape \(2, "),
    ("dtype", r"lora_B\.weight has dtype torch\.int64"),
    ("format", r"metadata format is 'pt'"),
    ("version", r"version 2 is not supported"),
    ("rank", r"field 'rank' = '3' has the wrong type"),
    ("no_alpha", r"field 'alpha' is missing"),
    ("json", r"is not valid JSON"),
])
def test_damaged_adapters_are_refused_with_the_reason(tmp_path, damage, message):
    out = save_adapter(trained_adapter(), tmp_path / "adapter")
    adapter = read_adapter(out)
    tensors, config = dict(adapter.tensors), dict(adapter.config)
    first = adapter.modules[0]
    if damage == "missing":
        del tensors["videodit_blocks.layers.1.mlp.linear_fc2.lora_B.weight"]
        _rewrite(out, tensors=tensors)
    elif damage == "extra":
        tensors["videodit_blocks.layers.0.mlp.linear_fc1.lora_A.weight"] = torch.zeros(3, 4)
        _rewrite(out, tensors=tensors)
    elif damage == "shape":
        tensors[f"{first}.lora_A.weight"] = tensors[f"{first}.lora_A.weight"][:2]
        _rewrite(out, tensors=tensors)
    elif damage == "dtype":
        tensors[f"{first}.lora_B.weight"] = tensors[f"{first}.lora_B.weight"].long()
        _rewrite(out, tensors=tensors)
    elif damage == "format":
        _rewrite(out, metadata={"format": "pt"})
    elif damage == "json":
        (out / CONFIG_NAME).write_text("{not json")
    else:
        if damage == "version":
            config["version"] = 2
        elif damage == "rank":
            config["rank"] = "3"
        elif damage == "no_alpha":
            del config["alpha"]
        _rewrite(out, config=config)
    with pytest.raises(ValueError, match=message):
        read_adapter(out)


def test_truncated_file_and_missing_pieces(tmp_path):
    out = save_adapter(trained_adapter(), tmp_path / "adapter")
    data = (out / WEIGHTS_NAME).read_bytes()
    (out / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_adapter(out)
    (out / WEIGHTS_NAME).write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ValueError, match=WEIGHTS_NAME):
        read_adapter(out)
    (out / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_NAME} is missing"):
        read_adapter(out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_adapter(tmp_path / "nowhere")


def test_base_model_mismatch_is_named(tmp_path, caplog):
    out = save_adapter(trained_adapter(), tmp_path / "adapter")
    three = build_dit(tiny_model(num_layers=3))
    with pytest.raises(ValueError, match="num_layers: adapter 2, model 3"):
        load_adapter(three, out, base_model=base_model_identity(three.cfg))
    assert not lora_modules(three)
    # Without the identity check the shapes still are: a wider model refuses the factors, naming the module.
    wide = build_dit(tiny_model(num_layers=2, hidden_size=2 * tiny_model().hidden_size,
                                ffn_hidden_size=2 * tiny_model().ffn_hidden_size))
    with pytest.raises(ValueError, match=r"module videodit_blocks\.layers\.0\.self_attention\.linear_qkv\.q"):
        load_adapter(wide, out)
    assert not lora_modules(wide)  # nothing half-loaded
    # The distilled variant of the same architecture is a warning, not an error.
    distill = build_dit(tiny_model(num_layers=2, distill=True))
    with caplog.at_level("WARNING"):
        load_adapter(distill, out, name="style", base_model=base_model_identity(distill.cfg))
    assert "distill: adapter False, model True" in caplog.text and adapter_names(distill) == ["style"]


def test_writer_refuses_bad_input(tmp_path):
    base = base_model_identity(tiny_model())
    with pytest.raises(ValueError, match="not named <module>.lora_A.weight"):
        write_adapter(tmp_path / "a", {"x.weight": torch.zeros(2, 2)}, rank=2, alpha=2, dropout=0, targets=[],
                      base_model=base)
    with pytest.raises(ValueError, match=r"m\.lora_B\.weight"):
        write_adapter(tmp_path / "a", {"m.lora_A.weight": torch.zeros(2, 4)}, rank=2, alpha=2, dropout=0,
                      targets=[], base_model=base)
    with pytest.raises(ValueError, match="lacks"):
        write_adapter(tmp_path / "a", {"m.lora_A.weight": torch.zeros(2, 4), "m.lora_B.weight": torch.zeros(4, 2)},
                      rank=2, alpha=2, dropout=0, targets=[], base_model={"name": "x"})
    assert not (tmp_path / "a").exists()

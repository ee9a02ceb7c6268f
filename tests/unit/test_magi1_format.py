"""Reading and writing the released MAGI-1 safetensors layout."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import torch

from magi_train.checkpoint.magi1 import (
    INDEX_NAME,
    MANIFEST_NAME,
    check_state_dict,
    load_magi1_state_dict,
    save_magi1_checkpoint,
    verify_sha256,
    write_manifest,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "magi1_gelu" / "inference_weight"
needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd CLI is not installed")


def mixed_state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "x_embedder.weight": torch.randn(8, 4, 1, 2, 2, generator=gen),
        "videodit_blocks.layers.0.self_attention.linear_qkv.q.weight": torch.randn(16, 16, generator=gen).to(
            torch.bfloat16
        ),
        "videodit_blocks.layers.0.mlp.linear_fc1.bias": torch.randn(32, generator=gen).to(torch.bfloat16),
        "rope.bands": torch.randn(16, generator=gen),
        # A transposed view: must be written as its logical values, not its storage order.
        "final_linear.linear.weight": torch.randn(4, 8, generator=gen).t(),
        "a.step": torch.tensor(3, dtype=torch.int64),
    }


def raw_bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], ordered: bool = True
) -> None:
    assert (list(got) if ordered else sorted(got)) == (list(want) if ordered else sorted(want))
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].shape == tensor.shape, key
        # Compare raw bits so that e.g. NaN payloads and -0.0 count too.
        assert torch.equal(raw_bits(got[key]), raw_bits(tensor)), key


def test_round_trip_preserves_dtypes_bits_and_order(tmp_path: Path) -> None:
    sd = mixed_state_dict()
    sd["rope.bands"][0] = float("nan")
    sd["rope.bands"][1] = -0.0
    save_magi1_checkpoint(sd, tmp_path / "ckpt")
    got = load_magi1_state_dict(tmp_path / "ckpt", check_finite=False)  # the NaN is kept, bit for bit
    assert_bit_identical(got, sd)
    assert sorted(os.listdir(tmp_path / "ckpt")) == sorted([INDEX_NAME, "model-00001-of-00001.safetensors"])
    assert os.listdir(tmp_path) == ["ckpt"]  # no temp dir left behind


def test_sharding_and_index(tmp_path: Path) -> None:
    sd = mixed_state_dict()
    nbytes = {k: v.numel() * v.element_size() for k, v in sd.items()}
    save_magi1_checkpoint(sd, tmp_path / "ckpt", max_shard_bytes=600)

    index = json.loads((tmp_path / "ckpt" / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(nbytes.values())
    assert list(index["weight_map"]) == list(sd)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert sorted(os.listdir(tmp_path / "ckpt")) == sorted([INDEX_NAME, *shards])

    for shard in shards:
        stored = safetensors.torch.load_file(tmp_path / "ckpt" / shard)
        assert set(stored) == {k for k, s in index["weight_map"].items() if s == shard}
        size = sum(nbytes[k] for k in stored)
        # Over the limit only when a single tensor alone exceeds it.
        assert size <= 600 or len(stored) == 1, (shard, size)

    assert_bit_identical(load_magi1_state_dict(tmp_path / "ckpt"), sd)


def test_single_file_layout(tmp_path: Path) -> None:
    sd = mixed_state_dict()
    tmp_path.joinpath("w").mkdir()
    single = tmp_path / "w" / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, single)
    # A lone safetensors file stores keys sorted, so only the index layout can keep their order.
    assert_bit_identical(load_magi1_state_dict(tmp_path / "w"), sd, ordered=False)


@needs_zstd
def test_zst_shards_are_decompressed(tmp_path: Path) -> None:
    sd = mixed_state_dict()
    ckpt = tmp_path / "ckpt"
    save_magi1_checkpoint(sd, ckpt, max_shard_bytes=600)
    shard = ckpt / "model-00001-of-00003.safetensors"
    assert shard.is_file()
    subprocess.run(["zstd", "-q", "--rm", str(shard)], check=True)
    assert not shard.exists() and shard.with_name(shard.name + ".zst").is_file()
    assert_bit_identical(load_magi1_state_dict(ckpt), sd)


@needs_zstd
def test_zst_single_file(tmp_path: Path) -> None:
    sd = mixed_state_dict()
    tmp_path.joinpath("w").mkdir()
    single = tmp_path / "w" / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, single)
    subprocess.run(["zstd", "-q", "--rm", str(single)], check=True)
    # A lone safetensors file stores keys sorted, so only the index layout can keep their order.
    assert_bit_identical(load_magi1_state_dict(tmp_path / "w"), sd, ordered=False)


def test_zst_without_zstd_cli_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "ckpt"
    save_magi1_checkpoint(mixed_state_dict(), ckpt)
    shard = ckpt / "model-00001-of-00001.safetensors"
    shard.rename(shard.with_name(shard.name + ".zst"))  # contents are irrelevant here
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"model-00001-of-00001\.safetensors\.zst.*zstd"):
        load_magi1_state_dict(ckpt)


def test_released_fixture_loads() -> None:
    sd = load_magi1_state_dict(FIXTURE)
    index = json.loads((FIXTURE / INDEX_NAME).read_text())
    assert list(sd) == list(index["weight_map"])
    assert len(set(index["weight_map"].values())) == 2
    assert sum(t.numel() * t.element_size() for t in sd.values()) == index["metadata"]["total_size"]
    assert sd["videodit_blocks.layers.0.self_attention.linear_qkv.q.weight"].dtype == torch.bfloat16
    assert sd["x_embedder.weight"].dtype == torch.float32
    assert sd["rope.bands"].shape == (16,)
    assert all(torch.isfinite(t.float()).all() for t in sd.values())


def test_released_fixture_survives_our_writer(tmp_path: Path) -> None:
    sd = load_magi1_state_dict(FIXTURE)
    save_magi1_checkpoint(sd, tmp_path / "copy", max_shard_bytes=3 * 2**20)
    assert_bit_identical(load_magi1_state_dict(tmp_path / "copy"), sd)


def test_overwrite_replaces_checkpoint_but_not_foreign_dirs(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    save_magi1_checkpoint(mixed_state_dict(), ckpt, max_shard_bytes=600)  # 3 shards
    small = {"only": torch.ones(2, dtype=torch.bfloat16)}
    save_magi1_checkpoint(small, ckpt)
    assert sorted(os.listdir(ckpt)) == sorted([INDEX_NAME, "model-00001-of-00001.safetensors"])
    assert_bit_identical(load_magi1_state_dict(ckpt), small)

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="thesis.tex"):
        save_magi1_checkpoint(small, foreign)
    assert os.listdir(foreign) == ["thesis.tex"]


def test_failed_write_leaves_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "ckpt"
    old = mixed_state_dict()
    save_magi1_checkpoint(old, ckpt)
    real_save_file = safetensors.torch.save_file
    calls = []

    def failing_save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_magi1_checkpoint({"a": torch.ones(100), "b": torch.ones(100)}, ckpt, max_shard_bytes=400)
    assert os.listdir(tmp_path) == ["ckpt"]
    assert_bit_identical(load_magi1_state_dict(ckpt), old)


# ------------------------------------------------------------------ loader errors


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        load_magi1_state_dict(tmp_path / "absent")


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"empty"):
        load_magi1_state_dict(tmp_path)


def test_index_names_missing_shard(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    save_magi1_checkpoint(mixed_state_dict(), ckpt, max_shard_bytes=600)
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00003\.safetensors"):
        load_magi1_state_dict(ckpt)


def test_index_key_absent_from_shard(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    save_magi1_checkpoint(mixed_state_dict(), ckpt, max_shard_bytes=600)
    index = json.loads((ckpt / INDEX_NAME).read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"ghost\.weight.*model-00001-of-00003\.safetensors"):
        load_magi1_state_dict(ckpt)


def test_duplicate_key_across_shards(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    save_magi1_checkpoint({"a": torch.ones(4), "b": torch.ones(4)}, ckpt, max_shard_bytes=16)
    shard2 = ckpt / "model-00002-of-00002.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(4), "b": torch.ones(4)}, shard2)
    with pytest.raises(ValueError, match=r"'a'.*model-0000[12]-of-00002.*model-0000[12]-of-00002"):
        load_magi1_state_dict(ckpt)


def test_duplicate_key_in_index(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    save_magi1_checkpoint({"a": torch.ones(4)}, ckpt)
    shard = "model-00001-of-00001.safetensors"
    (ckpt / INDEX_NAME).write_text(f'{{"weight_map": {{"a": "{shard}", "a": "{shard}"}}}}')
    with pytest.raises(ValueError, match=r"'a' appears more than once"):
        load_magi1_state_dict(ckpt)


def test_corrupt_shard_names_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    save_magi1_checkpoint({"a": torch.ones(4)}, ckpt)
    (ckpt / "model-00001-of-00001.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"model-00001-of-00001\.safetensors"):
        load_magi1_state_dict(ckpt)


# ------------------------------------------------------------------ check_state_dict


def test_check_state_dict_accepts_match() -> None:
    got = {"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}
    check_state_dict({"a": ((2, 3), torch.float32), "b": ((4,), None)}, got, "/ckpt")


def test_check_state_dict_reports_everything() -> None:
    expected = {
        "kept": ((2,), None),
        "missing.weight": ((1,), None),
        "resized.weight": ((3, 4), None),
        "recast.weight": ((2,), torch.float32),
    }
    got = {
        "kept": torch.zeros(2),
        "resized.weight": torch.zeros(4, 3),
        "recast.weight": torch.zeros(2, dtype=torch.bfloat16),
        "extra.bias": torch.zeros(1),
    }
    with pytest.raises(ValueError) as info:
        check_state_dict(expected, got, "/weights/inference_weight")
    message = str(info.value)
    assert "/weights/inference_weight" in message
    assert "missing.weight" in message
    assert "extra.bias" in message
    assert "resized.weight: expected (3, 4), checkpoint has (4, 3)" in message
    assert "recast.weight" in message and "bfloat16" in message
    assert "kept" not in message


def test_check_state_dict_truncates_long_lists() -> None:
    expected = {f"layer.{i}": ((1,), None) for i in range(25)}
    with pytest.raises(ValueError) as info:
        check_state_dict(expected, {}, "src")
    message = str(info.value)
    assert "25 missing keys" in message and "... and 15 more" in message
    assert "layer.9" in message and "layer.10" not in message


# ---------------------------------------------------------------------------------------------------------------
# Integrity: finite values, sha256 manifests


def flip_a_data_byte(shard: Path, key: str) -> None:
    """Change one byte inside `key`'s stored bytes (the header stays valid, so safetensors still loads it)."""
    data = bytearray(shard.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    begin, _ = json.loads(data[8 : 8 + header_len])[key]["data_offsets"]
    data[8 + header_len + begin + 1] ^= 0x10  # bf16 high byte: exponent bit, the value stays finite
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_value_is_an_error_naming_shard_and_key(tmp_path: Path, dtype: torch.dtype, bad: float) -> None:
    sd = mixed_state_dict()
    bias = sd["videodit_blocks.layers.0.mlp.linear_fc1.bias"] = sd["videodit_blocks.layers.0.mlp.linear_fc1.bias"].to(dtype)
    if dtype == torch.float8_e4m3fn:
        bias.view(torch.uint8)[3] = 0x7F  # e4m3fn has no inf (a cast saturates); its NaN is S.1111.111
    else:
        bias[3] = bad
    save_magi1_checkpoint(sd, tmp_path / "ckpt", max_shard_bytes=600)
    shard = json.loads((tmp_path / "ckpt" / INDEX_NAME).read_text())["weight_map"][
        "videodit_blocks.layers.0.mlp.linear_fc1.bias"]
    with pytest.raises(ValueError, match=rf"{shard}: tensor 'videodit_blocks.layers.0.mlp.linear_fc1.bias' .* 1 NaN/inf"):
        load_magi1_state_dict(tmp_path / "ckpt")
    # Copying the files bit for bit may opt out.
    assert_bit_identical(load_magi1_state_dict(tmp_path / "ckpt", check_finite=False), sd)


def test_the_manifest_beside_the_shards_catches_a_flipped_byte(tmp_path: Path) -> None:
    sd = mixed_state_dict()
    ckpt = tmp_path / "ckpt"
    save_magi1_checkpoint(sd, ckpt, max_shard_bytes=600)
    manifest = write_manifest(ckpt)
    assert manifest == ckpt / MANIFEST_NAME
    lines = manifest.read_text().splitlines()
    assert len(lines) == len(os.listdir(ckpt)) - 1 and all(len(line.split("  ")[0]) == 64 for line in lines)
    assert_bit_identical(load_magi1_state_dict(ckpt), sd)

    key = "videodit_blocks.layers.0.self_attention.linear_qkv.q.weight"
    shard = json.loads((ckpt / INDEX_NAME).read_text())["weight_map"][key]
    flip_a_data_byte(ckpt / shard, key)
    with pytest.raises(ValueError, match=rf"{shard} does not match its sha256 in .*{MANIFEST_NAME}"):
        load_magi1_state_dict(ckpt)
    # What the manifest is for: without it the damaged shard loads, finite but different.
    manifest.unlink()
    damaged = load_magi1_state_dict(ckpt)
    assert torch.isfinite(damaged[key].float()).all() and not torch.equal(damaged[key], sd[key])


def test_a_manifest_given_by_path_in_sha256sum_format(tmp_path: Path) -> None:
    sd = mixed_state_dict()
    ckpt = tmp_path / "model" / "inference_weight"
    save_magi1_checkpoint(sd, ckpt, max_shard_bytes=600)
    shards = sorted(p.name for p in ckpt.iterdir() if p.name != INDEX_NAME)
    # As `cd model && sha256sum -b inference_weight/*` writes it: binary-mode marker, names with a directory.
    listing = "".join(f"{hashlib.sha256((ckpt / n).read_bytes()).hexdigest()} *inference_weight/{n}\n" for n in shards)
    given = tmp_path / "weights.sha256"
    given.write_text(listing)
    assert_bit_identical(load_magi1_state_dict(ckpt, sha256=given), sd)
    verify_sha256(ckpt, given)

    given.write_text(listing.replace(shards[1], "other.safetensors"))
    with pytest.raises(ValueError, match=rf"weights.sha256 has no entry for {shards[1]}"):
        load_magi1_state_dict(ckpt, sha256=given)
    given.write_text("0" * 64 + "  " + shards[0] + "\n" + listing)
    with pytest.raises(ValueError, match=f"lists {shards[0]} twice with different digests"):
        verify_sha256(ckpt, given)
    given.write_text(listing + "not a digest line\n")
    with pytest.raises(ValueError, match=rf"weights.sha256, line {len(shards) + 1}: expected '<64 hex digits>  <file name>'"):
        load_magi1_state_dict(ckpt, sha256=given)
    with pytest.raises(FileNotFoundError, match="absent.sha256 does not exist"):
        load_magi1_state_dict(ckpt, sha256=tmp_path / "absent.sha256")


def test_a_checkpoint_with_a_manifest_can_be_replaced(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    save_magi1_checkpoint(mixed_state_dict(), ckpt)
    write_manifest(ckpt)
    small = {"a.weight": torch.ones(2)}
    save_magi1_checkpoint(small, ckpt)
    assert_bit_identical(load_magi1_state_dict(ckpt), small)
    assert not (ckpt / MANIFEST_NAME).exists()


def test_hash_weights_tool_writes_and_checks_the_manifest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("hash_weights", Path(__file__).parents[2] / "tools" / "hash_weights.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    model = tmp_path / "4.5B"
    save_magi1_checkpoint(mixed_state_dict(), model / "inference_weight.distill", max_shard_bytes=600)
    assert tool.main([str(model)]) == 0  # a model directory: each weight directory in it
    assert (model / "inference_weight.distill" / MANIFEST_NAME).is_file()
    assert tool.main(["--check", str(model / "inference_weight.distill")]) == 0
    shard = model / "inference_weight.distill" / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    assert tool.main(["--check", str(model)]) == 1
    assert "model-00002-of-00003.safetensors does not match its sha256" in capsys.readouterr().err
    assert tool.main([str(tmp_path / "nowhere")]) == 1

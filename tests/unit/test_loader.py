"""The streaming webdataset loader: every sample once per epoch over ranks and workers, exact resume under
another layout, corrupt input skipped and counted, and the config rules of data.kind=webdataset."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from magi_train.config import ConfigError, validate
from magi_train.config.schema import DataConfig, ModelConfig, TrainConfig
from magi_train.data.loader import (
    PackedSequence,
    StreamPosition,
    WebDatasetLoader,
    merge_loader_states,
    resolve_shards,
)
from magi_train.data.shards import Sample, encode_sample
from tests.shard_helpers import CAPTION_DIM, CHANNELS, make_sample, write_dataset, write_shard

CHUNK = 2  # latent frames per chunk of the test model
MODEL = ModelConfig(chunk_width=CHUNK, patch_size=2, t_patch_size=1, caption_channels=CAPTION_DIM,
                    caption_max_length=16)
SEQ, ROWS = 64, 4


def data_config(shards: Path, **overrides) -> DataConfig:
    fields = dict(kind="webdataset", shards=str(shards), seq_length=SEQ, max_rows_per_sequence=ROWS, pack_pool=6,
                  shuffle_buffer=6, num_streams=4, num_workers=0, latent_channels=CHANNELS, micro_batch_size=1,
                  latent_frames_per_chunk=CHUNK, seed=3)
    fields.update(overrides)
    return DataConfig(**fields)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Tuple[Path, Dict[str, Sample]]:
    """8 shards x 12 samples: images and videos of 1-4 chunks at three latent sizes."""
    root = tmp_path_factory.mktemp("shards")
    return root, write_dataset(root, shards=8, per_shard=12, chunk_width=CHUNK)


def expected_tokens(s: Sample) -> int:
    _, T, H, W = s.latent.shape  # patch 2, t_patch 1: one token per 2 x 2 latent pixels of every frame
    return T * (H // 2) * (W // 2)


def check_sequence(seq: PackedSequence, written: Dict[str, Sample]) -> None:
    assert seq.seq_length == SEQ and seq.tokens <= SEQ and seq.rows <= ROWS
    assert seq.tokens == sum(expected_tokens(s) for s in seq.samples)
    assert len(seq.samples) == len(seq.provenance)
    for s in seq.samples:
        # Whole leading chunks of the sample as written (float16 in the shard).
        original = written[s.key].latent.to(torch.float16).float()
        assert s.latent.shape[1] == 1 or s.latent.shape[1] % CHUNK == 0
        assert torch.equal(s.latent, original[:, :s.latent.shape[1]])
        assert s.caption.shape[0] in (1, max(1, s.latent.shape[1] // CHUNK))


def run_until(loaders: List[WebDatasetLoader], epoch: int, written: Dict[str, Sample],
              collected: List[Tuple[str, tuple]]) -> None:
    """Iterate every loader until each of its streams has delivered a sequence of a later epoch; record
    (sample key, provenance) of every sample of `epoch`."""
    for loader in loaders:
        pending = set(loader.streams)
        for seq in loader:
            check_sequence(seq, written)
            if seq.epoch == epoch:
                collected += [(s.key, p) for s, p in zip(seq.samples, seq.provenance)]
            elif seq.epoch > epoch:
                pending.discard(seq.stream)
                if not pending:
                    break


def assert_exactly_once(collected: List[Tuple[str, tuple]], keys) -> None:
    counts = Counter(key for key, _ in collected)
    assert set(counts) == set(keys)
    assert max(counts.values()) == 1, [k for k, c in counts.items() if c > 1]
    assert len({p for _, p in collected}) == len(collected)  # provenance is unique too


# --- one epoch over ranks and workers -----------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_sample_once_per_epoch_over_two_ranks(dataset, num_workers):
    root, written = dataset
    cfg = data_config(root, num_workers=num_workers)
    loaders = [WebDatasetLoader(cfg, MODEL, dp_rank=r, dp_size=2) for r in range(2)]
    assert sorted(s for l in loaders for s in l.streams) == [0, 1, 2, 3]
    collected: List[Tuple[str, tuple]] = []
    run_until(loaders, 0, written, collected)
    assert_exactly_once(collected, written)
    for loader in loaders:
        counts = loader.counters()
        assert counts["truncated"] > 0  # 4-chunk samples of 8 x 8 latents do not fit 64 tokens
        assert counts["sequences"] > 0 and 0 < counts["tokens"] <= counts["sequences"] * SEQ


def test_workers_can_be_spawned(dataset):
    # Workers started with "spawn" get the streams by pickling (no state inherited from this process).
    root, written = dataset
    loader = WebDatasetLoader(data_config(root, num_workers=2), MODEL, dp_rank=1, dp_size=2,
                              multiprocessing_context="spawn")
    seen = set()
    for i, seq in enumerate(loader):
        check_sequence(seq, written)
        seen.add(seq.stream)
        if i == 3:
            break
    assert seen == {2, 3}  # rank 1's readers: worker 0 reads stream 2, worker 1 stream 3


def test_streams_follow_the_shard_and_reader_layout(dataset):
    root, _ = dataset
    shards = resolve_shards(str(root))
    cfg = data_config(root, num_streams=4, num_workers=2)
    rank1 = WebDatasetLoader(cfg, MODEL, dp_rank=1, dp_size=2)
    # Readers (rank, worker): stream s goes to s % 4 = 2 * rank + worker; shard j to stream j % 4.
    assert rank1.streams == {2: [shards[2], shards[6]], 3: [shards[3], shards[7]]}
    with pytest.raises(ValueError, match=r"data.num_streams \(4\) must be a multiple of dp x max\(1, data.num_workers\) \(3 x 1"):
        WebDatasetLoader(data_config(root), MODEL, dp_rank=0, dp_size=3)
    with pytest.raises(ValueError, match=r"data.shards .* has 8 shard\(s\), fewer than data.num_streams \(16\)"):
        WebDatasetLoader(data_config(root, num_streams=16), MODEL, dp_rank=0, dp_size=1)
    with pytest.raises(ValueError, match="matches no shard"):
        resolve_shards(str(root / "nothing-*.tar"))
    assert resolve_shards(str(root / "train-{000001..000002}.tar")) == shards[1:3]


def test_buckets_and_max_chunks(dataset):
    root, written = dataset
    cfg = data_config(root, num_streams=1, buckets=["32x32"], max_chunks=1)
    loader = WebDatasetLoader(cfg, MODEL, dp_rank=0, dp_size=1)
    collected: List[Tuple[str, tuple]] = []
    for seq in loader:
        if seq.epoch > 0:
            break
        collected += [(s.key, p) for s, p in zip(seq.samples, seq.provenance)]
        assert all(s.latent.shape[1] <= CHUNK for s in seq.samples)
        counts = seq.counters  # the last sequence of epoch 0 comes after all of its reading
    assert_exactly_once(collected, [k for k, s in written.items() if s.meta["bucket"] == "32x32"])
    assert counts["skipped.bucket"] == sum(s.meta["bucket"] != "32x32" for s in written.values())
    assert counts["capped"] > 0


# --- exact resume -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("before, after, taken", [
    ((2, 2), (2, 2), 8),  # (dp, num_workers): same layout
    ((2, 0), (1, 2), 8),  # fewer ranks, more workers
    ((2, 2), (4, 0), 8),  # more ranks
    ((2, 0), (2, 2), 20),  # some shards done, others partial
    ((2, 0), (2, 0), 30),  # every stream is past the end of epoch 0
])
def test_resume_delivers_exactly_the_rest_of_the_epoch(dataset, before, after, taken):
    root, written = dataset
    epoch = 0 if taken < 25 else 1
    collected: List[Tuple[str, tuple]] = []
    states = []
    for r in range(before[0]):
        loader = WebDatasetLoader(data_config(root, num_workers=before[1]), MODEL, dp_rank=r, dp_size=before[0])
        for i, seq in enumerate(loader):
            check_sequence(seq, written)
            if seq.epoch == epoch:
                collected += [(s.key, p) for s, p in zip(seq.samples, seq.provenance)]
            if i + 1 == taken:
                break
        states.append(json.loads(json.dumps(loader.state_dict())))  # it must survive JSON
    merged = merge_loader_states(states)
    assert sorted(merged["streams"]) == ["0", "1", "2", "3"]
    assert all(not set(p["done"]) & set(p["partial"]) for p in merged["streams"].values())
    before_count = len(collected)
    assert 0 < before_count < len(written)

    resumed = []
    for r in range(after[0]):
        loader = WebDatasetLoader(data_config(root, num_workers=after[1]), MODEL, dp_rank=r, dp_size=after[0])
        loader.load_state_dict(merged)
        resumed.append(loader)
    run_until(resumed, epoch, written, collected)
    assert len(collected) > before_count
    assert_exactly_once(collected, written)


def test_stream_position_collapses_finished_shards():
    position = StreamPosition()

    def seq(epoch, provenance, skipped=(), ends=()):
        return PackedSequence([], [(0, epoch, shard, i) for shard, i in provenance], 0, SEQ, 0, 0, epoch,
                              list(skipped), list(ends))

    position.take(seq(0, [("a", 0), ("b", 1)], skipped=[("a", 2)]))
    assert position.to_json() == {"epoch": 0, "done": [], "partial": {"a": [0, 2], "b": [1]}}
    position.take(seq(0, [("a", 1)], ends=[("a", 3)]))
    assert position.to_json() == {"epoch": 0, "done": ["a"], "partial": {"b": [1]}}
    position.take(seq(1, [("b", 0)]))  # a new epoch of the stream: the old one is through
    assert position.to_json() == {"epoch": 1, "done": [], "partial": {"b": [0]}}
    assert StreamPosition.from_json(position.to_json()).to_json() == position.to_json()


def test_state_mismatches_are_clear_errors(dataset):
    root, _ = dataset
    loader = WebDatasetLoader(data_config(root), MODEL, dp_rank=0, dp_size=2)
    state = loader.state_dict()
    other = WebDatasetLoader(data_config(root, num_streams=2), MODEL, dp_rank=0, dp_size=1)
    with pytest.raises(ValueError, match="data.num_streams=4 over 8 shard"):
        other.load_state_dict(state)
    rank1 = WebDatasetLoader(data_config(root), MODEL, dp_rank=1, dp_size=2)
    with pytest.raises(ValueError, match="no entry for stream 1: load the merged state"):
        rank1.load_state_dict(state)
    moved = json.loads(json.dumps(state))
    moved["streams"]["0"]["done"] = ["/elsewhere/train-000000.tar"]
    with pytest.raises(ValueError, match="were the shards moved"):
        loader.load_state_dict(moved)


# --- corrupt input ----------------------------------------------------------------------------------------


def test_corrupt_input_is_skipped_counted_and_warned(tmp_path, caplog):
    def tamper(key, members):
        if key == "s000_003":
            del members["t5.npy"]  # no caption features
        elif key == "s001_004":
            members["latent.npy"] = b"\x93NUMPY garbage"
        elif key == "s002_005":
            members["latent.npy"] = encode_sample(make_sample(key, 3 * CHUNK + 1))["latent.npy"]  # frames
        return members

    written = write_dataset(tmp_path, shards=4, per_shard=10, chunk_width=CHUNK, seed=7, tamper=tamper)
    truncated = tmp_path / "train-000003.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (tmp_path / "train-000004.tar").write_bytes(b"this is not a tar file")

    cfg = data_config(tmp_path, num_streams=1)
    loader = WebDatasetLoader(cfg, MODEL, dp_rank=0, dp_size=1)
    collected: List[Tuple[str, tuple]] = []
    with caplog.at_level(logging.WARNING, logger="magi_train.data.loader"):
        for seq in loader:
            if seq.epoch > 0:
                break
            check_sequence(seq, written)
            collected += [(s.key, p) for s, p in zip(seq.samples, seq.provenance)]
            counts = seq.counters  # the last one of epoch 0 comes after all of its reading

    bad = {"s000_003", "s001_004", "s002_005"}
    from_truncated = sorted(k for k, _ in collected if k.startswith("s003_"))
    # The truncated shard gives its leading samples, then stops.
    assert 0 < len(from_truncated) < 10
    assert from_truncated == [f"s003_{i:03d}" for i in range(len(from_truncated))]
    assert_exactly_once(collected, [k for k in written if k not in bad and not k.startswith("s003_")]
                        + from_truncated)
    assert counts["skipped.missing_member"] == 1
    assert counts["skipped.bad_sample"] == 1
    assert counts["skipped.bad_shape"] == 1
    assert counts["shard_errors"] == 2  # the truncated tar and the one that is no tar at all
    text = caplog.text
    assert "skipping sample 's000_003' (index 3) of shard" in text and "train-000000.tar: missing_member" in text
    assert "'s001_004'" in text and "latent.npy is not a valid .npy" in text
    assert "'s002_005'" in text and "not a multiple of model.chunk_width" in text
    assert "train-000003.tar is unreadable after" in text and "train-000004.tar is unreadable after 0" in text

    # Resuming after the whole epoch was consumed delivers nothing of it again, bad samples included.
    fresh = WebDatasetLoader(cfg, MODEL, dp_rank=0, dp_size=1)
    fresh.load_state_dict(merge_loader_states([loader.state_dict()]))
    assert next(iter(fresh)).epoch == 1


def test_a_stream_without_usable_samples_is_an_error(tmp_path):
    write_shard(tmp_path / "only.tar", [encode_sample(make_sample("big", 2 * CHUNK, 16, 16))])  # > 64 tokens/chunk
    loader = WebDatasetLoader(data_config(tmp_path, num_streams=1), MODEL, dp_rank=0, dp_size=1)
    with pytest.raises(RuntimeError, match="found no usable sample"):
        next(iter(loader))


# --- config rules -----------------------------------------------------------------------------------------


def webdataset_config(**data) -> TrainConfig:
    cfg = TrainConfig()
    fields = dict(kind="webdataset", shards="/data/train-{000000..000009}.tar", seq_length=4096, micro_batch_size=1,
                  caption_length=256)
    cfg.data = dataclasses.replace(cfg.data, **{**fields, **data})
    return cfg


def test_a_webdataset_config_validates():
    validate(webdataset_config(buckets=["480x832", "256x256"], max_chunks=4, num_workers=2))
    cfg = webdataset_config()
    cfg.parallel = dataclasses.replace(cfg.parallel, tp=2, cp=2, dp=2, cp_impl="magi")
    validate(cfg)


@pytest.mark.parametrize("data, parallel, message", [
    (dict(shards=""), {}, "data.shards ('') must name the training shards"),
    (dict(seq_length=0), {}, "data.seq_length (0) must be > 0"),
    (dict(micro_batch_size=2), {}, "data.micro_batch_size (2) must be 1 for data.kind=webdataset"),
    (dict(num_streams=0), {}, "data.num_streams (0) must be >= 1"),
    (dict(pack_pool=0), {}, "data.pack_pool (0) must be >= 1"),
    (dict(shuffle_buffer=-1), {}, "data.shuffle_buffer (-1) must be >= 0"),
    (dict(max_rows_per_sequence=0), {}, "data.max_rows_per_sequence (0) must be >= 1"),
    (dict(max_chunks=-1), {}, "data.max_chunks (-1) must be >= 0"),
    (dict(buckets=["480x832", "480*832"]), {}, "data.buckets entry '480*832' must look like 'HxW'"),
    (dict(kind="parquet"), {}, "data.kind ('parquet') must be one of 'synthetic', 'webdataset'"),
    (dict(caption_length=10_000), {}, "data.caption_length (10000) must be in [model.null_caption_length, "),
    (dict(seq_length=4098), dict(tp=2, cp=2),
     "data.seq_length (4098) must be divisible by parallel.tp x parallel.cp (2 x 2 = 4)"),
    (dict(num_streams=6, num_workers=2), dict(dp=2),
     "data.num_streams (6) must be a multiple of parallel.dp x max(1, data.num_workers) (2 x 2 = 4)"),
])
def test_webdataset_rules_name_the_field(data, parallel, message):
    cfg = webdataset_config(**data)
    cfg.parallel = dataclasses.replace(cfg.parallel, **parallel)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert message in str(info.value)


def test_synthetic_sizes_do_not_apply_to_webdataset():
    # Shards carry their own sizes; the synthetic generator's fields are not checked (data.caption_length is:
    # shard captions are padded or cut to it).
    validate(webdataset_config(latent_height=7, num_samples=0, chunks_per_sample=1))

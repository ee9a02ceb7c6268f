"""The webdataset chain as users run it: tools/make_synthetic_dataset.py -> tools/prepare_dataset.py (tiny VAE,
hash text encoder) -> shards -> WebDatasetLoader over 2 dp ranks x 2 workers (every sample once per epoch,
exact mid-epoch resume under another dp size) -> magi_train/train.py data=webdataset under torchrun (packed
training, fixed-t validation, validation videos, checkpoints with the loader position, resume; a truncated
shard skipped and counted)."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import webdataset

from magi_train.config.schema import DataConfig, ModelConfig
from magi_train.data.loader import WebDatasetLoader, merge_loader_states
from magi_train.data.shards import decode_sample
from tests.tiny_assets import make_vae

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
TRAIN_SHARDS = 6  # the first 6 of the tool's shards train, the rest are held out


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dict[str, object]:
    """12 videos and 3 images -> 8 shards of 2 samples (64x64, 48x64, 64x48 buckets, 16-channel latents, 64-dim
    hash captions); copied into train/ (first 6 shards) and val/ (the rest)."""
    root = tmp_path_factory.mktemp("wds_cli")
    data, shards = root / "data", root / "shards"
    made = tool("make_synthetic_dataset.py", "--out", str(data), "--num-videos", "12", "--num-images", "3",
                "--seconds", "1-3", "--size", "64x64,64x48,48x64", "--seed", "3")
    assert made.returncode == 0, made.stderr[-3000:]
    prepared = tool("prepare_dataset.py", "--input", str(data / "captions.jsonl"), "--out", str(shards),
                    "--vae", str(make_vae(root / "vae")), "--text-encoder", "hash:64",
                    "--buckets", "64x64,48x64,64x48", "--samples-per-shard", "2", "--workers", "0", "--no-progress")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    speed = re.search(r"([0-9.]+) clips/s", prepared.stdout)
    assert speed and float(speed.group(1)) > 0, prepared.stdout
    assert "wrote 15 clips in 8 shards" in prepared.stdout, prepared.stdout

    tars = sorted(shards.glob("shard-*.tar"))
    assert len(tars) == 8
    (root / "train").mkdir()
    (root / "val").mkdir()
    for i, tar in enumerate(tars):
        shutil.copy(tar, root / ("train" if i < TRAIN_SHARDS else "val") / tar.name)
    samples = [decode_sample(raw) for raw in webdataset.WebDataset([str(t) for t in tars], shardshuffle=False)]
    return {"root": root, "shards": shards, "keys": [s.key for s in samples],
            "longest_caption": max(int(s.caption_lengths.max()) for s in samples)}


# --- the loader over the tool's shards ------------------------------------------------------------------------


def loader_configs(dataset) -> Tuple[DataConfig, ModelConfig]:
    # conf/model/tiny.yaml's geometry: 16 latent channels, chunks of 6 latent frames, patch 2, 64-dim captions.
    model = ModelConfig(in_channels=16, out_channels=16, caption_channels=64, chunk_width=6, patch_size=2,
                        t_patch_size=1, caption_max_length=max(64, dataset["longest_caption"]))
    # The longest sample (3 chunks of 8 x 6 latents) is 216 tokens: every sample fits whole.
    data = DataConfig(kind="webdataset", shards=str(dataset["shards"]), seq_length=256, max_rows_per_sequence=8,
                      pack_pool=4, shuffle_buffer=3, num_streams=4, num_workers=2, latent_channels=16,
                      latent_frames_per_chunk=6, micro_batch_size=1, seed=11)
    return data, model


Seen = List[Tuple[str, tuple]]  # (sample key, provenance)


def read_epoch(loader: WebDatasetLoader, epoch: int, seen: Seen) -> None:
    """Iterate until every stream of `loader` has delivered a sequence of a later epoch; record the samples
    of `epoch` (a sequence of an earlier epoch is an error: epochs are read in order)."""
    pending = set(loader.streams)
    for seq in loader:
        assert seq.epoch >= epoch, (seq.stream, seq.epoch)
        assert 0 < seq.tokens <= seq.seq_length
        if seq.epoch == epoch:
            seen += [(s.key, p) for s, p in zip(seq.samples, seq.provenance, strict=True)]
        else:
            pending.discard(seq.stream)
            if not pending:
                return


def assert_exactly_once(seen: Seen, keys) -> None:
    counts = Counter(key for key, _ in seen)
    assert sorted(counts) == sorted(keys), (sorted(set(keys) - set(counts)), sorted(set(counts) - set(keys)))
    assert max(counts.values()) == 1, [k for k, c in counts.items() if c > 1]
    assert len({p for _, p in seen}) == len(seen)


@pytest.mark.slow
def test_loader_reads_the_tools_shards_once_per_epoch_and_resumes_exactly(dataset):
    data, model = loader_configs(dataset)
    keys = dataset["keys"]
    assert len(keys) == len(set(keys)) == 15

    # Epoch 0 over 2 dp ranks x 2 workers: 4 streams, every sample exactly once.
    loaders = [WebDatasetLoader(data, model, dp_rank=r, dp_size=2) for r in range(2)]
    assert sorted(s for loader in loaders for s in loader.streams) == [0, 1, 2, 3]
    seen: Seen = []
    for loader in loaders:
        read_epoch(loader, 0, seen)
    assert_exactly_once(seen, keys)
    assert sum(loader.counters()["shard_errors"] for loader in loaders) == 0

    # Interrupted mid-epoch: each rank takes 2 sequences (both workers' streams), then a new run with one dp
    # rank (2 workers, 4 streams as before) loads the merged position and delivers exactly the rest.
    loaders = [WebDatasetLoader(data, model, dp_rank=r, dp_size=2) for r in range(2)]
    before: Seen = []
    for loader in loaders:
        for i, seq in enumerate(loader):
            assert seq.epoch == 0
            before += [(s.key, p) for s, p in zip(seq.samples, seq.provenance, strict=True)]
            if i == 1:
                break
    assert 0 < len(before) < len(keys)
    state = merge_loader_states([loader.state_dict() for loader in loaders])
    assert sorted(state["streams"]) == ["0", "1", "2", "3"]
    state = json.loads(json.dumps(state))  # as a checkpoint holds it

    resumed = WebDatasetLoader(data, model, dp_rank=0, dp_size=1)
    resumed.load_state_dict(state)
    after: Seen = []
    read_epoch(resumed, 0, after)
    assert not {k for k, _ in before} & {k for k, _ in after}, "a consumed sample was delivered again"
    assert_exactly_once(before + after, keys)


# --- training with the CLI ------------------------------------------------------------------------------------


def train(out: Path, train_dir: Path, val_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "1", "magi_train/train.py", "model=tiny", "data=webdataset",
           f"data.shards={train_dir}", f"data.val_shards={val_dir}", "data.seq_length=512", "data.num_streams=2",
           "data.num_workers=0", "data.caption_length=50", "data.max_rows_per_sequence=16", "data.pack_pool=8",
           "data.shuffle_buffer=4", "data.global_batch_size=2", "trainer.eval_every=2", "trainer.eval_batches=1",
           "trainer.sample_every=4", "trainer.sample_count=1", "trainer.sample_steps=4", "trainer.wandb.mode=offline",
           "trainer.progress_bar=false", "trainer.save_every=2", f"trainer.output_dir={out}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def records(out: Path) -> List[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_cli_on_prepared_shards_validates_samples_checkpoints_and_resumes(dataset, tmp_path):
    from magi_train.data.video_io import probe_video

    root = dataset["root"]
    # Corrupt input: a copy of a training shard cut to 40% of its bytes, next to the good ones.
    train_dir = tmp_path / "train"
    shutil.copytree(root / "train", train_dir)
    whole = (train_dir / "shard-000000.tar").read_bytes()
    (train_dir / "shard-000000-cut.tar").write_bytes(whole[: len(whole) * 2 // 5])
    out = tmp_path / "run"

    first = train(out, train_dir, root / "val", "trainer.max_steps=4")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "shard-000000-cut.tar is unreadable" in first.stdout + first.stderr
    recs = records(out)
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert math.isfinite(r["loss"]) and r["loss"] > 0, r
        assert 0 < r["packing_util"] <= 1, r
        assert r["data/delivered"] > 0 and r["data/sequences"] > 0 and r["data/tokens"] > 0, r
    # The truncated shard was read to its break, reported, and training went on.
    assert steps[-1]["data/shard_errors"] > 0, steps[-1]

    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        per_t = [v for k, v in r.items() if k.startswith("eval_loss/t=")]
        assert len(per_t) == 5 and all(math.isfinite(v) for v in per_t), r

    videos = [r for r in recs if "videos" in r]
    assert [r["step"] for r in videos] == [4]
    (path,) = videos[0]["videos"].values()
    info = probe_video(path)
    assert info.frames == 2 * 6 * 4 and info.width in (48, 64) and info.height in (48, 64), info  # 2 chunks
    media = [p for p in glob.glob(str(out / "wandb" / "offline-run-*" / "files" / "media" / "videos" / "**"),
                                  recursive=True) if os.path.isfile(p)]
    assert media, "no video in the wandb offline run"

    saved = json.loads((out / "checkpoints" / "step_00000004" / "trainer.json").read_text())
    state = saved["data_loader"]
    assert state["format"] == "magi.webdataset_loader/1" and state["num_streams"] == 2
    assert state["num_shards"] == TRAIN_SHARDS + 1
    assert sorted(state["streams"]) == ["0", "1"]

    more = train(out, train_dir, root / "val", "trainer.max_steps=6", "trainer.resume=auto")
    assert more.returncode == 0, more.stdout[-2000:] + more.stderr[-3000:]
    assert "resumed from" in more.stdout and "step_00000004" in more.stdout
    steps = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert (out / "checkpoints" / "step_00000006" / "trainer.json").is_file()
    # The resumed run logged into the same wandb run: both offline runs carry the id kept in the output dir.
    run_id = json.loads((out / "wandb_run.json").read_text())["id"]
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs), (run_id, runs)

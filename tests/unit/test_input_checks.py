"""Training inputs that used to pass unchecked: non-finite text features in a shard (the run died after a few NaN
steps without naming the sample), values a float16 shard cannot hold, and a held-out set smaller than what the
evaluation asks for (a bare IndexError in the middle of training)."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch

from magi_train.config import ConfigError
from magi_train.config.validate import check_train_layout
from magi_train.data.loader import WebDatasetLoader
from magi_train.data.shards import SampleError, check_sample, decode_sample, encode_sample
from tests.configs import tiny_train_config
from tests.shard_helpers import make_sample, write_shard
from tests.unit.test_loader import CHUNK, MODEL, data_config


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_text_features_are_rejected_naming_the_sample(bad):
    sample = make_sample("clip7", 2 * CHUNK)
    sample.caption[0, 1, 3] = bad
    with pytest.raises(SampleError, match=r"sample 'clip7': t5 text features have non-finite values "
                                          r"\(first at row 0, position 1, channel 3\)"):
        check_sample(sample)


def test_a_shard_with_nan_text_features_skips_that_sample_and_names_it(tmp_path, caplog):
    good = [encode_sample(make_sample(f"s{i}", 2 * CHUNK, seed=i)) for i in range(3)]
    poisoned = dict(good[1])
    t5 = np.load(io.BytesIO(poisoned["t5.npy"]), allow_pickle=False).copy()
    t5[0, 0, 0] = np.nan
    poisoned["t5.npy"] = _npy(t5)
    with pytest.raises(SampleError, match="'s1': t5 text features have non-finite"):
        decode_sample(poisoned)
    write_shard(tmp_path / "train-000000.tar", [good[0], poisoned, good[2]])
    loader = WebDatasetLoader(data_config(tmp_path, num_streams=1), MODEL, dp_rank=0, dp_size=1)
    with caplog.at_level(logging.WARNING, logger="magi_train.data.loader"):
        seq = next(iter(loader))
    assert "s1" not in [s.key for s in seq.samples]
    assert seq.counters["skipped.bad_sample"] == 1
    assert "'s1'" in caplog.text and "non-finite" in caplog.text


def test_values_beyond_float16_are_refused_when_writing_a_shard():
    sample = make_sample("loud", 2 * CHUNK)
    sample.latent[0, 0, 0, 0] = 7.0e4  # finite in float32, inf in the shard's float16
    with pytest.raises(SampleError, match="'loud': latent overflow float16"):
        encode_sample(sample)
    sample = make_sample("loud_text", 2 * CHUNK)
    sample.caption[0, 0, 0] = -1.0e5
    with pytest.raises(SampleError, match="'loud_text': t5 text features overflow float16"):
        encode_sample(sample)


def test_a_held_out_set_smaller_than_the_evaluation_is_a_config_error(tmp_path):
    cfg = tiny_train_config(tmp_path, eval_every=5, eval_batches=2)
    cfg.data.num_samples = 3  # global batch 2 (1 rank): 2 batches need 4 held-out samples
    with pytest.raises(ConfigError, match=r"trainer.eval_batches \(2\) global batches of 2 held-out samples \(4\), "
                                          r"but data.num_samples is 3"):
        check_train_layout(cfg, dp=1, cp_impl="ulysses")
    cfg.data.num_samples = 4
    assert check_train_layout(cfg, dp=1, cp_impl="ulysses") == 2

    cfg = tiny_train_config(tmp_path, sample_every=5, sample_count=3)
    cfg.data.num_samples = 2
    with pytest.raises(ConfigError, match=r"trainer.sample_count \(3\) validation videos"):
        check_train_layout(cfg, dp=1, cp_impl="ulysses")


def test_finite_samples_still_pass():
    sample = make_sample("fine", 2 * CHUNK)
    check_sample(sample)
    assert torch.equal(decode_sample(encode_sample(sample)).caption_lengths, sample.caption_lengths)

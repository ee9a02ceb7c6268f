"""tools/distill_report.py's comparison on caption texts (students trained on webdataset shards have no
built-in caption source): the held-out captions are embedded as generation embeds them, and every video of
`held_out` is generated with its own captions."""

from __future__ import annotations

import json

import pytest
import torch

from magi_train.model.text.hash import HashTextEncoder
from magi_train.model.dit import build_dit
from magi_train.training.evaluation.distill_report import compare_steps, hashed_held_out
from tests.configs import tiny_model

VIDEOS = [["a red circle moves right on the left", "the red circle moves down"],
          ["a blue square stays still in the center", "the blue square moves left"]]


def test_hashed_held_out_embeds_each_chunk_caption_as_generation_does():
    cfg = tiny_model()
    held_out = hashed_held_out(cfg, VIDEOS)
    encoder = HashTextEncoder(dim=cfg.caption_channels, max_length=cfg.caption_max_length)
    assert len(held_out) == 2
    for (caption, mask), texts in zip(held_out, VIDEOS):
        want, want_mask = encoder.encode(texts)
        assert caption.shape == (2, cfg.caption_max_length, cfg.caption_channels)
        assert torch.equal(caption, want) and torch.equal(mask, want_mask)
    pairs = HashTextEncoder(dim=cfg.caption_channels, max_length=cfg.caption_max_length, bigrams=True)
    for (caption, _), texts in zip(hashed_held_out(cfg, VIDEOS, bigrams=True), VIDEOS):
        assert torch.equal(caption, pairs.encode(texts)[0])


def random_state(cfg, group):
    torch.manual_seed(0)
    model = build_dit(cfg, tp_group=group)
    with torch.no_grad():  # the zero-initialised output layer would make every velocity (and error) 0
        model.final_linear.linear.weight.normal_(0, 0.05)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_compare_steps_generates_the_given_captions(single_process_group):
    cfg = tiny_model(chunk_width=2)
    teacher = random_state(cfg, single_process_group)
    student = random_state(tiny_model(chunk_width=2, distill=True), single_process_group)
    held_out = hashed_held_out(cfg, VIDEOS)
    with pytest.raises(ValueError, match="latent_hw"):
        compare_steps(teacher, student, cfg, None, steps=[8], held_out=held_out)
    [report] = compare_steps(teacher, student, cfg, None, steps=[8], held_out=held_out, latent_hw=(4, 4))
    assert report.samples == 2 and len(report.per_sample) == 2
    # Another caption for the second video changes its errors, not the first video's.
    other = hashed_held_out(cfg, [VIDEOS[0], ["a green triangle moves up", "the green triangle moves right"]])
    [again] = compare_steps(teacher, student, cfg, None, steps=[8], held_out=other, latent_hw=(4, 4))
    assert again.per_sample[0] == report.per_sample[0]
    assert again.per_sample[1] != report.per_sample[1]


def test_the_report_reads_the_shards_text_encoder(tmp_path):
    from tools.distill_report import shards_text_encoder

    assert shards_text_encoder(str(tmp_path)) is None  # no prepare.json
    (tmp_path / "prepare.json").write_text(json.dumps({"text_encoder": "hash_bigram:64"}))
    assert shards_text_encoder(str(tmp_path)) == "hash_bigram"
    (tmp_path / "prepare.json").write_text("{not json")
    assert shards_text_encoder(str(tmp_path)) is None
    assert shards_text_encoder(str(tmp_path / "shard-{000000..000003}.tar")) is None

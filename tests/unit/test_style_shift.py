"""The one-style synthetic dataset (data.style_colour) and the colour-share measure of the style-LoRA experiment."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from magi_train.config.schema import DataConfig, TrainConfig
from magi_train.config.validate import validate
from magi_train.data.synthetic import PALETTE, SyntheticBlobDataset
from magi_train.training.evaluation.style_shift import caption_colour, colour_masses, measure
from tests.configs import tiny_model


def dataset(**changes) -> SyntheticBlobDataset:
    cfg = DataConfig(num_samples=32, chunks_per_sample=2, latent_height=8, latent_width=8, caption_length=16, **changes)
    return SyntheticBlobDataset(cfg, 64, 64)


def dominant(latent: torch.Tensor) -> str:
    return PALETTE[int(colour_masses(latent[None]).argmax())]


def test_colour_masses_find_the_colour_each_caption_names():
    ds = dataset(num_blobs=1)
    for i in range(len(ds)):
        item = ds[i]
        assert dominant(item["latent"]) == caption_colour(item["text"][0]), item["text"][0]


def test_colour_masses_are_exact_for_a_pure_signature():
    from magi_train.data.synthetic import colour_signature

    sig = torch.from_numpy(colour_signature("cyan", 16))
    latent = (2.5 * sig)[None, :, None, None, None].expand(1, 16, 3, 2, 2)
    masses = colour_masses(latent)
    assert masses[PALETTE.index("cyan")].item() == pytest.approx(2.5 * 12)
    assert masses.sum().item() == pytest.approx(2.5 * 12)


def test_style_colour_paints_every_blob_and_keeps_the_captions():
    plain, styled = dataset(num_blobs=2), dataset(num_blobs=2, style_colour="red")
    for i in range(16):
        a, b = plain[i], styled[i]
        assert a["text"] == b["text"]  # the style is not in the text
        assert torch.equal(a["caption"], b["caption"])
        assert dominant(b["latent"]) == "red"
        named = {w for w in a["text"][0].replace(",", " ").split() if w in PALETTE}
        if "red" not in named:
            assert not torch.equal(a["latent"], b["latent"])
            assert dominant(a["latent"]) != "red"


def test_style_colour_must_be_a_palette_colour():
    with pytest.raises(ValueError, match=r"data\.style_colour \('magenta'\) must be one of"):
        dataset(style_colour="magenta")
    with pytest.raises(ValueError, match=r"data\.style_colour \('magenta'\)"):
        validate(replace(TrainConfig(), data=DataConfig(style_colour="magenta")))
    with pytest.raises(ValueError, match=r"data\.style_colour applies to data\.kind=synthetic only"):
        validate(replace(TrainConfig(), data=DataConfig(kind="webdataset", shards="x", seq_length=64,
                                                        style_colour="red")))


def test_caption_colour_names_the_first_palette_word():
    assert caption_colour("a blue blob moves right, a red blob stays still") == "blue"
    with pytest.raises(ValueError, match="names no palette colour"):
        caption_colour("a blob moves right")


def test_measure_scores_identical_models_identically():
    """The same model as base and adapted gives the same scores (same captions, same noise): the measure
    compares like with like, and skips held-out captions that name the style colour."""
    from magi_train.model.dit import build_dit

    torch.manual_seed(0)
    model = build_dit(tiny_model(num_layers=1)).eval()
    data = DataConfig(num_samples=32, chunks_per_sample=1, latent_height=8, latent_width=8, caption_length=16)
    report = measure(model, model, model.cfg, data, "green", steps=4, samples=3)
    assert report.scores["base"] == report.scores["adapted"]
    assert [r["named"] for r in report.per_sample] and all(r["named"] != "green" for r in report.per_sample)
    assert len(report.lines()) == 4

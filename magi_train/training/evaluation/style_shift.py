"""Does a style adapter move generations towards its style? Colour shares of generated synthetic latents.

The synthetic dataset (magi_train/data/synthetic.py) draws each palette colour as a fixed channel signature,
so the colours present in a generated latent can be read off analytically: per latent pixel, the least-squares
amplitudes of the eight signatures (they are not orthogonal, and least squares undoes their cross-talk), kept
where positive and summed over the video. A colour's *share* is its part of that total.

`measure` generates t2v videos from held-out captions of the ordinary (all-colour) dataset that name some
colour other than the style's, once with the base model and once with the adapted one (same captions, same
noise), and reports per model:

    style share      the mean share of the style colour          (base: small; a working adapter: large)
    style dominant   how often the style colour has the largest share
    prompt dominant  how often the colour the caption names has the largest share (the base follows the text)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List

import numpy as np
import torch

from magi_train.config.schema import DataConfig, ModelConfig, SamplerConfig
from magi_train.data.synthetic import PALETTE, SyntheticBlobDataset, colour_signature
from magi_train.training.evaluation.distill_report import generate

HELD_OUT_SEED_OFFSET = 1_000_000  # as the trainer's held-out set


def colour_masses(latent: torch.Tensor) -> torch.Tensor:
    """(1, C, T, H, W) latent -> (len(PALETTE),) float64: each colour's positive least-squares amplitude summed
    over all latent pixels."""
    channels = latent.shape[1]
    signatures = torch.from_numpy(np.stack([colour_signature(c, channels) for c in PALETTE]))  # (K, C)
    pixels = latent[0].double().reshape(channels, -1)  # (C, N)
    amplitudes = torch.linalg.lstsq(signatures.T, pixels).solution  # (K, N): pixels ~ signatures.T @ amplitudes
    return amplitudes.clamp(min=0).sum(dim=1)


def caption_colour(text: str) -> str:
    """The palette colour a synthetic caption names first ("a red blob moves ..." -> "red")."""
    for word in text.replace(",", " ").split():
        if word in PALETTE:
            return word
    raise ValueError(f"caption {text!r} names no palette colour")


@dataclass
class StyleShift:
    style: str
    steps: int
    samples: int
    scores: Dict[str, Dict[str, float]]  # model ("base", "adapted") -> {style_share, style_dominant, prompt_dominant}
    per_sample: List[Dict[str, object]]

    def lines(self) -> List[str]:
        out = [f"{self.samples} held-out captions naming colours other than {self.style!r}, {self.steps} sampler "
               f"steps each:",
               f"  {'model':<9} {'style share':>12} {'style dominant':>15} {'prompt dominant':>16}"]
        for model, s in self.scores.items():
            out.append(f"  {model:<9} {s['style_share']:>12.3f} {s['style_dominant']:>15.0%} "
                       f"{s['prompt_dominant']:>16.0%}")
        return out


def measure(base: torch.nn.Module, adapted: torch.nn.Module, model_cfg: ModelConfig, data_cfg: DataConfig,
            style: str, steps: int = 32, samples: int = 8, seed: int = 0) -> StyleShift:
    """Generate `samples` held-out captions (the ordinary dataset's, data seed + 1e6, skipping those that name
    `style`) with `base` and `adapted` from the same noise (`seed + i`), three-pass guidance as released."""
    if style not in PALETTE:
        raise ValueError(f"style colour {style!r} is not one of {list(PALETTE)}")
    held_out = SyntheticBlobDataset(replace(data_cfg, seed=data_cfg.seed + HELD_OUT_SEED_OFFSET, style_colour=""),
                                    model_cfg.caption_channels, model_cfg.caption_max_length)
    sampler_cfg = SamplerConfig(cfg_number=3, num_steps=steps)
    hw = (data_cfg.latent_height, data_cfg.latent_width)
    style_k = PALETTE.index(style)
    rows: List[Dict[str, object]] = []
    index = 0
    while len(rows) < samples:
        if index >= len(held_out):
            raise ValueError(f"the held-out set ({len(held_out)} samples) has fewer than {samples} captions that "
                             f"do not name {style!r}")
        item, index = held_out[index], index + 1
        named = caption_colour(item["text"][0])
        if named == style:
            continue
        args = (item["caption"], item["caption_mask"], data_cfg.chunks_per_sample, hw, seed + len(rows))
        row: Dict[str, object] = {"caption": item["text"][0], "named": named}
        for label, model in (("base", base), ("adapted", adapted)):
            masses = colour_masses(generate(model, sampler_cfg, *args))
            shares = masses / masses.sum().clamp(min=1e-12)
            row[label] = {"style_share": float(shares[style_k]), "dominant": PALETTE[int(shares.argmax())]}
        rows.append(row)

    def score(label: str) -> Dict[str, float]:
        got = [r[label] for r in rows]
        return {"style_share": sum(g["style_share"] for g in got) / len(got),
                "style_dominant": sum(g["dominant"] == style for g in got) / len(got),
                "prompt_dominant": sum(g["dominant"] == r["named"] for g, r in zip(got, rows)) / len(got)}

    return StyleShift(style, steps, samples, {"base": score("base"), "adapted": score("adapted")}, rows)

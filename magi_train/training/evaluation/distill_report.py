"""How well a distilled model reproduces its teacher: few-step samples against the teacher's 64-step samples.

For each held-out caption and noise seed, three generations run through the inference sampler
(`StaircaseSampler`, exactly as `magi_infer/generate.py` runs them):

    reference   the base (teacher) model, 64 steps, three-pass guidance   (what distillation imitates)
    base@N      the same base model with only N steps, three-pass guidance (the undistilled shortcut)
    student@N   the distilled model, N steps, one pass per step             (step-size input 64/N / 2)

and the error of a generation is the mean squared difference of its final latents from the reference's.
Distillation worked when student@N is closer to the reference than base@N.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from magi_train.config.schema import DataConfig, ModelConfig, SamplerConfig
from magi_train.data.synthetic import SyntheticBlobDataset
from magi_train.diffusion.sampler import StaircaseSampler
from magi_train.parallel.parallelize import build_model
from magi_train.training.evaluation.videos import build_captions, latent_channels


@dataclass
class DistillReport:
    steps: int
    samples: int
    base_error: float  # mean squared latent difference of base@steps from the 64-step reference
    student_error: float  # the same for student@steps
    per_sample: List[Dict[str, float]]

    def lines(self) -> List[str]:
        return [f"{self.samples} held-out samples, error = mean squared latent difference from the teacher's 64-step "
                f"samples:",
                f"  undistilled base model, {self.steps} steps: {self.base_error:.5f}",
                f"  distilled student,      {self.steps} steps: {self.student_error:.5f}"
                + (f"  ({self.student_error / self.base_error:.2f}x)" if self.base_error > 0 else "")]


@torch.no_grad()
def generate(model, sampler_cfg: SamplerConfig, caption, mask, num_chunks: int, latent_hw, seed: int) -> torch.Tensor:
    """The final latents (1, C, T, H, W) of one t2v generation (noise from a CPU generator seeded `seed`)."""
    captions = build_captions(caption, mask, model.y_embedder.null_caption_embedding.detach(),
                              model.cfg.null_caption_length, num_chunks)
    H, W = latent_hw
    noise = torch.randn(1, latent_channels(model), num_chunks * model.cfg.chunk_width, H, W,
                        generator=torch.Generator().manual_seed(seed))
    chunks = [c.latent for c in StaircaseSampler(model, sampler_cfg).sample(noise, captions)]
    return torch.cat(chunks, dim=2)


def compare(teacher_state: Dict[str, torch.Tensor], student_state: Dict[str, torch.Tensor], model_cfg: ModelConfig,
            data_cfg: DataConfig, steps: int = 8, samples: int = 8, seed: int = 0,
            nearly_clean_weight: float = 0.7, guidance: Sequence[Sequence[float]] = ()) -> DistillReport:
    """Reference / base@steps / student@steps over `samples` held-out synthetic captions (data seed + 1e6, as the
    trainer's held-out set). `guidance` = (cfg_t_range, prev_chunk_scales, text_scales) of the teacher, default
    the released ones; `nearly_clean_weight` as the distilled sampler's blend (released 0.7)."""
    return compare_steps(teacher_state, student_state, model_cfg, data_cfg, [steps], samples, seed,
                         nearly_clean_weight, guidance)[0]


HeldOut = Tuple[torch.Tensor, torch.Tensor]  # one video's captions (num_chunks, L, C) and mask (num_chunks, L)


def synthetic_held_out(model_cfg: ModelConfig, data_cfg: DataConfig, samples: int) -> List[HeldOut]:
    """The synthetic dataset's held-out captions (data seed + 1e6, as the trainer's held-out set)."""
    held_out = SyntheticBlobDataset(replace(data_cfg, seed=data_cfg.seed + 1_000_000), model_cfg.caption_channels,
                                    model_cfg.caption_max_length)
    return [(item["caption"], item["caption_mask"]) for item in (held_out[i] for i in range(samples))]


def hashed_held_out(model_cfg: ModelConfig, videos: Sequence[Sequence[str]], bigrams: bool = False
                    ) -> List[HeldOut]:
    """Per-chunk caption texts of each video embedded by the hash text encoder (`bigrams`: hash_bigram), as
    generation embeds them (magi_infer/engine.py: dim = caption_channels, max_length = caption_max_length)."""
    from magi_train.model.text.hash import HashTextEncoder

    encoder = HashTextEncoder(dim=model_cfg.caption_channels, max_length=model_cfg.caption_max_length,
                              bigrams=bigrams)
    return [encoder.encode(list(texts)) for texts in videos]


def compare_steps(teacher_state: Dict[str, torch.Tensor], student_state: Dict[str, torch.Tensor],
                  model_cfg: ModelConfig, data_cfg: DataConfig, steps: Sequence[int], samples: int = 8, seed: int = 0,
                  nearly_clean_weight: float = 0.7, guidance: Sequence[Sequence[float]] = (),
                  held_out: Optional[Sequence[HeldOut]] = None,
                  latent_hw: Optional[Tuple[int, int]] = None) -> List[DistillReport]:
    """`compare` at several step counts (e.g. 8 and 4), each sample's 64-step reference generated once.
    `held_out` (with `latent_hw`): the captions to generate instead of the synthetic dataset's (`samples` and
    the data config's latent size and chunk count are then unused: a video has one caption row per chunk)."""
    if not steps:
        raise ValueError("compare_steps needs at least one step count")
    if held_out is None:
        held_out = synthetic_held_out(model_cfg, data_cfg, samples)
        latent_hw = (data_cfg.latent_height, data_cfg.latent_width)
    elif latent_hw is None:
        raise ValueError("compare_steps: held_out captions need latent_hw (the latent height and width)")
    base = build_model(replace(model_cfg, distill=False), teacher_state, "teacher").eval()
    student = build_model(replace(model_cfg, distill=True), student_state, "student").eval()
    scales = dict(zip(("cfg_t_range", "prev_chunk_scales", "text_scales"), guidance)) if guidance else {}
    reference_cfg = SamplerConfig(cfg_number=3, num_steps=64, **scales)
    rows: Dict[int, List[Dict[str, float]]] = {k: [] for k in steps}
    for i, (caption, mask) in enumerate(held_out):
        args = (caption, mask, caption.shape[0], latent_hw, seed + i)
        reference = generate(base, reference_cfg, *args)
        for k in steps:
            base_cfg = SamplerConfig(cfg_number=3, num_steps=k, **scales)
            student_cfg = SamplerConfig(cfg_number=1, num_steps=k, nearly_clean_weight=nearly_clean_weight)
            rows[k].append({"base": float((generate(base, base_cfg, *args) - reference).square().mean()),
                            "student": float((generate(student, student_cfg, *args) - reference).square().mean())})
    mean = lambda got, key: sum(r[key] for r in got) / len(got)  # noqa: E731
    return [DistillReport(k, len(held_out), mean(rows[k], "base"), mean(rows[k], "student"), rows[k]) for k in steps]

"""Per-chunk caption rows for the DiT's cross-attention, built the way the released MAGI-1 pipeline builds them.

Every latent chunk has its own caption row, in two versions stacked on dim 0:

* row 0, conditional: for a generated chunk, learned special tokens followed by the T5 features of its prompt,
  cut to the caption length L. The tokens are *prepended* one at a time in the order of `CaptionOptions.keys()`,
  so they end up in reverse order; with the released defaults (HQ, then DURATION) a row reads
  ``[DURATION_k, HQ, t5_0, t5_1, ...]``. The duration token tells the model how many chunks follow this one.
  A clean prefix chunk (v2v) gets the null caption with an all-zero mask: it is only ever run with row 1.
* row 1, unconditional: the model's learned `null_caption_embedding`, valid on its first 50 positions (a length
  fixed in training), optionally preceded by the negative tokens [BORDERNESS, TRANS, LOGO, CAPTION].

Chunk-wise prompting: prompt j conditions generated chunk j (chunk index counted after the clean prefix chunks);
when there are fewer prompts than generated chunks the last prompt covers the rest, so a single prompt conditions
the whole video (the released behaviour). More prompts than generated chunks is an error.

A prompt whose mask is all zero means "no prompt": its chunks take the null row as their conditional row. When no
prompt has a valid token, both rows of every chunk are null rows (the released rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

# Rows of `other_tokens` in the released special_tokens.npz (the names are the released ones; their effect is
# only known from them).
_TRANS, _HQ, _STATIC_FIRST_FRAMES, _DYNAMIC_FIRST_FRAMES, _BORDERNESS = 0, 1, 2, 3, 4
_DURATION_FIRST, DURATION_TOKENS = 7, 8  # DURATION_TOKEN_1..8 = other_tokens[7..14]
_THREE_D_MODEL, _TWO_D_ANIME = 15, 16

NULL_CAPTION_LENGTH = 50  # valid positions of the null caption, hard-coded in the released pipeline


@dataclass(frozen=True)
class SpecialTokens:
    """The learned special-token vectors, rounded to fp16 (as in training) and held as fp32."""

    caption: torch.Tensor  # (C,)
    logo: torch.Tensor  # (C,)
    other: torch.Tensor  # (N, C), N >= 17

    @classmethod
    def load(cls, path: str | Path) -> SpecialTokens:
        """Read a special_tokens.npz (caption_token (1, C), logo_token (1, C), other_tokens (N, C))."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"special-token file not found: {path}")
        with np.load(path) as npz:
            missing = {"caption_token", "logo_token", "other_tokens"} - set(npz.files)
            if missing:
                raise ValueError(f"{path} lacks {sorted(missing)}")
            # The float16 step is part of the recipe: the released code rounds the float64 file to fp16 before
            # use, and the DiT was trained on those rounded vectors.
            arrays = {name: torch.from_numpy(npz[name].astype(np.float16)).float() for name in npz.files}
        tokens = cls(arrays["caption_token"].reshape(-1), arrays["logo_token"].reshape(-1), arrays["other_tokens"])
        if tokens.other.ndim != 2 or tokens.other.shape[0] <= _TWO_D_ANIME:
            raise ValueError(
                f"{path}: other_tokens must be (>= {_TWO_D_ANIME + 1}, C), got {tuple(tokens.other.shape)}"
            )
        if not tokens.caption.shape == tokens.logo.shape == tokens.other.shape[1:]:
            raise ValueError(f"{path}: token widths differ ({tokens.caption.shape}, {tokens.logo.shape}, "
                             f"{tokens.other.shape})")
        return tokens

    @property
    def width(self) -> int:
        return int(self.other.shape[1])

    @property
    def trans(self) -> torch.Tensor:
        return self.other[_TRANS]

    @property
    def hq(self) -> torch.Tensor:
        return self.other[_HQ]

    @property
    def static_first_frames(self) -> torch.Tensor:
        return self.other[_STATIC_FIRST_FRAMES]

    @property
    def dynamic_first_frames(self) -> torch.Tensor:
        return self.other[_DYNAMIC_FIRST_FRAMES]

    @property
    def borderness(self) -> torch.Tensor:
        return self.other[_BORDERNESS]

    @property
    def three_d_model(self) -> torch.Tensor:
        return self.other[_THREE_D_MODEL]

    @property
    def two_d_anime(self) -> torch.Tensor:
        return self.other[_TWO_D_ANIME]

    def duration(self, index: int) -> torch.Tensor:
        """Duration token `index` in 0..7 (released DURATION_TOKEN_{index+1}); see `duration_index`."""
        if not 0 <= index < DURATION_TOKENS:
            raise ValueError(f"duration token index must be in 0..{DURATION_TOKENS - 1}, got {index}")
        return self.other[_DURATION_FIRST + index]

    def named(self, key: str) -> torch.Tensor:
        """A token by its `CaptionOptions` name (not the duration token, which depends on the chunk)."""
        if key == "caption":
            return self.caption
        if key == "logo":
            return self.logo
        return getattr(self, key)


def duration_index(chunk: int, generated_chunks: int) -> int:
    """Duration token for generated chunk `chunk` of `generated_chunks`: chunks after it, capped at 7."""
    return min(generated_chunks - chunk - 1, DURATION_TOKENS - 1)


@dataclass(frozen=True)
class CaptionOptions:
    """Which special tokens enter the caption rows. Defaults are the released run script's (PAD_HQ, PAD_DURATION)."""

    hq: bool = True
    duration: bool = True
    negative_tokens: bool = False  # released NEG_PROMPT: tokens before the null caption
    static_first_frames: bool = False
    dynamic_first_frames: bool = False
    borderness: bool = False
    three_d_model: bool = False
    two_d_anime: bool = False

    def keys(self) -> list[str]:
        """Positive tokens in prepend order (so the row holds them reversed); "duration" is always last."""
        order = ["static_first_frames", "dynamic_first_frames", "borderness", "hq", "three_d_model", "two_d_anime",
                 "duration"]
        return [key for key in order if getattr(self, key)]

    def negative_keys(self) -> list[str]:
        """Tokens prepended to the null caption, in prepend order."""
        return ["caption", "logo", "trans", "borderness"] if self.negative_tokens else []


class CaptionRows(NamedTuple):
    y: torch.Tensor  # (2, n_chunks, L, C) float32; [0] conditional, [1] null
    mask: torch.Tensor  # (2, n_chunks, L) float32, 1 = attend


def _prepend(tokens: list[torch.Tensor], features: torch.Tensor, length: int) -> torch.Tensor:
    """Prepend `tokens` one by one (each in front of the previous), keep the first `length` positions."""
    front = torch.stack(tokens[::-1]) if tokens else features[:0]
    return torch.cat([front, features])[:length]


def build_caption_rows(
    prompt_embs: torch.Tensor,
    prompt_masks: torch.Tensor,
    *,
    special_tokens: SpecialTokens | None,
    null_caption_embedding: torch.Tensor,
    infer_chunk_num: int,
    clean_chunk_num: int = 0,
    options: CaptionOptions = CaptionOptions(),
    caption_length: int | None = None,
    null_length: int = NULL_CAPTION_LENGTH,
) -> CaptionRows:
    """Caption rows for a generation of `infer_chunk_num` latent chunks, the first `clean_chunk_num` clean.

    prompt_embs (K, P, C) and prompt_masks (K, P): T5 output for K >= 1 prompts, one per generated chunk (see the
    module docstring for how prompts map to chunks). null_caption_embedding (L, C): the DiT's
    `y_embedder.null_caption_embedding`; L is the caption length (`caption_length`, if given, must equal it).
    The result is on the null caption's device.
    """
    null = null_caption_embedding.detach().float()
    if null.ndim != 2:
        raise ValueError(f"null_caption_embedding must be (caption_length, caption_channels), got {tuple(null.shape)}")
    length, width = null.shape
    if caption_length is not None and caption_length != length:
        raise ValueError(f"caption_length {caption_length} does not match the null caption's {length} rows")
    if prompt_embs.ndim != 3 or prompt_masks.shape != prompt_embs.shape[:2]:
        raise ValueError(f"prompt embeddings must be (prompts, tokens, channels) with masks (prompts, tokens), got "
                         f"{tuple(prompt_embs.shape)} and {tuple(prompt_masks.shape)}")
    num_prompts, prompt_tokens, prompt_width = prompt_embs.shape
    if num_prompts == 0:
        raise ValueError("at least one prompt is needed (an all-zero mask stands for 'no prompt')")
    if prompt_width != width:
        raise ValueError(f"prompt embedding width {prompt_width} does not match the model's caption_channels "
                         f"{width} (width of null_caption_embedding)")
    if special_tokens is None:
        if options.keys() or options.negative_keys():
            raise ValueError(f"special tokens {options.keys() + options.negative_keys()} are enabled but no "
                             "special-token file was given")
    elif special_tokens.width != width:
        raise ValueError(f"special-token width {special_tokens.width} does not match the model's caption_channels "
                         f"{width}")
    if not 0 < null_length <= length:
        raise ValueError(f"null_length must be in 1..{length}, got {null_length}")
    generated = infer_chunk_num - clean_chunk_num
    if clean_chunk_num < 0 or generated < 1:
        raise ValueError(f"need 0 <= clean_chunk_num < infer_chunk_num, got clean_chunk_num={clean_chunk_num}, "
                         f"infer_chunk_num={infer_chunk_num}")
    if num_prompts > generated:
        raise ValueError(f"{num_prompts} prompts given but only {generated} chunks are generated "
                         f"(one prompt per generated chunk at most)")
    keys = options.keys()
    if prompt_tokens + len(keys) < length:
        raise ValueError(f"prompt rows have {prompt_tokens} tokens; with {len(keys)} special tokens that is short of "
                         f"the caption length {length} (encode prompts with max_length >= {length - len(keys)})")

    device = null.device
    embs = prompt_embs.detach().to(device=device, dtype=torch.float32)
    masks = prompt_masks.detach().to(device=device, dtype=torch.float32)

    def token(key: str, generated_index: int) -> torch.Tensor:
        if key == "duration":
            return special_tokens.duration(duration_index(generated_index, generated)).to(device)
        return special_tokens.named(key).to(device)

    negative = [special_tokens.named(key).to(device) for key in options.negative_keys()]
    null_row = _prepend(negative, null, length)
    null_mask = torch.zeros(length, device=device)
    null_mask[:null_length] = 1.0

    cond_rows, cond_masks = [], []
    for chunk in range(infer_chunk_num):
        index = chunk - clean_chunk_num
        prompt = min(index, num_prompts - 1)
        if index < 0:  # clean prefix chunk: never conditioned on text
            cond_rows.append(null)
            cond_masks.append(torch.zeros(length, device=device))
        elif masks[prompt].sum() == 0:  # "no prompt" for this chunk
            cond_rows.append(null_row)
            cond_masks.append(null_mask)
        else:
            tokens = [token(key, index) for key in keys]
            cond_rows.append(_prepend(tokens, embs[prompt], length))
            cond_masks.append(_prepend([torch.ones((), device=device)] * len(keys), masks[prompt], length))

    null_rows = null_row.expand(infer_chunk_num, length, width)
    null_masks = null_mask.expand(infer_chunk_num, length)
    if masks.sum() == 0:  # no prompt at all: the released pipeline makes every row null, clean chunks included
        return CaptionRows(torch.stack([null_rows, null_rows]), torch.stack([null_masks, null_masks]))
    y = torch.stack([torch.stack(cond_rows), null_rows])
    return CaptionRows(y, torch.stack([torch.stack(cond_masks), null_masks]))

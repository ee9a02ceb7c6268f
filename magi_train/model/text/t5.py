"""The T5 text encoder MAGI-1 conditions on: the t5-v1_1-xxl encoder in fp32, from a local directory.

The encoder is built once and kept: the inference engine serves many requests and reloading ~20 GB of weights per
prompt would dominate the latency. Prompts are cleaned (`prepare_prompt`), tokenised to exactly `max_length`
tokens (padding and truncation, EOS appended) and encoded. The features of padded positions are returned as the
encoder computed them, not zeroed: the released pipeline keeps them and relies on the mask alone, so zeroing them
would change nothing that is used but would make our rows differ from the released ones.
"""

from __future__ import annotations

from pathlib import Path

import torch

from magi_train.model.text.clean import prepare_prompt
from magi_train.model.text.extra import t5_dependency

# The released layout keeps the encoder in a sub-folder of `t5_pretrained`.
RELEASED_SUBDIR = "t5-v1_1-xxl"


def resolve_t5_directory(directory: str | Path) -> Path:
    """The folder that holds the T5 files: `directory` itself, or its `t5-v1_1-xxl/` sub-folder."""
    root = Path(directory).expanduser()
    nested = root / RELEASED_SUBDIR
    if (nested / "config.json").is_file():
        return nested
    if (root / "config.json").is_file():
        return root
    raise FileNotFoundError(
        f"no T5 encoder found at {root}: expected {root / 'config.json'} (the t5-v1_1-xxl folder itself) or "
        f"{nested / 'config.json'} (its parent, the released layout)"
    )


class T5TextEncoder:
    """Prompt → (features, mask) with the released tokenisation; the model stays loaded between calls."""

    def __init__(self, directory: str | Path, device: str | torch.device = "cpu", max_length: int = 800) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.path = resolve_t5_directory(directory)
        self.device = torch.device(device)
        self.max_length = max_length
        # Imported here: transformers costs seconds of start-up and is the optional t5 extra.
        transformers = t5_dependency("transformers", "the T5 text encoder (text.encoder=t5)")
        t5_dependency("sentencepiece", "the T5 tokenizer (text.encoder=t5)")
        # local_files_only: a missing file must be an error here, never a silent download attempt.
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        model = transformers.T5EncoderModel.from_pretrained(self.path, dtype=torch.float32, local_files_only=True)
        self.model = model.to(self.device).eval()

    @property
    def width(self) -> int:
        """Feature width (4096 for t5-v1_1-xxl); must equal the DiT's caption_channels."""
        return int(self.model.config.d_model)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Cleaned prompts → input_ids and attention_mask, each (B, max_length)."""
        return self.tokenizer(
            [prepare_prompt(p) for p in prompts],
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,  # appends EOS, as in training
            return_attention_mask=True,
            return_tensors="pt",
        )

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens of each prompt as `tokenize` makes them (cleaned, EOS appended) but before the cut to
        `max_length`: a count above `max_length` means the encoder sees only the first `max_length`."""
        ids = self.tokenizer([prepare_prompt(p) for p in prompts], add_special_tokens=True, truncation=False,
                             verbose=False)["input_ids"]  # verbose=False: no warning about the length we measure
        return [len(row) for row in ids]

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts → features (B, max_length, C) float32 and mask (B, max_length) int64 (1 = token).

        Both are on the encoder's device. Padded positions keep their features; use the mask.
        """
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError("encode expects a non-empty list of prompt strings")
        tokens = self.tokenize(list(prompts))
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        features = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return features.float(), mask

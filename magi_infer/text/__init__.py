"""The text side of inference: caption cleaning, the T5 encoder, and per-chunk caption rows for the DiT."""

from magi_infer.text.clean import clean_caption, prepare_prompt
from magi_infer.text.conditioning import (
    NULL_CAPTION_LENGTH,
    CaptionOptions,
    CaptionRows,
    SpecialTokens,
    build_caption_rows,
    duration_index,
)
from magi_infer.text.t5 import T5TextEncoder, resolve_t5_directory

__all__ = [
    "NULL_CAPTION_LENGTH",
    "CaptionOptions",
    "CaptionRows",
    "SpecialTokens",
    "T5TextEncoder",
    "build_caption_rows",
    "clean_caption",
    "duration_index",
    "prepare_prompt",
    "resolve_t5_directory",
]

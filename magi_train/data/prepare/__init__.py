"""Dataset preparation: captioned videos and images -> webdataset shards of VAE latents and text features.

`tools/prepare_dataset.py` is the command line; data/README.md documents the input lists and the output. The steps,
each in its own module (imports point down this list; `records` holds what they hand each other):

  1. `inputs`: a folder (media files with .json/.txt caption sidecars), a CSV or a JSONL list -> `InputItem`s.
  2. Per clip, in a worker process (`workers`, running `encoders.encode_batch`): decode with PyAV, resample to the
     target fps the way ffmpeg's `fps` filter does, resize the shorter side and centre-crop to the bucket nearest
     in aspect ratio, keep whole chunks (`clips`), VAE-encode; the captions of a batch of clips go through the
     text encoder together (`encoders`). `config` holds the settings and checks them before any model loads.
  3. In the main process (`output.ShardWriter`): samples in `magi_train/data/shards.py`'s format, K per tar shard,
     each shard written under a temporary name and renamed when complete; `manifest.jsonl` records the inputs of
     every completed shard, so `--resume` skips them (`output.Manifest`). `run.run_prepare` drives the steps.

A bad input (missing file, undecodable, no caption, too short, ...) is skipped with a reason, never a crash; the
`Summary` lists them by reason.
"""

from magi_train.data.prepare.clips import (DEFAULT_BUCKETS, Bucket, Clip, FpsResampler, choose_bucket, load_clip,
                                           parse_buckets, resample_counts, resize_crop, resize_crop_geometry)
from magi_train.data.prepare.config import Plan, PrepareConfig, make_plan, parse_text_encoder
from magi_train.data.prepare.encoders import (CaptionEncoder, Encoders, HashCaptions, T5Captions, encode_batch,
                                              load_encoders)
from magi_train.data.prepare.inputs import (IMAGE_SUFFIXES, VIDEO_SUFFIXES, InputItem, caption_rows, read_csv_list,
                                            read_folder, read_inputs, read_jsonl_list, sample_key)
from magi_train.data.prepare.output import (MANIFEST_NAME, PARTIAL_SUFFIX, SETTINGS_NAME, SHARD_NAME, SHARD_RE,
                                            Manifest, ShardWriter)
from magi_train.data.prepare.records import (DUPLICATE, ENCODE_FAILED, MISSING_CAPTION, MISSING_FILE, TOO_SHORT,
                                             UNDECODABLE, WORKER_DIED, Encoded, InputListError, PrepareError, Result,
                                             SkipClip, Skipped)
from magi_train.data.prepare.run import Summary, run_prepare

__all__ = [
    "CaptionEncoder", "Clip", "Bucket", "DEFAULT_BUCKETS", "DUPLICATE", "ENCODE_FAILED", "Encoded", "Encoders",
    "FpsResampler", "HashCaptions", "IMAGE_SUFFIXES", "InputItem", "InputListError", "MANIFEST_NAME",
    "MISSING_CAPTION", "MISSING_FILE", "Manifest", "PARTIAL_SUFFIX", "Plan", "PrepareConfig", "PrepareError",
    "Result", "SETTINGS_NAME", "SHARD_NAME", "SHARD_RE", "ShardWriter", "SkipClip", "Skipped", "Summary",
    "T5Captions", "TOO_SHORT", "UNDECODABLE", "VIDEO_SUFFIXES", "WORKER_DIED", "caption_rows", "choose_bucket",
    "encode_batch", "load_clip", "load_encoders", "make_plan", "parse_buckets", "parse_text_encoder",
    "read_csv_list", "read_folder", "read_inputs", "read_jsonl_list", "resample_counts", "resize_crop",
    "resize_crop_geometry", "run_prepare", "sample_key",
]

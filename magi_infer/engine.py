"""The inference engine: built once (DiT, text encoder, VAE), then serves any number of requests.

A request is turned into latent chunks, captions and an optional prefix; the sampler yields each chunk as
soon as it is clean, and the engine decodes it and appends its frames to the mp4 right away.

Frame accounting (a documented difference from the released pipeline, which rounds up to whole chunks and
for i2v/v2v returns extra frames, model/README.md §11): the output has exactly `num_frames` frames.
* t2v: frames 0..num_frames-1 of the generated video.
* i2v: the video starts at the conditioning image (latent frame 0 is the image latent) and has num_frames
  frames in total.
* v2v: the continuation only; the prefix (any length, rounded down to whole latent frames) is not repeated.
Prefix latent frames are decoded from the clean prefix latents, not from the sampler's final values
(which carry one last Euler increment on top of them).

Checks come first (magi_infer/preflight.py): the constructor checks the config, the model's input directories
and the memory estimate before it reads a weight; `generate` checks the request (output path, prompts, image,
prefix video) before it samples. The video is published only when complete, never over an existing file
unless the request says `overwrite` (magi_train/data/video_io.py `StreamingMp4Writer`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from tqdm import tqdm

from magi_train.parallel.comm import broadcast_tensor
from magi_infer.config import SPATIAL, TEMPORAL, GenerateConfig, runtime_model
from magi_infer.preflight import PreflightError, engine_device, preflight, request_problems
from magi_infer.request import Request
from magi_train.diffusion.sampler import Captions, StaircaseSampler
from magi_train.checkpoint.weights import load_weights
from magi_train.model.dit import DTYPES
from magi_train.parallel.parallelize import build_model
from magi_train.parallel.groups import Parallel

ASSETS = Path(__file__).resolve().parent / "assets"
logger = logging.getLogger(__name__)


@dataclass
class Result:
    output: Path
    frames: int
    chunks: int
    model_calls: int
    seconds: float
    chunk_seconds: List[float] = field(default_factory=list)  # time from start to each chunk's frames on disk


class InferenceEngine:
    """Built on every rank of a model-parallel job (`parallel`: tp x cp x pp ranks, one request at a time).

    Every rank runs the same sampler loop on identical inputs: the noise comes from the seed, the captions
    are encoded on rank 0 and broadcast. The VAE tiles of each chunk are spread over all ranks, and only
    rank 0 writes the video."""

    def __init__(self, cfg: GenerateConfig, parallel: Optional[Parallel] = None):
        self.parallel = parallel
        self.distributed = parallel is not None and parallel.world_size > 1
        self.device = engine_device(cfg, parallel)
        self.is_main = parallel is None or parallel.is_main
        if self.distributed and self.device.type != parallel.device.type:
            raise ValueError(f"device={cfg.device} ({self.device.type}) does not fit the process group's backend "
                             f"(parallel.backend={cfg.parallel.backend}, tensors on {parallel.device.type}): "
                             "nccl needs device=cuda, gloo device=cpu")
        preflight(cfg, parallel)  # the config, the model's inputs and the memory, before any weight is read
        cfg = dataclasses.replace(cfg, model=runtime_model(cfg))  # a copy: the caller's keeps describing the preset
        self.cfg = cfg
        if cfg.ckpt.sha256 is not None:
            self._verify_manifest()
        state, source = load_weights(cfg.ckpt.dir, cfg.model, cfg.sampler.fp8)
        self.model = build_model(cfg.model, state, source, parallel, cfg.sampler.fp8).to(self.device).eval()
        # Every rank builds caption rows, but with pipeline parallelism only the first stage has y_embedder.
        self.null_caption = state["y_embedder.null_caption_embedding"].detach().float().cpu()
        del state
        self.source = source
        from magi_infer.compile import compiled_forward

        self.sampler = StaircaseSampler(self.model, cfg.sampler,
                                        forward=compiled_forward(self.model, cfg.compile, cfg.compile_backend))
        # Rank 0 encodes the prompts and broadcasts the caption rows: one T5 in the job, identical captions.
        self.text_encoder = self._build_text_encoder() if self.is_main else None
        self.special_tokens = self._load_special_tokens() if self.is_main else None
        self.vae = self._build_vae()

    # ------------------------------------------------------------------ components
    def _verify_manifest(self) -> None:
        """Check the released shards against ckpt.sha256 before they are read (the loader checks a SHA256SUMS
        beside them by itself)."""
        from magi_train.checkpoint.magi1 import MANIFEST_NAME, verify_sha256
        from magi_train.checkpoint.variants import Variant, resolve_weight_dir

        ck, mc, fp8 = self.cfg.ckpt, self.cfg.model, self.cfg.sampler.fp8
        weight_dir, _ = resolve_weight_dir(ck.dir, Variant(distill=mc.distill, fp8=fp8),
                                           wanted_by=f"model.distill={mc.distill}, sampler.fp8={fp8}")
        if Path(ck.sha256).resolve() != (weight_dir / MANIFEST_NAME).resolve():
            try:
                verify_sha256(weight_dir, ck.sha256)
            except (OSError, ValueError) as e:
                raise ValueError(f"ckpt.sha256={ck.sha256}: {e}") from e

    def _build_text_encoder(self):
        tc, mc = self.cfg.text, self.cfg.model
        if tc.encoder == "hash":
            from magi_train.model.text.hash import HashTextEncoder

            return HashTextEncoder(dim=mc.caption_channels, max_length=mc.caption_max_length)
        if tc.encoder == "t5":
            from magi_train.model.text.t5 import T5TextEncoder

            if tc.t5_dir is None:
                raise ValueError("text.t5_dir is required for text.encoder=t5 (the t5-v1_1-xxl directory or its parent)")
            return T5TextEncoder(tc.t5_dir, device=tc.device, max_length=tc.max_length)
        raise ValueError(f"text.encoder={tc.encoder!r} is not one of ['t5', 'hash']")

    def _caption_options(self):
        from magi_infer.conditioning import CaptionOptions

        tc = self.cfg.text
        return CaptionOptions(hq=tc.hq, duration=tc.duration, negative_tokens=tc.negative_tokens,
                              static_first_frames=tc.static_first_frames, dynamic_first_frames=tc.dynamic_first_frames,
                              borderness=tc.borderness, three_d_model=tc.three_d_model, two_d_anime=tc.two_d_anime)

    def _load_special_tokens(self):
        from magi_infer.conditioning import SpecialTokens

        options = self._caption_options()
        if not (options.keys() or options.negative_keys()):
            return None
        return SpecialTokens.load(self.cfg.text.special_tokens or ASSETS / "special_tokens.npz")

    def _build_vae(self):
        vc = self.cfg.vae
        if vc.kind == "preview":
            from magi_train.data.preview import LatentPreviewDecoder

            return LatentPreviewDecoder(self.cfg.model.in_channels // (2 if self.cfg.model.half_channel_vae else 1))
        if vc.kind == "vit":
            from magi_train.model.vae import VaeCodec, ViTVAE
            from magi_train.parallel.vae_tiles import SplitTiles

            if vc.dir is None:
                raise ValueError("vae.dir is required for vae.kind=vit (diffusers-style directory of the released VAE)")
            dtype = (torch.bfloat16 if self.device.type == "cuda" else torch.float32) if vc.dtype == "auto" else DTYPES[vc.dtype]
            vae = ViTVAE.from_pretrained(vc.dir, dtype=dtype, device=self.device)
            # Multi-process: every rank codes its share of the tiles and all ranks get the whole result.
            tiles = {} if not self.distributed else dict(tile_map=SplitTiles(self.parallel.groups.mp))
            return VaeCodec(vae, fps=self.cfg.video.fps, tile_px=vc.tile_px, overlap=vc.overlap,
                            scale_factor=vc.scale_factor, **tiles)
        raise ValueError(f"vae.kind={vc.kind!r} is not one of ['vit', 'preview']")

    # ------------------------------------------------------------------ request -> latents
    def _latent_size(self):
        v, mc = self.cfg.video, self.cfg.model
        unit = SPATIAL * mc.patch_size
        if v.height % unit or v.width % unit:
            raise ValueError(f"video.height={v.height} and video.width={v.width} must be multiples of {unit} "
                             f"(VAE factor {SPATIAL} x model.patch_size {mc.patch_size})")
        return v.height // SPATIAL, v.width // SPATIAL

    def _prefix(self, req: Request) -> Optional[torch.Tensor]:
        from magi_train.data.video_io import read_image, read_video

        v = self.cfg.video
        if req.mode == "t2v":
            return None
        if req.mode == "i2v":
            if not req.image:
                raise ValueError("mode=i2v needs image=PATH")
            frames = read_image(req.image, v.height, v.width)
        else:
            if not req.prefix_video:
                raise ValueError("mode=v2v needs prefix_video=PATH")
            frames = read_video(req.prefix_video, v.fps, v.height, v.width, max_frames=req.prefix_frames)
            usable = frames.shape[0] // TEMPORAL * TEMPORAL
            if usable == 0:
                raise ValueError(f"prefix_video={req.prefix_video} has {frames.shape[0]} frames at {v.fps} fps; "
                                 f"v2v needs at least {TEMPORAL}")
            frames = frames[:usable]
        latent = self.vae.encode_frames(frames)
        return latent.to(self.device, torch.float32)

    def _captions(self, prompts: Sequence[str], num_chunks: int, prefix_chunks: int) -> Captions:
        from magi_infer.conditioning import build_caption_rows
        from magi_train.model.text.clean import prepare_prompt

        mc = self.cfg.model
        y = mask = None
        if self.is_main:
            if self.cfg.text.encoder == "t5":
                prompts = [prepare_prompt(p) for p in prompts]
            self._warn_long_prompts(list(prompts))
            emb, emb_mask = self.text_encoder.encode(list(prompts))
            rows = build_caption_rows(emb.float().cpu(), emb_mask.float().cpu(), special_tokens=self.special_tokens,
                                      null_caption_embedding=self.null_caption, infer_chunk_num=num_chunks,
                                      clean_chunk_num=prefix_chunks, options=self._caption_options(),
                                      caption_length=mc.caption_max_length, null_length=mc.null_caption_length)
            y, mask = rows.y.to(self.device), rows.mask.to(self.device)
        if self.distributed:
            group = self.parallel.groups.mp
            y, mask = (broadcast_tensor(v, group, 0, self.device) for v in (y, mask))
        return Captions(y, mask)

    def _warn_long_prompts(self, prompts: List[str]) -> None:
        """The released pipeline cuts a long prompt without a word; we cut it the same way but say so."""
        tc, mc = self.cfg.text, self.cfg.model
        specials = len(self._caption_options().keys())
        limit = min(self.text_encoder.max_length, mc.caption_max_length - specials)
        what = "T5 tokens, EOS included" if tc.encoder == "t5" else "words (hash encoder)"
        limits = (f"text.max_length={tc.max_length}, " if tc.encoder == "t5" else "") + \
            f"model.caption_max_length={mc.caption_max_length} less {specials} special tokens"
        for i, count in enumerate(self.text_encoder.token_counts(prompts)):
            if count > limit:
                logger.warning("prompt %d has %d %s; only the first %d condition the video, the rest is cut (%s)",
                               i, count, what, limit, limits)

    # ------------------------------------------------------------------ generation
    @contextmanager
    def _decoder(self, fn):
        """`submit(chunk)`: decode and write it on the background worker while sampling goes on
        (overlap_decode), or right away; leaving the block waits for the last chunk (and raises its failure)."""
        if not self.cfg.overlap_decode or self.distributed:  # a collective decode must stay in the ranks' order
            yield fn
            return
        from magi_infer.overlap import ChunkWorker

        with ChunkWorker(fn, depth=2) as worker:
            yield lambda chunk: worker.submit(chunk, chunk.latent)

    def generate(self, req: Request, output: Optional[str] = None) -> Result:
        from magi_train.data.video_io import StreamingMp4Writer

        errors = request_problems(self.cfg, req, self.is_main, output)  # before any sampling
        if errors:
            raise PreflightError("cannot generate:\n  " + "\n  ".join(errors))
        start = time.perf_counter()
        cw = self.cfg.model.chunk_width
        h, w = self._latent_size()
        prefix = self._prefix(req)
        P = 0 if prefix is None else prefix.shape[2]
        new_latents = math.ceil(req.num_frames / TEMPORAL)
        # i2v: the image latent is latent frame 0 of the output; v2v: the output follows the prefix.
        total_latents = new_latents if req.mode == "i2v" else P + new_latents
        num_chunks = math.ceil(total_latents / cw)
        captions = self._captions(req.prompts, num_chunks, P // cw)
        gen = torch.Generator(device="cpu").manual_seed(req.seed)  # CPU stream: same noise on any device
        channels = self.cfg.model.in_channels // (2 if self.cfg.model.half_channel_vae else 1)
        noise = torch.randn(1, channels, num_chunks * cw, h, w, generator=gen).to(self.device)

        plans = self.sampler.plans(num_chunks, P // cw)
        out_path = Path(output or req.output)
        v = self.cfg.video
        written, chunk_times = 0, []
        bar = tqdm(total=len(plans), unit="step", disable=not (self.cfg.progress and self.is_main), desc="generating")
        done_chunks = 0

        def on_step(plan) -> None:
            bar.update(1)
            bar.set_postfix(chunks=f"{done_chunks}/{num_chunks - P // cw}")

        # Only rank 0 writes; the other ranks take part in the sampling and the decode (a collective).
        output_file = (StreamingMp4Writer(out_path, v.width, v.height, v.fps, crf=v.crf, overwrite=req.overwrite)
                       if self.is_main else nullcontext())

        def decode_and_write(chunk) -> None:  # in order, one chunk at a time (inline or on the worker)
            nonlocal written, done_chunks
            latent = chunk.latent
            if chunk.prefix_frames:
                lo = chunk.index * cw
                latent[:, :, :chunk.prefix_frames] = prefix[:, :, lo:lo + chunk.prefix_frames]
            frames = self.vae.decode_latents(latent)
            if req.mode == "v2v":
                frames = frames[chunk.prefix_frames * TEMPORAL:]
            frames = frames[: req.num_frames - written]
            if len(frames):
                if writer is not None:
                    writer.write(frames.cpu())
                written += len(frames)
            done_chunks += 1
            chunk_times.append(time.perf_counter() - start)

        with output_file as writer, self._decoder(decode_and_write) as submit:
            for chunk in self.sampler.sample(noise, captions, prefix, on_step=on_step):
                # The sampler's emitted latent is its own copy; cloned again so the decode owns what it edits.
                chunk = dataclasses.replace(chunk, latent=chunk.latent.clone())
                submit(chunk)
        bar.close()
        return Result(out_path, written, num_chunks, len(plans), time.perf_counter() - start, chunk_times)

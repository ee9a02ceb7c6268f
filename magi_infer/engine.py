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
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

import torch
from tqdm import tqdm

from magi_train.parallel.comm import broadcast_tensor
from magi_infer.config import SPATIAL, TEMPORAL, GenerateConfig, lora_entries, runtime_model
from magi_infer.preflight import PreflightError, engine_device, prefix_latent_frames, preflight, request_problems
from magi_infer.live import collapse, expand
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
    prompts: List[str] = field(default_factory=list)  # the prompt of each generated chunk (after live updates)


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
        state, source = load_weights(cfg.ckpt.dir, cfg.model, cfg.sampler.fp8, ema=cfg.ckpt.ema)
        self.model = build_model(cfg.model, state, source, parallel, cfg.sampler.fp8).to(self.device).eval()
        # Every rank builds caption rows, but with pipeline parallelism only the first stage has y_embedder.
        self.null_caption = state["y_embedder.null_caption_embedding"].detach().float().cpu()
        del state
        self.source = source
        # LoRA adapters, unmerged, on the loaded weights: name -> {name, path, scale, sha256} (cfg.lora mirrors it).
        self.adapters = {}
        for entry in lora_entries(cfg.lora):
            self.load_lora(entry["path"], entry["scale"], entry["name"], entry["sha256"])
        from magi_infer.compile import compiled_forward

        self.sampler = StaircaseSampler(self.model, cfg.sampler,
                                        forward=compiled_forward(self.model, cfg.compile, cfg.compile_backend))
        self._samplers = {}  # other step counts asked for by requests (num_steps), built when first asked
        # Rank 0 encodes the prompts and broadcasts the caption rows: one T5 in the job, identical captions.
        self.text_encoder = self._build_text_encoder() if self.is_main else None
        self.special_tokens = self._load_special_tokens() if self.is_main else None
        self.vae = self._build_vae()

    # ------------------------------------------------------------------ LoRA adapters
    def _lora_model(self):
        """The module holding this rank's linears (a pipeline stage's inside its InferencePipeline)."""
        return getattr(self.model, "stage", self.model)

    def _lora_factory(self):
        """Under tensor parallelism the adapters wrap the sharded linears (magi_train/parallel/lora.py)."""
        if not (self.distributed and self.parallel.tp > 1):
            return None
        from magi_train.parallel.lora import parallel_lora_factory  # the trainer's ParallelLoraLinear builder

        return parallel_lora_factory(self._lora_model())

    def load_lora(self, path, scale: float = 1.0, name: Optional[str] = None, sha256: Optional[str] = None) -> str:
        """Add the adapter directory `path` with multiplier `scale` (unmerged); `sha256`: the digest its
        safetensors file must have. Returns its name (default: the directory's name). Every rank calls it."""
        from magi_train.checkpoint.adapters import adapter_digest, base_model_identity
        from magi_train.model.lora import default_adapter_name, load_adapter

        model = self._lora_model()
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"lora adapter {path} does not exist")
        digest = adapter_digest(path)
        if sha256 is not None and digest != sha256:
            raise ValueError(f"lora adapter {path}: its safetensors file has sha256 {digest}, not the {sha256} "
                             "asked for (another adapter, or a damaged copy)")
        if name is not None and name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is loaded already ({self.adapters[name]['path']})")
        # Named here, from what is loaded on every rank (a pipeline stage may hold none of some adapter's modules).
        name = default_adapter_name(path, self.adapters) if name is None else name
        # A pipeline stage holds only its layers' linears; the other stages adapt the rest.
        name = load_adapter(model, path, name=name, scale=scale, base_model=base_model_identity(self.cfg.model),
                            require_all=not (self.distributed and self.parallel.pp > 1), factory=self._lora_factory())
        self.adapters[name] = {"name": name, "path": str(path.resolve()), "scale": float(scale), "sha256": digest}
        self._sync_lora_config()
        logger.info("LoRA adapter %s loaded from %s (scale %g)", name, path, scale)
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        from magi_train.model.lora import adapter_names, set_lora_scale

        self._known_adapter(name)
        if name in adapter_names(self._lora_model()):  # a pipeline stage may hold none of its modules
            set_lora_scale(self._lora_model(), name, scale)
        self.adapters[name]["scale"] = float(scale)
        self._sync_lora_config()

    def unload_lora(self, name: str) -> None:
        """Remove adapter `name`; with none left the model is the plain loaded one again."""
        from magi_train.model.lora import adapter_names, remove_lora

        self._known_adapter(name)
        if name in adapter_names(self._lora_model()):
            remove_lora(self._lora_model(), name)
        del self.adapters[name]
        self._sync_lora_config()

    def _known_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"no LoRA adapter named {name!r} is loaded (loaded: {list(self.adapters)})")

    def _sync_lora_config(self) -> None:
        """cfg.lora says what is applied now (the sidecar records it): paths, scales, sha256 of each file."""
        self.cfg = dataclasses.replace(self.cfg, lora=[dict(a) for a in self.adapters.values()])

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
        if tc.encoder in ("hash", "hash_bigram"):
            from magi_train.model.text.hash import HashTextEncoder

            return HashTextEncoder(dim=mc.caption_channels, max_length=mc.caption_max_length,
                                   bigrams=tc.encoder == "hash_bigram")
        if tc.encoder == "t5":
            from magi_train.model.text.t5 import T5TextEncoder

            if tc.t5_dir is None:
                raise ValueError("text.t5_dir is required for text.encoder=t5 (the t5-v1_1-xxl directory or its parent)")
            return T5TextEncoder(tc.t5_dir, device=tc.device, max_length=tc.max_length)
        raise ValueError(f"text.encoder={tc.encoder!r} is not one of ['t5', 'hash', 'hash_bigram']")

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
        if req.mode == "v2v" and req.prefix_latents is not None:
            return prefix_latent_frames(req).to(self.device, torch.float32)
        from magi_infer.inputs import as_uint8_frames, is_path, resize_frames

        if req.mode == "i2v":
            if req.image is None or (is_path(req.image) and not str(req.image)):
                raise ValueError("mode=i2v needs image=PATH")
            frames = read_image(req.image, v.height, v.width) if is_path(req.image) else \
                resize_frames(as_uint8_frames(req.image, "image", 3)[None], v.height, v.width)
        else:
            if req.prefix_video is None or (is_path(req.prefix_video) and not str(req.prefix_video)):
                raise ValueError("mode=v2v needs prefix_video=PATH")
            if is_path(req.prefix_video):
                frames = read_video(req.prefix_video, v.fps, v.height, v.width, max_frames=req.prefix_frames)
            else:
                frames = resize_frames(as_uint8_frames(req.prefix_video, "prefix_video", 4)[:req.prefix_frames],
                                       v.height, v.width)
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

    def _sampler_for(self, num_steps: Optional[int]) -> StaircaseSampler:
        """The sampler of the config, or one with another number of steps per chunk (built once per count)."""
        if num_steps is None or num_steps == self.cfg.sampler.num_steps:
            return self.sampler
        samplers = self._samplers
        if num_steps not in samplers:
            from magi_infer.config import validate_generate

            cfg = dataclasses.replace(self.cfg, sampler=dataclasses.replace(self.cfg.sampler, num_steps=num_steps))
            validate_generate(cfg)  # steps must fit the window and the kv ranges
            samplers[num_steps] = StaircaseSampler(self.model, cfg.sampler, forward=self.sampler._dit)
        return samplers[num_steps]

    def _start(self, req: Request, output: Optional[str], check_output: bool) -> _Run:
        """Check the request, then everything the sampling loop needs (prefix latents, captions, noise, plans)."""
        if req.num_steps is not None and (not isinstance(req.num_steps, int) or req.num_steps < 1):
            raise PreflightError(f"cannot generate:\n  num_steps={req.num_steps!r} must be a positive integer")
        errors = request_problems(self.cfg, req, self.is_main and check_output, output)  # before any sampling
        if errors:
            raise PreflightError("cannot generate:\n  " + "\n  ".join(errors))
        start = time.perf_counter()
        sampler = self._sampler_for(req.num_steps)
        cw = self.cfg.model.chunk_width
        h, w = self._latent_size()
        prefix = self._prefix(req)
        P = 0 if prefix is None else prefix.shape[2]
        new_latents = math.ceil(req.num_frames / TEMPORAL)
        # i2v: the image latent is latent frame 0 of the output; v2v: the output follows the prefix.
        total_latents = new_latents if req.mode == "i2v" else P + new_latents
        num_chunks = math.ceil(total_latents / cw)
        off = P // cw
        prompts = expand(list(req.prompts), num_chunks - off)
        captions = self._captions(collapse(prompts), num_chunks, off)
        if req.generator is not None:
            gen = req.generator
            if gen.device.type != "cpu":
                raise ValueError(f"generator must be a CPU torch.Generator (the noise is drawn on the CPU so that any "
                                 f"device gives the same video), got one on {gen.device}")
        else:
            gen = torch.Generator(device="cpu").manual_seed(req.seed)  # CPU stream: same noise on any device
        channels = self.cfg.model.in_channels // (2 if self.cfg.model.half_channel_vae else 1)
        noise = torch.randn(1, channels, num_chunks * cw, h, w, generator=gen).to(self.device)
        return _Run(req, sampler, prefix, P, off, num_chunks, captions, noise, sampler.plans(num_chunks, off),
                    prompts, start)

    def _steps(self, run: _Run, live, callback, cancel) -> Iterator:
        """The sampler's emitted chunks (prefix pasted); live prompts and cancellation are polled before every
        step, progress reported after it. Under several ranks, rank 0 decides (live prompt, cancel) and broadcasts the decision."""
        plans, off = run.plans, run.off
        first_step = {}  # absolute chunk -> the step at which it first denoises
        for plan in plans:
            for c in plan.chunks:
                first_step.setdefault(c, plan.step)
        watch = live is not None or cancel is not None

        def started_before(step: int) -> int:  # generated chunks that have started before `step` runs
            return sum(1 for s in first_step.values() if s < step)

        def poll(step: int) -> None:
            """Before step `step` runs: apply a live prompt, honour a cancel."""
            flag, prompt = 0, None
            if self.is_main:
                if cancel is not None and cancel.is_set():
                    flag = 2
                elif live is not None:
                    prompt = live.take()
                    flag = 1 if prompt is not None else 0
            if self.distributed and watch:
                group = self.parallel.groups.mp
                mine = torch.tensor([flag], device=self.device) if self.is_main else None
                flag = int(broadcast_tensor(mine, group, 0, self.device).item())
                if flag == 1:  # the text too, so that every rank records which prompt each chunk got
                    data = torch.tensor(list(prompt.encode()), dtype=torch.uint8, device=self.device) \
                        if self.is_main else None
                    prompt = bytes(broadcast_tensor(data, group, 0, self.device).cpu().tolist()).decode()
            if flag == 2:
                raise Cancelled(f"generation cancelled after sampler step {step} of {len(plans)}")
            k = started_before(step)  # the first generated chunk that has not started
            if flag == 1 and k < len(run.prompts):
                run.prompts[k:] = [prompt] * (len(run.prompts) - k)
                fresh = self._captions(collapse(run.prompts), run.num_chunks, off)
                lo = off + k
                run.captions.y[:, lo:] = fresh.y[:, lo:]
                run.captions.mask[:, lo:] = fresh.mask[:, lo:]
                if live is not None:
                    live.mark_applied(k, prompt)
            elif flag == 1:
                logger.info("live prompt %r came after the last chunk started; it conditions nothing", prompt)
            if live is not None:
                live.mark_started(min(started_before(step + 1), len(run.prompts)) - 1)

        bar = tqdm(total=len(plans), unit="step", desc="generating",
                   disable=not (self.cfg.progress and self.is_main and sys.stderr.isatty()))

        def on_step(plan) -> None:
            bar.update(1)
            if callback is not None:
                callback(plan.step + 1, len(plans))

        try:
            for chunk in run.sampler.sample(run.noise, run.captions, run.prefix, on_step=on_step,
                                            before_step=(lambda plan: poll(plan.step)) if watch else None):
                # The sampler's emitted latent is its own copy; cloned again so the decode owns what it edits.
                latent = chunk.latent.clone()
                if chunk.prefix_frames:
                    lo = chunk.index * self.cfg.model.chunk_width
                    latent[:, :, :chunk.prefix_frames] = run.prefix[:, :, lo:lo + chunk.prefix_frames]
                yield dataclasses.replace(chunk, latent=latent)
        finally:
            bar.close()

    def _frames(self, run: _Run, chunk) -> torch.Tensor:
        """The new output frames of an emitted chunk: uint8 (t, H, W, 3), t >= 0 (the request's frame count is kept)."""
        frames = self.vae.decode_latents(chunk.latent)
        if run.req.mode == "v2v":
            frames = frames[chunk.prefix_frames * TEMPORAL:]
        frames = frames[: run.req.num_frames - run.written]
        run.written += len(frames)
        return frames

    def chunks(self, req: Request, live=None, callback: Optional[Callable[[int, int], None]] = None,
               cancel=None) -> Iterator[ChunkFrames]:
        """Each generated chunk's decoded frames as soon as it is clean (nothing is written).

        `live`: a `magi_infer.live.LivePrompts`; `callback(step, total)` after every sampler step; `cancel`: a
        threading.Event checked after every step (raises `Cancelled`). Under several ranks every rank calls this
        with the same request, and passes live / cancel on all ranks or on none."""
        run = self._start(req, None, check_output=False)
        for chunk in self._steps(run, live, callback, cancel):
            frames = self._frames(run, chunk)
            g = chunk.index - run.off
            yield ChunkFrames(g, frames.cpu(), chunk.latent, run.prompts[g], run.num_chunks - run.off,
                              time.perf_counter() - run.start)

    def open_writer(self, req: Request, output: Optional[str] = None, **options):
        """The mp4 writer of `req`'s output (a fragmented mp4 under a temporary name until complete)."""
        from magi_train.data.video_io import StreamingMp4Writer

        v = self.cfg.video
        return StreamingMp4Writer(Path(output or req.output), v.width, v.height, v.fps, crf=v.crf,
                                  overwrite=req.overwrite, **options)

    def generate(self, req: Request, output: Optional[str] = None, live=None,
                 callback: Optional[Callable[[int, int], None]] = None, cancel=None,
                 tap: Optional[Callable[[ChunkFrames], None]] = None) -> Result:
        """Generate `req` and write it to `output` (default req.output), chunk by chunk; see `chunks` for the rest.
        `tap(chunk)`: each chunk's frames as they are written (on the decode worker with overlap_decode)."""
        run = self._start(req, output, check_output=True)
        out_path = Path(output or req.output)
        chunk_times: List[float] = []
        # Only rank 0 writes; the other ranks take part in the sampling and the decode (a collective).
        output_file = self.open_writer(req, output) if self.is_main else nullcontext()

        def decode_and_write(chunk) -> None:  # in order, one chunk at a time (inline or on the worker)
            frames = self._frames(run, chunk).cpu()
            if len(frames) and writer is not None:
                writer.write(frames)
            chunk_times.append(time.perf_counter() - run.start)
            if tap is not None:
                g = chunk.index - run.off
                tap(ChunkFrames(g, frames, chunk.latent, run.prompts[g], run.num_chunks - run.off, chunk_times[-1]))

        with output_file as writer, self._decoder(decode_and_write) as submit:
            for chunk in self._steps(run, live, callback, cancel):
                submit(chunk)
        return Result(out_path, run.written, run.num_chunks, len(run.plans), time.perf_counter() - run.start,
                      chunk_times, list(run.prompts))


class Cancelled(RuntimeError):
    """A generation stopped by its `cancel` event (between two sampler steps)."""


@dataclass
class ChunkFrames:
    index: int  # generated chunk, 0-based in output order
    frames: torch.Tensor  # uint8 (t, H, W, 3) on the CPU: this chunk's new output frames
    latent: torch.Tensor  # (1, C, chunk_width, H, W) fp32, the clean chunk (prefix frames pasted)
    prompt: str
    num_chunks: int  # generated chunks in the request
    seconds: float  # since the request started


@dataclass
class _Run:
    """One generation in progress: what `_start` prepared, and the frames written so far."""

    req: Request
    sampler: StaircaseSampler
    prefix: Optional[torch.Tensor]
    P: int  # prefix latent frames
    off: int  # chunks entirely inside the prefix (never denoised nor emitted)
    num_chunks: int
    captions: Captions
    noise: torch.Tensor
    plans: list
    prompts: List[str]  # per generated chunk (live updates change the tail)
    start: float
    written: int = 0

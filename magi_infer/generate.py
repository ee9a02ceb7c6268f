"""Inference entry point: generate a video with a released MAGI-1 model or one we trained.

    torchrun --nproc_per_node 1 magi_infer/generate.py model=magi1_4.5b_distill ckpt.dir=ckpt/magi/4.5B_distill \
        text.t5_dir=ckpt/t5 vae.dir=ckpt/vae mode=t2v prompt="A red fox runs through snow" output=fox.mp4
    ... mode=i2v image=cat.png          ... mode=v2v prefix_video=clip.mp4 num_frames=48
    ... prompt='[a calm sea, a storm rises, lightning strikes]'        (one prompt per chunk)

Every runtime knob is a Hydra override (conf/generate.yaml, magi_infer/config.py). Before anything is built
(magi_infer/preflight.py) the config, the model's input directories, the output path, the prompts, the image or
prefix video and the memory estimate are checked, and every problem is reported at once. The video is written
chunk by chunk to a new temporary file beside `output`, `.<output name>.<random>.partial` (logged; playable while
it grows), and published as `output` when complete. An existing `output` is never replaced unless
`overwrite=true`; if one appears while generating, the complete video stays in the temporary file and the
error names it.

Several GPUs serve one request together (same video as one process):

    torchrun --nproc_per_node 8 magi_infer/generate.py model=magi1_24b_distill parallel.cp=8 ...
    torchrun --nproc_per_node 4 magi_infer/generate.py ... parallel.cp=2 parallel.pp=2   (or parallel.tp=...)

Only rank 0 prints and writes the video. Besides the video, `<output>.json` records the prompts, seed, resolved
config and version (magi_infer/sidecar.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts magi_infer/ first on sys.path; import the installed packages instead.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from magi_infer.config import register_generate_config, summary, to_generate_config  # noqa: E402
from magi_infer.sidecar import write_sidecar  # noqa: E402
from magi_train.config.help import answer_help  # noqa: E402
from magi_train.config.paths import config_dir  # noqa: E402


def run(cfg: DictConfig):
    # Imported when a video is to be made, not with the module: `--help` and a bad override are answered
    # without loading torch (seconds of a start-up that ends in a message).
    from magi_infer.engine import InferenceEngine, Request
    from magi_infer.preflight import check_one_replica, preflight
    from magi_train.parallel.groups import init_parallel, shutdown

    gen_cfg = to_generate_config(cfg)
    request = Request.from_config(gen_cfg)
    # The process group first (cheap): it says which rank writes the output and which GPU this rank measures.
    parallel = init_parallel(gen_cfg.parallel)
    try:
        check_one_replica(parallel)
        preflight(gen_cfg, parallel, request)  # every check of config, inputs, output and memory, before the engine
        engine = InferenceEngine(gen_cfg, parallel=parallel)
        if parallel.is_main:
            print(summary(engine.cfg, engine.source, engine.device, parallel), flush=True)  # once, rank 0
        result = engine.generate(request)
        if parallel.is_main:
            write_sidecar(result.output, request, engine.cfg, result, engine.source)
            print(f"wrote {result.output}: {result.frames} frames {gen_cfg.video.width}x{gen_cfg.video.height} at "
                  f"{gen_cfg.video.fps} fps, {result.chunks} chunks, {result.model_calls} sampler steps, "
                  f"{result.seconds:.1f} s (first chunk on disk after {result.chunk_seconds[0]:.1f} s)", flush=True)
        return result
    finally:
        shutdown()


register_generate_config()


@hydra.main(config_path=str(config_dir()), config_name="generate", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """`magi-generate` and `python magi_infer/generate.py`: the Hydra app; a plain `--help` is answered without
    Hydra's help machinery, which costs a second (magi_train/config/help.py)."""
    if not answer_help(Path(sys.argv[0]).name, "generate", sys.argv[1:]):
        hydra_main()


if __name__ == "__main__":
    main()

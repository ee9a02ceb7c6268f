"""Building this rank's part of the DiT for a parallel layout, for training and for inference.

The one place where the model meets the process groups: callers ask for "this rank's stages of the model"
and get modules that the trainer, the sampler and the checkpoint code drive without knowing the layout.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from magi_train.config.schema import ModelConfig, TrainConfig
from magi_train.model.dit import VideoDiT, build_dit, full_shapes  # noqa: F401  (re-exported)
from magi_train.parallel.groups import Parallel
from magi_train.parallel.pipeline import stage_layers


def build_train_stages(cfg: TrainConfig, parallel: Parallel, cp_impl: str) -> Tuple[List[int], List[VideoDiT]]:
    """(stage ids, models) of the pipeline stages this rank holds (one, or parallel.vpp of them), initialised
    from trainer.seed, in train mode with trainer.recompute applied."""
    m, tc, p = cfg.model, cfg.trainer, parallel
    stages = p.pp * cfg.parallel.vpp
    held = stage_layers(m.num_layers, p.pp, cfg.parallel.vpp, p.pp_rank)
    models = [
        build_dit(m, tp_group=p.tp_group, cp_group=p.cp_group, sequence_parallel=p.sequence_parallel, layer_ids=ids,
                  pre_process=sid == 0, post_process=sid == stages - 1, init_seed=tc.seed, cp_impl=cp_impl).to(p.device)
        for sid, ids in held
    ]
    for model in models:
        model.train()
        model.set_recompute(tc.recompute, tc.recompute_layers)
    return [sid for sid, _ in held], models


def build_whole(cfg: ModelConfig, parallel: Parallel, cp_impl: str) -> VideoDiT:
    """The whole model (no pipeline split) on this rank's tensor/context-parallel slice, weights uninitialised
    (to be loaded): e.g. a distillation teacher."""
    p = parallel
    return build_dit(cfg, tp_group=p.tp_group, cp_group=p.cp_group, sequence_parallel=p.sequence_parallel,
                     init_weights=False, cp_impl=cp_impl).to(p.device)


def build_model(mc: ModelConfig, state: Dict[str, torch.Tensor], source: str, parallel: Optional[Parallel] = None,
                fp8: bool = False) -> torch.nn.Module:
    """This rank's part of the DiT for inference, loaded from a full (released-layout) state dict: the whole
    model in one process; under model parallelism its TP slices of its pipeline stage's layers, with the
    context-parallel group, wrapped as a `PipelinedDiT` when pp > 1. The sampler drives any of them the same way."""
    from magi_train.checkpoint.weights import load_into
    from magi_train.parallel.inference_pipeline import PipelinedDiT, stage_of

    whole = parallel is None or parallel.world_size == 1
    tp_group = None if parallel is None else parallel.tp_group
    layout = {} if whole else dict(cp_group=parallel.cp_group, sequence_parallel=parallel.sequence_parallel,
                                   **stage_of(mc.num_layers, parallel.pp, parallel.pp_rank))
    model = build_dit(mc, tp_group=tp_group, init_weights=False, **layout)
    reference = None if whole else build_dit(mc, device="meta")  # the whole model's shapes: what the checkpoint holds
    if fp8:
        from magi_train.model.fp8 import convert_dit_to_fp8  # raises for tensor-parallel linears

        convert_dit_to_fp8(model)
        if reference is not None:
            convert_dit_to_fp8(reference)
    if whole:
        load_into(model, state, source)
        return model
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    load_into(model, state, source, full_shapes=shapes, tp_rank=parallel.tp_rank, tp=parallel.tp)
    return PipelinedDiT(model, parallel.groups.pp) if parallel.pp > 1 else model

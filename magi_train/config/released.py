"""Read the released MAGI-1 `config.json` (`model_config` section) into our `ModelConfig`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from magi_train.config.choices import DType
from magi_train.config.schema import ModelConfig

_DTYPES = {"torch.bfloat16": DType.bfloat16, "torch.float16": DType.float16, "torch.float32": DType.float32}
# Fields of the released ModelConfig that exist in ours under the same name.
_SAME = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
         "layernorm_epsilon", "apply_layernorm_1p", "x_rescale_factor", "half_channel_vae", "patch_size", "t_patch_size",
         "in_channels", "out_channels", "cond_hidden_ratio", "caption_channels", "caption_max_length",
         "xattn_cond_hidden_ratio", "cond_gating_ratio", "gated_linear_unit")


def model_config_from_released(released: Dict[str, Any], *, distill: bool = False, name: str = "released") -> ModelConfig:
    model = released.get("model_config", released)
    missing = [k for k in _SAME + ("params_dtype",) if k not in model]
    if missing:
        raise ValueError(f"released MAGI-1 config lacks model_config fields {missing}")
    if model["params_dtype"] not in _DTYPES:
        raise ValueError(f"model_config.params_dtype={model['params_dtype']!r} is not one of {sorted(_DTYPES)}")
    fields = {k: model[k] for k in _SAME}
    fields["x_rescale_factor"] = float(fields["x_rescale_factor"])
    return ModelConfig(name=name, params_dtype=_DTYPES[model["params_dtype"]], distill=distill, **fields)


def load_released_config(path: str | Path) -> ModelConfig:
    data = json.loads(Path(path).read_text())
    engine = data.get("engine_config", {})
    return model_config_from_released(data, distill=bool(engine.get("distill", False)), name=Path(path).parent.name)

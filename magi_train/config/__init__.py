"""Configuration: typed schemas (`schema.py`), cross-field checks (`validate.py`), and the Hydra glue.

Usage from an entry point::

    register_configs()                      # before @hydra.main / hydra.compose runs

    @hydra.main(config_path="../conf", config_name="config", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        train_cfg = to_train_config(cfg)    # typed TrainConfig, validated, or ConfigError

Importing this package has no side effects; Hydra's ConfigStore is only touched by `register_configs()`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Mapping, Union

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from magi_train.config.schema import (
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainConfig,
    TrainerConfig,
    WandbConfig,
)
from magi_train.config.validate import ConfigError, validate

# Name under which `conf/config.yaml` finds the schema in its defaults list.
SCHEMA_NAME = "train_schema"


def register_configs() -> None:
    """Store `TrainConfig` in Hydra's ConfigStore as `train_schema`. Safe to call more than once."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def to_train_config(cfg: Union[DictConfig, Mapping[str, Any]]) -> TrainConfig:
    """Turn a composed config into a validated `TrainConfig`.

    The input is merged onto the schema first, so this also types configs that did not come through
    Hydra (e.g. a `config.yaml` saved next to a checkpoint). Unknown keys, wrong types and missing
    values are reported as `ConfigError` too, naming the full key.
    """
    try:
        typed = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        obj = OmegaConf.to_object(typed)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err)) from err
    assert isinstance(obj, TrainConfig)
    unknown = _unknown_keys(obj, prefix="")
    if unknown:
        raise ConfigError("unknown config key(s), not in the schema (magi_train/config/schema.py): "
                          + ", ".join(unknown))
    return validate(obj)


def _unknown_keys(obj: Any, prefix: str) -> List[str]:
    """Full keys of attributes that are not dataclass fields, recursively.

    Hydra's `+key=value` opens the struct flag to add the key, and OmegaConf.to_object then sets such
    extra keys as plain attributes instead of failing; a typo like `+model.foo=1` would pass silently.
    """
    fields = {f.name for f in dataclasses.fields(obj)}
    found = [prefix + name for name in vars(obj) if name not in fields]
    for name in fields:
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            found += _unknown_keys(value, prefix=f"{prefix}{name}.")
    return found


__all__ = [
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "SCHEMA_NAME",
    "TrainConfig",
    "TrainerConfig",
    "WandbConfig",
    "register_configs",
    "to_train_config",
    "validate",
]

"""Configuration: typed schemas (`schema.py`, closed sets in `choices.py`), cross-field checks (`validate.py`),
composing `conf/` and its presets outside an entry point (`compose.py`), and the Hydra glue.

Usage from an entry point::

    register_configs()                      # before @hydra.main / hydra.compose runs

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        train_cfg = to_train_config(cfg)    # typed TrainConfig, validated, or ConfigError

Importing this package has no side effects; Hydra's ConfigStore is only touched by `register_configs()`.
"""

from __future__ import annotations

from typing import Any, Mapping, Union

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from magi_train.config.compose import (
    CONF_DIR,
    compose,
    config_to_dict,
    load_model_preset,
    model_preset_names,
    to_typed,
)
from magi_train.config.paths import config_dir
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
    Hydra (e.g. a `config.yaml` saved next to a checkpoint). Unknown keys, wrong types, values outside a
    closed set and missing values are reported as `ConfigError` too, naming the full key.
    """
    return validate(to_typed(TrainConfig, cfg, "magi_train/config/schema.py"))


__all__ = [
    "CONF_DIR",
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
    "compose",
    "config_dir",
    "config_to_dict",
    "load_model_preset",
    "model_preset_names",
    "register_configs",
    "to_train_config",
    "to_typed",
    "validate",
]

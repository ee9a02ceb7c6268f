"""Composing `conf/` outside an entry point (tools, the memory planner, tests) the way the entry points do:
through Hydra, so a preset's `defaults:` chain (the *_distill presets extend the base ones) means the same
everywhere; and typing a composed config onto its schema.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, List, Mapping, Optional, Sequence, Type, TypeVar, Union

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from magi_train.config.paths import config_dir
from magi_train.config.schema import ModelConfig
from magi_train.config.validate import ConfigError, validate_model

# The Hydra configs (conf/ in a clone, magi_conf/ installed); entry points name the same folder.
CONF_DIR = config_dir()

T = TypeVar("T")


def compose(config_name: Optional[str], overrides: Sequence[str] = ()) -> DictConfig:
    """`hydra.compose` of `conf/<config_name>.yaml` (None: only what `overrides` select, e.g. `+model=tiny`).
    A config whose defaults list names a schema needs it registered first (`register_configs()`)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        # Hydra holds one global instance; inside a running Hydra app the app's own config is the one to use.
        raise ConfigError(f"cannot compose conf/{config_name or ''} while another Hydra instance is initialised")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


def to_typed(schema: Type[T], cfg: Union[DictConfig, Mapping[str, Any]], schema_file: str) -> T:
    """`cfg` merged onto dataclass `schema` and converted to it. Unknown keys, wrong types, values outside a
    closed set and missing values raise `ConfigError` naming the full key (`schema_file` says where the
    schema lives)."""
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
    except OmegaConfBaseException as err:
        raise ConfigError(str(err)) from err
    assert isinstance(obj, schema)
    unknown = unknown_keys(obj, prefix="")
    if unknown:
        raise ConfigError(f"unknown config key(s), not in the schema ({schema_file}): " + ", ".join(unknown))
    return obj


def unknown_keys(obj: Any, prefix: str) -> List[str]:
    """Full keys of attributes that are not dataclass fields, recursively.

    Hydra's `+key=value` opens the struct flag to add the key, and OmegaConf.to_object then sets such
    extra keys as plain attributes instead of failing; a typo like `+model.foo=1` would pass silently.
    """
    fields = {f.name for f in dataclasses.fields(obj)}
    found = [prefix + name for name in vars(obj) if name not in fields]
    for name in fields:
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            found += unknown_keys(value, prefix=f"{prefix}{name}.")
    return found


def config_to_dict(cfg: Any) -> dict:
    """`dataclasses.asdict` with enum members as their plain string values: what checkpoints, JSON and YAML
    files hold, readable without importing this package (and equal to what `asdict` gives, as a StrEnum
    member equals its value)."""
    def plain(items):
        return {k: v.value if isinstance(v, enum.Enum) else v for k, v in items}

    return dataclasses.asdict(cfg, dict_factory=plain)


def model_preset_names() -> List[str]:
    """The presets of conf/model, by name."""
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def load_model_preset(name: str) -> ModelConfig:
    """The validated `ModelConfig` of preset `conf/model/<name>.yaml`, composed by Hydra (its defaults chain
    included), as `model=<name>` gives it to the entry points."""
    names = model_preset_names()
    if name not in names:
        raise ConfigError(f"model={name!r}: no such preset in {CONF_DIR / 'model'} (available: {', '.join(names)})")
    try:
        composed = compose(None, [f"+model={name}"])
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"model preset {name!r} ({CONF_DIR / 'model' / name}.yaml) does not compose: {err}") from err
    try:
        model = to_typed(ModelConfig, composed.model, "magi_train/config/schema.py ModelConfig")
        return validate_model(model)
    except ConfigError as err:
        raise ConfigError(f"model preset {name!r} ({CONF_DIR / 'model' / name}.yaml): {err}") from err

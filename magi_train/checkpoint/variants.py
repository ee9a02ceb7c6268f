"""Which released MAGI-1 weights a directory holds, and finding the ones a caller needs.

A released model directory holds one weight directory per variant, named `inference_weight[.fp8][.distill]`
(magi_train/model/README.md states the release's conventions); each holds `model.safetensors.index.json` plus
shards, or one `model.safetensors` (either may be `.zst`). Distillation adds no keys, so only the directory's
name tells a base model from a distilled one: a mismatch is refused here, before anything samples garbage.

Both the inference loader (`weights.load_weights`, variant chosen by the preset) and
tools/convert_checkpoint.py (variant chosen by `--variant`, or by what the directory holds) resolve through
`resolve_weight_dir`; the caller says how its user names the directory and picks a variant, so each error
reads in that program's terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from magi_train.checkpoint.magi1 import INDEX_NAME, SINGLE_NAME

WEIGHT_PREFIX = "inference_weight"
_WEIGHT_FILES = (INDEX_NAME, SINGLE_NAME, SINGLE_NAME + ".zst")


@dataclass(frozen=True)
class Variant:
    """One kind of released weights: distilled (step-size embedding) or not, fp8 linears or not."""

    distill: bool
    fp8: bool = False

    @property
    def dirname(self) -> str:
        return WEIGHT_PREFIX + (".fp8" if self.fp8 else "") + (".distill" if self.distill else "")

    @property
    def name(self) -> str:
        """base | distill | fp8.distill (| fp8): the directory name without the prefix."""
        return self.dirname[len(WEIGHT_PREFIX) + 1:] or "base"

    @property
    def preset(self) -> str:
        """The model presets (conf/model) that describe these weights."""
        return "model=<size>" + ("_distill" if self.distill else "") + ("_fp8" if self.fp8 else "")

    @staticmethod
    def from_dirname(dirname: str) -> Optional["Variant"]:
        """The variant a weight directory's name tells; None for any other name."""
        return next((v for v in ALL_VARIANTS if v.dirname == dirname), None)

    @staticmethod
    def from_name(name: str) -> "Variant":
        found = next((v for v in ALL_VARIANTS if v.name == name), None)
        if found is None:
            raise ValueError(f"variant {name!r} is not one of {[v.name for v in ALL_VARIANTS]}")
        return found


# Every name the loaders recognise, and the three the release ships (fp8 exists only distilled).
ALL_VARIANTS = (Variant(False), Variant(True), Variant(True, True), Variant(False, True))
RELEASED_VARIANTS = ALL_VARIANTS[:3]


def is_weight_dir(path: Path) -> bool:
    """A directory of weights itself (its files, or a variant's name), not a model directory above them."""
    return any((path / name).is_file() for name in _WEIGHT_FILES) or Variant.from_dirname(path.name) is not None


def weight_dirs(path: Path) -> Dict[Variant, Path]:
    """The weight directories inside model directory `path`, by variant."""
    return {v: path / v.dirname for v in ALL_VARIANTS if (path / v.dirname).is_dir()}


def resolve_weight_dir(directory: str | Path, wanted: Optional[Variant] = None, *, where: Optional[str] = None,
                       wanted_by: str = "", choose: Callable[[Variant], str] = lambda v: v.preset,
                       missing_note: str = "") -> Tuple[Path, Optional[Variant]]:
    """(weight directory, its variant) for `directory`: a weight directory itself, or a model directory holding
    the `wanted` variant (None: the only one it holds). The variant is None when `directory` is a weight
    directory whose name does not tell; the caller decides whether to trust it.

    Messages name the directory as `where` (default `ckpt.dir=<directory>`), say what made `wanted` the choice
    (`wanted_by`), and how to pick another variant (`choose`: a preset name, a command-line flag)."""
    path = Path(directory)
    where = where or f"ckpt.dir={path}"
    if not path.is_dir():
        raise FileNotFoundError(f"{where} is not a directory")
    by = f" ({wanted_by})" if wanted_by else ""
    if is_weight_dir(path):
        held = Variant.from_dirname(path.name)
        if wanted is not None and held is not None and held != wanted:
            raise ValueError(f"{where} holds the {held.dirname} weights, but {wanted.dirname} is wanted{by}; "
                             f"use {choose(held)}")
        return path, held
    present = weight_dirs(path)
    hints = ", ".join(f"{v.dirname} -> {choose(v)}" for v in present)
    if wanted is not None and wanted in present:
        return present[wanted], wanted
    if wanted is not None and present:
        raise ValueError(f"{where} has no {wanted.dirname}/{by}; it holds {[v.dirname for v in present]}: {hints}")
    if wanted is None and len(present) == 1:
        (variant, found), = present.items()
        return found, variant
    if wanted is None and present:
        raise ValueError(f"{where} holds several weight directories ({', '.join(v.dirname for v in present)}); "
                         f"choose one: {hints}")
    wanted_dir = f"no {wanted.dirname}/: " if wanted is not None else ""
    raise FileNotFoundError(f"{where} holds no released weights ({wanted_dir}neither {INDEX_NAME} / {SINGLE_NAME} "
                            f"nor a weight directory {', '.join(v.dirname for v in RELEASED_VARIANTS)}){missing_note}")

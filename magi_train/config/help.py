"""`--help` of a Hydra program, composed directly instead of through Hydra's help.

Hydra's `--help` lists the config groups by asking its config loader about each group two or three times, and
each question deep-copies the whole ConfigStore (Hydra's own structured configs plus our schema): about 90
copies of ~10 ms each for `generate`, a second of CPU before any text appears. The same text is one `compose`
of the entry config plus a listing of the config folder's group directories: what Hydra's default help template
prints ("== Configuration groups ==", "== Config =="), a tenth of the time.

Only a plain help request is answered here: `--help`/`-h` with overrides of our config. Anything else (Hydra's
own flags such as `--hydra-help` or `--cfg`, `hydra.*` overrides, an override that does not compose) goes to
Hydra unchanged, which then prints what it always prints, errors included.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from magi_train.config.paths import config_dir

HELP_FLAGS = ("--help", "-h")


def _plain_help_request(argv: Sequence[str]) -> Optional[List[str]]:
    """The overrides of a `--help` request that needs nothing of Hydra's own, else None."""
    if not any(arg in HELP_FLAGS for arg in argv):
        return None
    overrides = [arg for arg in argv if arg not in HELP_FLAGS]
    if any(arg.startswith("-") or arg.lstrip("+~").startswith("hydra") for arg in overrides):
        return None
    return overrides


def config_groups(folder: Path) -> List[str]:
    """`group: option, option` for every folder of configs under `folder`, as Hydra lists them."""
    lines = []
    for group in sorted(p for p in folder.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        if options:
            lines.append(f"{group.relative_to(folder).as_posix()}: {', '.join(options)}")
    return lines


def help_text(prog: str, config_name: str, overrides: Sequence[str]) -> str:
    """The help of entry config `config_name` (its schema registered) with `overrides` applied."""
    from omegaconf import OmegaConf

    from magi_train.config.compose import compose

    cfg = compose(config_name, overrides)
    return "\n".join([
        f"usage: {prog} [key=value ...]   (Hydra overrides; Hydra's own flags: --hydra-help)", "",
        "== Configuration groups ==", "Compose your configuration from those groups (group=option)", "",
        *config_groups(config_dir()), "",
        "== Config ==", "Override anything in the config (foo.bar=value)", "",
        OmegaConf.to_yaml(cfg),
    ])


def answer_help(prog: str, config_name: str, argv: Sequence[str]) -> bool:
    """Print the help and return True when `argv` is a plain help request; False: leave `argv` to Hydra."""
    overrides = _plain_help_request(argv)
    if overrides is None:
        return False
    try:
        text = help_text(prog, config_name, overrides)
    except Exception:  # noqa: BLE001 - a bad override: Hydra reports it in its own words
        return False
    print(text)
    return True

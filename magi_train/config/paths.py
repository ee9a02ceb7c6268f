"""Where the Hydra configs are: one answer for every entry point, tool and test.

A clone keeps them in the top-level `conf/` (next to `magi_train/`); an installed wheel has them as the package
`magi_conf` next to `magi_train` in site-packages (setup.py maps the name onto `conf/`; an editable install
keeps `magi_train` in the clone, so it finds `conf/`). The folder is located beside the `magi_train` that is
running, not through the import system, so a clone's code never composes another installation's configs (a
wheel installed in the same environment, say) and the lookup imports nothing.

Entry points pass `str(config_dir())` to `@hydra.main(config_path=...)` (Hydra takes an absolute path as is);
code outside an entry point composes with `hydra.initialize_config_dir(config_dir=str(config_dir()))`.
"""

from __future__ import annotations

from pathlib import Path

# The root that holds magi_train/: the clone, or site-packages.
_ROOT = Path(__file__).resolve().parents[2]
# Installed name first: a site-packages folder called `conf` could belong to any distribution.
_CANDIDATES = ("magi_conf", "conf")


def config_dir() -> Path:
    """The folder holding `config.yaml` (training) and `generate.yaml` (inference) and their config groups."""
    for name in _CANDIDATES:
        folder = _ROOT / name
        if (folder / "config.yaml").is_file() and (folder / "generate.yaml").is_file():
            return folder
    raise FileNotFoundError(
        f"magi's Hydra configs are missing: expected config.yaml and generate.yaml in {_ROOT / 'conf'} (a clone) "
        f"or {_ROOT / 'magi_conf'} (an installed wheel); reinstall magi or restore conf/"
    )

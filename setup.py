"""Package list for setuptools (all other metadata is in pyproject.toml).

The repository keeps its Hydra configs in the top-level `conf/` and its scripts in `tools/`, where a clone runs
them (`torchrun magi_train/train.py ...`, `python tools/X.py`). Installed, they are the packages `magi_conf` and
`magi_tools` (names that cannot clash with another distribution's top-level `conf` / `tools`): `package_dir` maps
each name onto its folder, both in a wheel and in an editable install. This file exists because pyproject's
`packages.find` cannot rename a folder, and an explicit list of every sub-package would go stale.
"""

from setuptools import find_packages, setup

RENAMED = {"magi_conf": "conf", "magi_tools": "tools"}

setup(
    packages=find_packages(include=["magi_train", "magi_train.*", "magi_infer", "magi_infer.*"]) + list(RENAMED),
    package_dir=dict(RENAMED),
)

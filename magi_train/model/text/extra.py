"""The optional `t5` extra: transformers, sentencepiece and protobuf (the T5 encoder), ftfy and beautifulsoup4
(the released caption cleaning). Training on pre-encoded shards and the tiny preset's hash encoder need none of
them, so they are imported where used, and a missing one is reported with the install command."""

from __future__ import annotations

import importlib
from types import ModuleType

# magi is installed from a clone or a wheel, not from PyPI (a package named magi there is someone else's).
INSTALL = "pip install '.[t5]' in the magi clone, or pip install 'magi-<version>-py3-none-any.whl[t5]'"


def t5_dependency(module: str, needed_for: str) -> ModuleType:
    """`import module`, or an ImportError that names the extra which provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{needed_for} needs the Python package {module.split('.')[0]!r}, which is not "
                          f"installed ({err}); install the t5 extra: {INSTALL}") from err

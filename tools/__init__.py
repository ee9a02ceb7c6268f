"""Command-line tools, installed as the package `magi_tools` (setup.py maps the name onto this folder).

From a clone each runs as `python tools/X.py`; installed, the user-facing ones are console scripts
(`magi-convert-checkpoint`, ... in pyproject.toml's [project.scripts]) calling `magi_tools.X:main`.
"""

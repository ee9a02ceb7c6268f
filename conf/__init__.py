"""The Hydra configs, installed as the package `magi_conf` (setup.py maps the name onto this folder).

A package, so that an installed magi finds its configs with the import system (magi_train/config/paths.py) in a
wheel as in an editable install; the YAML files ship as package data.
"""

#!/usr/bin/env python
"""Write (or check) the sha256 manifest of a released-layout weight directory.

    python tools/hash_weights.py ckpt/magi/4.5B_distill/inference_weight.distill     # writes .../SHA256SUMS
    python tools/hash_weights.py --check ckpt/magi/4.5B_distill/inference_weight.distill
    python tools/hash_weights.py ckpt/magi/4.5B_distill          # a model directory: each inference_weight*/

The manifest is `SHA256SUMS` in `sha256sum` format (`sha256sum -c SHA256SUMS` checks it too) and covers every
file of the directory. `load_magi1_state_dict` (and so generate) checks the shards against it whenever it is
there; a manifest kept elsewhere is given to generate as `ckpt.sha256=PATH`. Hash the files right after a
download you trust: a manifest made from damaged files vouches for the damage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import magi_train  # noqa: F401  (installed editable in the venv)
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magi_train.checkpoint.magi1 import INDEX_NAME, MANIFEST_NAME, SINGLE_NAME, verify_sha256, write_manifest
from magi_train.checkpoint.variants import is_weight_dir, weight_dirs


def weight_directories(path: Path) -> list[Path]:
    """`path` itself if it holds shards, else the released weight directories inside it."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    if is_weight_dir(path):
        return [path]
    found = sorted(weight_dirs(path).values())
    if not found:
        raise FileNotFoundError(f"{path} holds neither {INDEX_NAME} nor {SINGLE_NAME}[.zst] nor inference_weight*/ "
                                "directories")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directories", nargs="+", type=Path, metavar="DIR")
    parser.add_argument("--check", action="store_true", help=f"check the files against {MANIFEST_NAME} instead")
    args = parser.parse_args(argv)
    try:
        for directory in [d for given in args.directories for d in weight_directories(given)]:
            if args.check:
                verify_sha256(directory, directory / MANIFEST_NAME)
                print(f"{directory}: every shard matches {MANIFEST_NAME}")
            else:
                print(f"wrote {write_manifest(directory)}")
    except (OSError, ValueError) as e:
        print(f"hash_weights.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

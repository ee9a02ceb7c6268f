"""Spreading the VAE tiles of one call over the ranks of a group.

Rank r codes tiles r, r + W, r + 2W, ... (round-robin, so the short edge tiles are spread too); then each
tile is broadcast from the rank that coded it, and every rank blends and assembles the same full result.
Each tile is coded by the same function on the same input as in one process, so the result is identical
to the one-process tile loop (bitwise on CPU, and on GPUs of one kind).
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from magi_train.parallel.comm import broadcast_tensor

from magi_train.model.vae.tiling import Codec


class SplitTiles:
    """A `TileMap` (see tiling.py) that codes this rank's share of the tiles and shares the results."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __call__(self, fn: Codec, tiles: List[torch.Tensor]) -> List[torch.Tensor]:
        world, rank = self.group.size(), self.group.rank()
        # All of this rank's tiles first (the ranks work in parallel), then the exchange.
        mine = {i: fn(tile) for i, tile in enumerate(tiles) if i % world == rank}
        device = tiles[0].device if tiles else torch.device("cpu")
        return [broadcast_tensor(mine.get(i), self.group, i % world, device) for i in range(len(tiles))]

"""Read the head-map kernel settings a tuning run chose (``headmap_tune.py --merge``), for the
benchmarks' ``--tiles-from``: they try settings before they are written into the library's
``TUNED_TILES``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kdgqa.core.headmap_attention import TUNED_TILES, HeadmapTiles, Tiles

KERNELS = ("forward", "grad_q", "grad_kv")


def chosen_tiles(path: Path) -> dict[int, HeadmapTiles]:
    """The settings a merged tuning file chose, per head dim."""
    chosen = json.loads(path.read_text())["chosen"]
    return {int(dim): HeadmapTiles(*(Tiles(*per[k]["tiles"]) for k in KERNELS))
            for dim, per in chosen.items()}


def use_tiles_from(path: Path | None) -> None:
    """Make this benchmark process use the file's settings (a no-op without a file)."""
    if path is not None:
        TUNED_TILES.update(chosen_tiles(path))


def add_tiles_argument(parser: argparse.ArgumentParser) -> None:
    """The benchmarks' ``--tiles-from JSON`` option."""
    parser.add_argument("--tiles-from", type=Path, metavar="JSON",
                        help="head-map kernel settings chosen by headmap_tune.py --merge "
                             "(default: the library's TUNED_TILES)")

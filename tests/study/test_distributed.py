"""A real 2-process gloo job matches the single-process run and keeps ranks identical."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

from kdgqa.conversion.converter import convert
from kdgqa.models.timm_vit import create_timm_vit
from kdgqa.study.config import DataConfig, TrainConfig
from kdgqa.study.data import Augment, Batches, DataSplits, load_splits
from kdgqa.study.distributed import DistContext, init_distributed, shutdown_distributed
from kdgqa.study.train import train

GLOBAL_BATCH = 16
RECIPE = TrainConfig(epochs=2, batch_size=GLOBAL_BATCH, lr=2e-3, allocation_every=1)


def _splits() -> DataSplits:
    s = load_splits(DataConfig(), seed=0)
    return DataSplits("digits", s.train.subset(torch.arange(96)), s.val.subset(torch.arange(32)),
                      s.test, s.classes)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = create_timm_vit(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=24,
                            depth=2, num_heads=6, mlp_ratio=2.0)
    # diff-DGQA with a short window re-allocates often and unevenly: the allocation depends
    # on every image of the global batch, which is what the all-reduce must provide.
    return convert(model, "dgqa-diff", 4, window_size=2)


def _run(ctx: DistContext, run_dir: Path) -> tuple[nn.Module, list]:
    splits = _splits()
    common = {"image_size": 8, "rank": ctx.rank, "world_size": ctx.world_size}
    tb = Batches(splits.train, GLOBAL_BATCH, augment=Augment(crop_padding=1), seed=3, **common)
    vb = Batches(splits.val, GLOBAL_BATCH, shuffle=False, drop_last=False, **common)
    model = _model()
    torch.manual_seed(1)
    result = train(model, tb, vb, RECIPE, run_dir=run_dir, progress=False, ctx=ctx)
    return model, result.allocation


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        model, allocation = _run(ctx, Path(out) / "ddp")
        torch.save({"state": model.state_dict(), "allocation": allocation},
                   Path(out) / f"rank{rank}.pt")
    finally:
        shutdown_distributed(ctx)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    single_model, single_alloc = _run(DistContext(), tmp_path / "single")
    single = single_model.state_dict()

    # Every rank holds the same weights and DGQA state, bit for bit.
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert ranks[0]["allocation"] == ranks[1]["allocation"]
    # And the same allocations and (up to reduction order) weights as one process.
    assert ranks[0]["allocation"] == single_alloc
    assert len({tuple(a["counts"]) for a in single_alloc}) > 1  # allocation really moved
    for key, value in single.items():
        if value.is_floating_point():
            torch.testing.assert_close(ranks[0]["state"][key], value, atol=2e-5, rtol=1e-4)
        else:
            assert torch.equal(ranks[0]["state"][key], value), key

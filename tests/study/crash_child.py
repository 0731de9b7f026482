"""A small training run that can SIGKILL itself at a chosen point (used by test_crash_resume).

Usage: ``python crash_child.py RUN_DIR [--resume] [--kill WHERE:N[:FRACTION]]`` where WHERE is

* ``step``: after N optimizer steps of this process;
* ``write``: during the N-th checkpoint write of this process, after FRACTION of the payload
  reached the temp file;
* ``before-rename`` / ``after-rename``: around the N-th ``os.replace`` of this process.

Without ``--kill`` it finishes and writes ``RUN_DIR/final.pt`` (state dict) and
``RUN_DIR/result.json``. Everything but the kill point is shared with the in-process runs
of the test through :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def run(run_dir: Path, resume: bool) -> Any:
    """Train the tiny DGQA ViT (dropout, augmentation, checkpoints every 5 steps)."""
    from kdgqa.conversion.converter import convert
    from kdgqa.models.timm_vit import create_timm_vit
    from kdgqa.study.config import TrainConfig
    from kdgqa.study.data import Augment, Batches, ImageTensors
    from kdgqa.study.train import train

    torch.set_num_threads(1)
    # Learnable synthetic 8x8 images (class = brightest quadrant): no dataset import cost.
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (256,), generator=gen)
    images = torch.randint(0, 100, (256, 1, 8, 8), generator=gen, dtype=torch.uint8)
    for quadrant in range(4):
        rows, cols = divmod(quadrant, 2)
        chosen = labels == quadrant
        images[chosen, :, rows * 4:rows * 4 + 4, cols * 4:cols * 4 + 4] += 120
    data = ImageTensors(images, labels)
    torch.manual_seed(0)
    model = create_timm_vit(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=24,
                            depth=2, num_heads=6, mlp_ratio=2.0, drop_path_rate=0.1)
    convert(model, "dgqa-diff", 2, window_size=3)
    train_b = Batches(data.subset(torch.arange(192)), 32, image_size=8,
                      augment=Augment(crop_padding=1, flip=True), seed=7)
    val_b = Batches(data.subset(torch.arange(192, 256)), 64, image_size=8, shuffle=False,
                    drop_last=False)
    recipe = TrainConfig(epochs=3, batch_size=32, lr=2e-3, checkpoint_every=5,
                         allocation_every=2, schedule="cosine", warmup_steps=3)
    torch.manual_seed(1)
    result = train(model, train_b, val_b, recipe, run_dir=run_dir, resume=resume,
                   progress=False)
    return model, result


def _install_kill(where: str, n: int, fraction: float) -> None:
    import kdgqa.io.durable

    calls = {"count": 0}

    def hit() -> bool:
        calls["count"] += 1
        return calls["count"] == n

    if where == "step":
        real_clip = torch.nn.utils.clip_grad_norm_

        def clip(*args: Any, **kwargs: Any) -> Any:
            if hit():
                _die()
            return real_clip(*args, **kwargs)

        torch.nn.utils.clip_grad_norm_ = clip  # type: ignore[assignment]
    elif where == "write":
        real_open = open

        class Torn:
            def __init__(self, handle: Any) -> None:
                self.handle = handle
                self.chunks = 0

            def write(self, chunk: Any) -> int:
                self.chunks += 1
                if self.chunks == 2:  # the payload, after the header
                    cut = int(len(chunk) * fraction)
                    self.handle.write(chunk[:cut])
                    self.handle.flush()
                    os.fsync(self.handle.fileno())
                    _die()
                return int(self.handle.write(chunk))

            def __getattr__(self, name: str) -> Any:
                return getattr(self.handle, name)

            def __enter__(self) -> Torn:
                return self

            def __exit__(self, *exc: object) -> None:
                self.handle.close()

        def torn_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            handle = real_open(file, mode, *args, **kwargs)
            return Torn(handle) if "w" in mode and hit() else handle

        kdgqa.io.durable.open = torn_open  # type: ignore[attr-defined]
    elif where in ("before-rename", "after-rename"):
        real_replace = os.replace

        def replace(src: Any, dst: Any) -> None:
            due = hit()
            if due and where == "before-rename":
                _die()
            real_replace(src, dst)
            if due:
                _die()

        os.replace = replace
    else:
        raise SystemExit(f"unknown kill point {where!r}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill", default=None)
    args = parser.parse_args()
    if args.kill:
        where, n, *rest = args.kill.split(":")
        _install_kill(where, int(n), float(rest[0]) if rest else 0.5)
    model, result = run(args.run_dir, args.resume)
    torch.save(model.state_dict(), args.run_dir / "final.pt")
    summary = {"steps": result.steps, "history": result.history,
               "allocation": result.allocation, "best_val_acc": result.best_val_acc,
               "best_val_loss": result.best_val_loss, "best_step": result.best_step}
    (args.run_dir / "result.json").write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

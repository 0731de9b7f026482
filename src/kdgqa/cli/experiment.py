"""``kdgqa experiment [CONFIG.yaml]``: run a study (pretrain, convert, uptrain, evaluate, report).

Without a config it runs the embedded digits study. The same command works under
``torchrun --nproc_per_node N``. Bad input fails with one line before anything is written.
"""

from __future__ import annotations

import argparse
import sys

from kdgqa.errors import KdgqaError

NAME = "experiment"
HELP = "run a study: MHA pretraining, then scheme x KV heads x seeds, then a report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None,
                        help="YAML config (default: the embedded digits study); for your own "
                        "images see configs/imagefolder-example.yaml and docs/experiments.md")
    parser.add_argument("--output-dir", "-o", default=None, help="override output_dir")
    parser.add_argument("--device", default=None, help="override device (auto, cpu, cuda)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the study in output_dir from its last checkpoints")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, print the plan and exit without training")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config value, e.g. --set uptrain.lr=3e-4 (repeatable)")
    parser.add_argument("--pretrain-only", action="store_true",
                        help="stop after the MHA model is pretrained and saved")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run only every N-th grid run starting at I (one process per "
                             "GPU); merge the outputs with `kdgqa report`")


def run(args: argparse.Namespace) -> int:
    from kdgqa.study.config import describe_plan, load_config, validate
    from kdgqa.study.experiment import batch_sizes, grid_progress, preflight, run_experiment

    config = load_config(args.config, args.overrides)
    shard = parse_shard(args.shard) if args.shard is not None else None
    if args.output_dir is not None:
        config.output_dir = args.output_dir
    if args.device is not None:
        config.device = args.device
    if args.no_progress:
        config.progress = False
    validate(config)
    if args.dry_run:
        from kdgqa.study.data import plan_splits, split_warnings
        from kdgqa.study.distributed import resolve_device

        resolve_device(config.device)  # a device this machine lacks fails the dry run too
        preflight(config, resume=args.resume)
        pretrain = config.pretrain_data
        plan = plan_splits(config.data, config.seed)
        print(describe_plan(config, plan, plan_splits(pretrain, config.seed) if pretrain
                            else None))
        for line in split_warnings(plan.train, plan.val, plan.test, batch_sizes(config)):
            print(line)
        if shard is not None or args.resume:
            done, left = grid_progress(config, shard)
            part = f"shard {shard[0]}/{shard[1]}" if shard is not None else "grid"
            print(f"{part}: {len(done) + len(left)} runs, {len(done)} done, {len(left)} to run"
                  + (f": {', '.join(left)}" if left else ""))
        return 0

    from kdgqa.study.distributed import init_distributed, shutdown_distributed
    from kdgqa.study.train import TrainingDiverged
    from kdgqa.study.workers import GridWorkerError

    ctx = init_distributed(config.device)
    try:
        run_experiment(config, resume=args.resume, ctx=ctx,
                       log=lambda m: print(m, flush=True),
                       pretrain_only=args.pretrain_only, shard=shard)
    except (TrainingDiverged, GridWorkerError) as error:
        # Not an input error: the run started and failed, so status 1, still one line.
        print(f"kdgqa: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed(ctx)
    return 0


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with 0 <= I < N, or ValueError naming the expected form."""
    index, sep, count = text.partition("/")
    if sep and index.strip().isdigit() and count.strip().isdigit():
        i, n = int(index), int(count)
        if 0 <= i < n:
            return i, n
    raise KdgqaError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")

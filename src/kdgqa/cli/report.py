"""``kdgqa report DIR [DIR ...] [-o OUT]``: rebuild a study's report, or merge several.

One directory: its ``report.md``, CSV files and plots are written again from its JSONL files
(e.g. after a crash or a change of the report code). Several (the shards of one grid run
with ``kdgqa experiment --shard I/N``, or separate studies of the same checkpoint): their runs
are gathered into ``OUT`` and reported together.
"""

from __future__ import annotations

import argparse

from kdgqa.errors import KdgqaError

NAME = "report"
HELP = "write a study's table and plots again, or merge several study directories into one"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("studies", nargs="+", metavar="DIR", help="study output directories")
    parser.add_argument("--output-dir", "-o", default=None, metavar="OUT",
                        help="where the merged study goes (required with several DIRs)")


def run(args: argparse.Namespace) -> int:
    from kdgqa.study.report import merge_studies, write_report

    if args.output_dir is None:
        if len(args.studies) > 1:
            raise KdgqaError("several study directories need --output-dir for the merge")
        print(write_report(args.studies[0]))
        return 0
    print(merge_studies(args.studies, args.output_dir))
    return 0

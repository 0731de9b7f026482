"""``kdgqa schemes``: every registered allocation scheme with its options and properties."""

from __future__ import annotations

import argparse

NAME = "schemes"
HELP = "list the allocation schemes (built-in and registered by plugins) with their options"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--names", action="store_true", help="only the names, one per line")


def run(args: argparse.Namespace) -> int:
    from kdgqa.schemes.registry import SCHEMES

    if args.names:
        print("\n".join(SCHEMES))
        return 0
    for name, cls in SCHEMES.items():
        traits = [t for t, on in (("key-driven", cls.key_driven),
                                  ("needs --calibration", cls.needs_calibration)) if on]
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name}: {summary}" + (f" [{', '.join(traits)}]" if traits else ""))
        options = ", ".join(f"{k}={v!r}" for k, v in cls.option_defaults.items())
        print(f"    options: {options or 'none'}")
    return 0

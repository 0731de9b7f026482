"""What a dataset's splits will be, described without reading an image (torch-free, so a
config's plan can print them)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SplitOrigins", "SplitPlan"]


@dataclass(frozen=True)
class SplitOrigins:
    """Where a dataset's train, validation and test images come from, in words."""

    train: str
    val: str
    test: str


@dataclass(frozen=True)
class SplitPlan:
    """The split sizes :func:`load_splits` will produce, counted without decoding images
    (``None`` where they cannot be known before a download)."""

    name: str
    train: int | None
    val: int | None
    test: int | None
    origins: SplitOrigins

    def describe(self) -> str:
        def count(n: int | None) -> str:
            return "?" if n is None else f"{n:,}"

        o = self.origins
        return (f"{self.name}: train {count(self.train)} ({o.train}), val {count(self.val)} "
                f"({o.val}), test {count(self.test)} ({o.test})")

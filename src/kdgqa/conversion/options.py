"""The choices a conversion accepts, importable without torch (the CLI's help reads them)."""

from __future__ import annotations

__all__ = ["POOLING_METHODS"]

#: How each KV head starts from the heads of its group: their mean (GQA's recipe), the first
#: head, or random values with the group's spread (GQA's "random init" ablation).
POOLING_METHODS = ("mean", "first", "random")

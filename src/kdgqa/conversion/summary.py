"""What a converted model holds, in lines a person reads (the CLI's conversion summary)."""

from __future__ import annotations

import torch
from torch import nn

from kdgqa.models.locate import grouped_layers

__all__ = ["allocation_lines", "parameter_count"]


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (buffers not counted)."""
    return sum(p.numel() for p in model.parameters())


def allocation_lines(model: nn.Module) -> list[str]:
    """One line per grouped layer: query heads per KV head (and the original heads each KV
    head was pooled from, for calibrated groups), or why the map is not fixed."""
    lines = []
    for path, module in grouped_layers(model):
        index = module.allocator.fixed_kv_index()
        if index is None:
            allocator = module.allocator
            lines.append(f"  {path}: dynamic (chosen from the keys)" if allocator.key_driven
                         else f"  {path}: no fixed map ({allocator.dynamic_reason()})")
            continue
        counts = torch.bincount(index.cpu(), minlength=module.num_kv_heads).tolist()
        line = f"  {path}: query heads per KV head {counts}"
        groups = getattr(module.allocator, "groups", None)
        if groups is not None:
            line += " from original heads " + " ".join(
                "{" + ",".join(map(str, g)) + "}" for g in groups())
        lines.append(line)
    return lines

"""timm's BEiT and Swin families: attention with a learnt relative position bias per head.

BEiT's ``Attention`` and Swin's ``WindowAttention`` add ``table[index]`` (one bias per query
head and token pair, independent of the keys) to the logits, plus BEiT's shared bias (also
per query head) or Swin's shifted-window mask (the same for every head). Pooling K/V into
groups leaves all of these untouched: query head ``h`` still adds its own bias to its logits
``q_h . k_g``, so the grouped model is exactly the MHA model with pooled K/V. The bias goes to
the core op as a per-head additive ``attn_mask``.

Calibrated schemes permute query heads, and the bias table's head columns would have to
move with them; ``pooling="fit"`` / ``align`` are refused on these layers too (conservative:
one rule for every data-driven conversion).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kdgqa.attention import GroupedQueryAttention
from kdgqa.errors import ConversionError, ExportError
from kdgqa.models.base import MHAWeights
from kdgqa.models.timm_vit import TimmViT, fused_qkv_parts

__all__ = ["RelPosGroupedAttention", "TimmBeit", "TimmSwin"]


class RelPosGroupedAttention(GroupedQueryAttention):
    """:class:`GroupedQueryAttention` plus timm's per-head relative position bias.

    Called as BEiT's attention (``shared_rel_pos_bias=``) and as Swin's window attention
    (``mask=``: ``(windows, N, N)``, inputs ordered image-major, window-minor).
    """

    relative_position_index: Tensor | None

    def __init__(self, *args: Any, bias_table: Tensor | None = None,
                 bias_index: Tensor | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relative_position_bias_table = (
            None if bias_table is None else nn.Parameter(bias_table.detach().clone()))
        self.register_buffer("relative_position_index",
                             None if bias_index is None else bias_index.clone(),
                             persistent=False)

    def relative_bias(self) -> Tensor | None:
        """The table's bias as ``(1, H, n, n)``, or None without a table."""
        table, index = self.relative_position_bias_table, self.relative_position_index
        if table is None or index is None:
            return None
        size = index.shape[0]
        return table[index.reshape(-1)].view(size, size, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(  # type: ignore[override]
        self, x: Tensor, mask: Tensor | None = None,
        shared_rel_pos_bias: Tensor | None = None,
    ) -> Tensor:
        bias = self.relative_bias()
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        if mask is not None:
            batch, tokens, heads = x.shape[0], x.shape[1], self.num_heads
            windows = mask.shape[0]
            full = mask.view(1, windows, 1, tokens, tokens)
            if bias is not None:
                full = full + bias.view(1, 1, heads, tokens, tokens)
            bias = full.expand(batch // windows, windows, heads, tokens, tokens).reshape(
                batch, heads, tokens, tokens)
        if bias is not None:
            bias = bias.to(x.dtype)
        return super().forward(x, attn_mask=bias)


def _classes(module: str, name: str) -> tuple[type, ...]:
    try:
        import importlib

        cls = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return ()
    return (cls,) if isinstance(cls, type) else ()


class _RelPosFamily(TimmViT):
    """What BEiT and Swin share: fused qkv, a bias table, no norms inside the attention."""

    attention_module = ""
    attention_class = ""
    model_classes: tuple[str, ...] = ()

    def owns(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.model_classes

    def is_attention(self, module: nn.Module) -> bool:
        return type(module) in _classes(self.attention_module, self.attention_class)

    def read_attention(self, module: nn.Module, label: str) -> MHAWeights:
        attn: Any = module
        allowed = {"qkv", "attn_drop", "proj", "proj_drop", "softmax"}
        extra = sorted({name for name, _ in attn.named_children()} - allowed)
        if extra:
            raise ConversionError(f"cannot convert module {label!r}: unknown submodule "
                                  f"{extra[0]!r} in timm {type(attn).__name__}")
        qkv, proj = attn.qkv, attn.proj
        heads = int(attn.num_heads)
        if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear) or (
                qkv.out_features % (3 * heads)):
            raise ConversionError(f"cannot convert module {label!r}: qkv and proj must be "
                                  f"nn.Linear, qkv with 3 x {heads} heads of outputs")
        head_dim = qkv.out_features // (3 * heads)
        if proj.in_features != heads * head_dim or proj.out_features != qkv.in_features:
            raise ConversionError(f"cannot convert module {label!r}: proj must map "
                                  f"{heads} heads x {head_dim} back to {qkv.in_features}")
        qw, kw, vw, qb, kb, vb = fused_qkv_parts(attn)
        drop = attn.attn_drop
        return MHAWeights(heads, head_dim, qw, kw, vw, proj.weight, qb, kb, vb, proj.bias,
                          attn_drop=float(drop.p) if isinstance(drop, nn.Dropout) else 0.0,
                          proj_drop=float(attn.proj_drop.p)
                          if isinstance(attn.proj_drop, nn.Dropout) else 0.0)

    def data_pooling_reason(self, model: nn.Module, module: nn.Module) -> str | None:
        return "per-head relative position bias"

    def grouped_attention(self, module: nn.Module, weights: MHAWeights, num_kv_heads: int,
                          scheme: str, options: dict[str, Any]) -> GroupedQueryAttention:
        attn: Any = module
        return RelPosGroupedAttention(
            weights.width, weights.num_heads, num_kv_heads, scheme,
            bias_table=getattr(attn, "relative_position_bias_table", None),
            bias_index=getattr(attn, "relative_position_index", None), **options)

    def write_extras(self, module: nn.Module, grouped: GroupedQueryAttention) -> None:
        table = getattr(grouped, "relative_position_bias_table", None)
        target = getattr(module, "relative_position_bias_table", None)
        if (table is None) != (target is None):
            raise ExportError("cannot export: the converted attention and the rebuilt timm "
                              "attention disagree on having a relative position bias table")
        if table is not None and target is not None:
            with torch.no_grad():
                target.copy_(table)

    def base_spec(self, model: nn.Module) -> dict[str, Any] | None:
        return None  # recorded by name: kdgqa.create_timm_vit(NAME, ...) or load_model


class TimmBeit(_RelPosFamily):
    """timm ``Beit`` (BEiT v1/v2): per-head relative position bias, shared or per layer."""

    name = "timm BEiT"
    library = "timm-beit"
    supported = "timm BEiT Attention (relative position bias)"
    attention_module = "timm.models.beit"
    attention_class = "Attention"
    model_classes = ("Beit",)


class TimmSwin(_RelPosFamily):
    """timm ``SwinTransformer``: windowed attention, per-head relative position bias and the
    shifted-window mask."""

    name = "timm Swin"
    library = "timm-swin"
    supported = "timm Swin WindowAttention (relative position bias, shifted windows)"
    attention_module = "timm.models.swin_transformer"
    attention_class = "WindowAttention"
    model_classes = ("SwinTransformer",)

"""What every Hugging Face vision-transformer architecture shares, and the one place each
differs (:class:`HFArchitecture`).

In transformers 5.x the self-attentions of ViT, DeiT, DINOv2, CLIP/SigLIP image towers and
BEiT all have the same flat layout: ``q_proj``/``k_proj``/``v_proj`` and an output projection
(``o_proj`` or ``out_proj``), called as ``attn(hidden_states, attention_mask=None, **kw)`` and
returning ``(output, weights)``. One grouped replacement (:class:`HFGroupedAttention`) serves
them all; an architecture adapter says which classes it covers, where the projections are,
which attention-like modules stay multi-head and how features are read. BEiT's relative
position bias reaches the attention as ``attention_mask`` (added per query head to the
logits), which the replacement hands to SDPA unchanged, so it stays exact after K/V pooling.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any, ClassVar

from torch import Tensor, nn

from kdgqa.attention import GroupedQueryAttention
from kdgqa.errors import ConversionError, KdgqaError, SourceError
from kdgqa.models.base import Features, MHAWeights

__all__ = ["OUTPUT_STYLES", "HFArchitecture", "HFGroupedAttention", "dropout_p",
           "quiet_transformers"]

OUTPUT_STYLES = ("flat", "legacy-tuple", "tensor")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class HFGroupedAttention(GroupedQueryAttention):
    """:class:`GroupedQueryAttention` called like a transformers self-attention.

    ``output_style`` is what the installed layer unpacks: ``"flat"`` returns ``(out, None)``
    and applies ``attention_mask`` (an additive bias; one per query head is reordered with
    the query heads of a calibrated scheme);
    ``"legacy-tuple"`` (ViT 4.40-4.56) returns ``(out,)`` or ``(out, None)`` when attentions
    are requested; ``"tensor"`` (ViT 4.57-5.0x) returns ``out``. Attention weights are never
    materialised.
    """

    def __init__(self, *args: Any, output_style: str = "flat", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if output_style not in OUTPUT_STYLES:
            raise KdgqaError(f"unknown output_style {output_style!r}; valid: "
                             f"{', '.join(OUTPUT_STYLES)}")
        self.output_style = output_style

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if self.output_style == "flat":
            mask = args[0] if args else kwargs.get("attention_mask")
            out = super().forward(hidden_states, attn_mask=self._query_order(mask))
            return out, None
        head_mask = args[0] if args else kwargs.get("head_mask")
        if head_mask is not None:
            raise KdgqaError("head_mask is not supported by grouped-query attention")
        out = super().forward(hidden_states)
        if self.output_style == "tensor":
            return out
        wants = args[1] if len(args) > 1 else kwargs.get("output_attentions", False)
        return (out, None) if wants else (out,)

    def _query_order(self, mask: Tensor | None) -> Tensor | None:
        """``mask`` with its per-head biases (BEiT's relative position bias, in the original
        head order) reordered like the query heads: calibrated schemes hold original head
        ``head_order[p]`` at position ``p``."""
        order = getattr(self.allocator, "head_order", None)
        if (mask is None or order is None or mask.dim() < 3
                or mask.shape[-3] != self.num_heads or self.num_heads == 1):
            return mask
        return mask.index_select(-3, order.to(mask.device))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, output_style={self.output_style!r}"


def dropout_p(value: Any) -> float:
    """The rate of a dropout given as an ``nn.Dropout`` or a number (0 for anything else)."""
    if isinstance(value, nn.Dropout):
        return float(value.p)
    return float(value) if isinstance(value, int | float) else 0.0


class HFArchitecture:
    """One transformers architecture (ViT, DeiT, ...): the classes it covers and how its
    attention and outputs are read. Subclasses set the class variables and override the few
    methods where the architecture differs."""

    #: Short name for messages, e.g. ``"DeiT"``.
    name: ClassVar[str]
    #: ``config.json`` ``model_type`` values this architecture loads.
    model_types: ClassVar[tuple[str, ...]]
    #: Model classes (names in ``transformers``) it converts, records and loads.
    classes: ClassVar[tuple[str, ...]]
    #: ``transformers.models.<module>.modeling_<module>`` and its attention class name.
    module: ClassVar[str]
    attention: ClassVar[str]
    #: Attribute names of the classifier(s) of task models; those present are reset
    #: together and the first present one's input is the pre-logit feature.
    classifiers: ClassVar[tuple[str, ...]] = ("classifier",)
    mean: ClassVar[tuple[float, ...]] = (0.5,)
    std: ClassVar[tuple[float, ...]] = (0.5,)

    # ---------------------------------------------------------------- attention
    def attention_class(self) -> type | None:
        try:
            modeling = importlib.import_module(
                f"transformers.models.{self.module}.modeling_{self.module}")
        except ImportError:
            return None
        cls = getattr(modeling, self.attention, None)
        return cls if isinstance(cls, type) else None

    def is_attention(self, module: nn.Module) -> bool:
        cls = self.attention_class()
        return cls is not None and type(module) is cls

    def keeps(self, module: nn.Module) -> bool:
        """Attention-like modules left multi-head (none by default)."""
        return False

    def layout(self, module: nn.Module) -> str:
        """The output style the installed layer expects (see :class:`HFGroupedAttention`)."""
        return "flat"

    def projections(self, module: nn.Module) -> tuple[Any, Any, Any, Any]:
        """The q, k, v and output ``nn.Linear`` of ``module``."""
        attn: Any = module
        out = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
        return attn.q_proj, attn.k_proj, attn.v_proj, out

    def head_dim(self, module: nn.Module) -> int:
        return int(getattr(module, "head_dim"))  # noqa: B009 (typed as Any)

    def dropouts(self, module: nn.Module) -> tuple[float, float]:
        attn: Any = module
        rate = getattr(attn, "attention_dropout", getattr(attn, "dropout", 0.0))
        return dropout_p(rate), 0.0

    def read_attention(self, module: nn.Module, label: str) -> MHAWeights:
        q, k, v, o = self.projections(module)
        if not all(isinstance(m, nn.Linear) for m in (q, k, v, o)):
            raise ConversionError(f"cannot convert module {label!r}: projections must be "
                                  "nn.Linear")
        head_dim = self.head_dim(module)
        heads = q.out_features // head_dim
        width = heads * head_dim
        if any(m.out_features != width for m in (q, k, v)) or o.in_features != width:
            raise ConversionError(f"cannot convert module {label!r}: projections do not "
                                  f"match {heads} heads x {head_dim}")
        if o.out_features != q.in_features:
            raise ConversionError(f"cannot convert module {label!r}: output width "
                                  f"{o.out_features} != input width {q.in_features}")
        biases = [m.bias for m in (q, k, v)]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            # A projection without bias (BEiT's keys) is one whose bias is zero.
            biases = [b if b is not None else m.weight.new_zeros(m.out_features).detach()
                      for b, m in zip(biases, (q, k, v), strict=True)]
        attn_drop, proj_drop = self.dropouts(module)
        return MHAWeights(heads, head_dim, q.weight, k.weight, v.weight, o.weight, biases[0],
                          biases[1], biases[2], o.bias, attn_drop=attn_drop,
                          proj_drop=proj_drop)

    def check_layer(self, path: str) -> None:
        """Raise ``ConversionError`` for an attention at ``path`` that cannot be grouped
        exactly (e.g. a causal text tower); by default every layer can."""

    def grouped_attention(self, module: nn.Module, weights: MHAWeights, num_kv_heads: int,
                          scheme: str, options: dict[str, Any]) -> GroupedQueryAttention:
        return HFGroupedAttention(weights.width, weights.num_heads, num_kv_heads, scheme,
                                  output_style=self.layout(module), **options)

    # ---------------------------------------------------------------- the model
    def owns(self, model: nn.Module) -> bool:
        return (type(model).__name__ in self.classes
                and getattr(model, "config", None) is not None)

    def heads(self, model: nn.Module) -> list[str]:
        """The classifier attributes ``model`` has."""
        return [n for n in self.classifiers if isinstance(getattr(model, n, None), nn.Module)]

    def classifier(self, model: nn.Module) -> nn.Module | None:
        heads = self.heads(model)
        return getattr(model, heads[0]) if heads else None

    def pooled(self, output: Any) -> Tensor:
        """Pre-logit features of a model without classifier: its first token by default."""
        hidden: Tensor = output.last_hidden_state
        return hidden[:, 0]

    def features(self, model: nn.Module, x: Tensor) -> Features:
        """The classifier's input (captured as it is called) and the logits; without a
        classifier, :meth:`pooled` of the backbone's output and no logits (a masked-image
        model's predictions are not class logits)."""
        captured: list[Tensor] = []
        head = self.classifier(model)
        handle = None if head is None else head.register_forward_pre_hook(
            lambda _module, args: captured.append(args[0]))
        try:
            output = model(pixel_values=x)
        finally:
            if handle is not None:
                handle.remove()
        if head is None:
            if getattr(output, "last_hidden_state", None) is None:
                # A task model without classifier (masked image modelling): its backbone.
                hf: Any = model
                output = hf.base_model(pixel_values=x)
            return Features(self.pooled(output), None)
        return Features(captured[0], getattr(output, "logits", None))

    def num_classes(self, model: nn.Module) -> int | None:
        if self.classifier(model) is None:
            return None
        config: Any = getattr(model, "config", None)
        return int(config.num_labels)

    def reset_classifier(self, model: nn.Module, num_classes: int) -> None:
        hf: Any = model
        if self.classifier(model) is None:
            raise SourceError(f"a {type(model).__name__} has no classifier to reset; use a "
                              f"{self.name} image-classification model")
        for name in self.heads(model):
            old = getattr(hf, name)
            if not isinstance(old, nn.Linear):
                raise SourceError(f"cannot reset {type(model).__name__}.{name}: it is a "
                                  f"{type(old).__name__}, not a Linear classifier")
            setattr(hf, name, nn.Linear(old.in_features, num_classes).to(
                device=old.weight.device, dtype=old.weight.dtype))
        hf.config.num_labels = num_classes
        hf.num_labels = num_classes

    def init_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """Constructor arguments besides the config that rebuild ``model``'s structure."""
        hf: Any = model
        params = inspect.signature(type(model).__init__).parameters
        kwargs: dict[str, Any] = {}
        if "add_pooling_layer" in params:
            kwargs["add_pooling_layer"] = getattr(hf, "pooler", None) is not None
        if "use_mask_token" in params:
            embeddings = getattr(hf, "embeddings", None)
            kwargs["use_mask_token"] = getattr(embeddings, "mask_token", None) is not None
        return kwargs


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hold back transformers' log records and progress bars while loading, so a failure
    prints one line (the caller summarises what matters on success)."""
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("transformers")
    handlers, bars = logger.handlers[:], hf_logging.is_progress_bar_enabled()
    logger.handlers = [logging.NullHandler()]
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.handlers = handlers
        if bars:
            hf_logging.enable_progress_bar()

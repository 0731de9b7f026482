"""What kdgqa needs to know about a family of models, in one interface.

Everything that differs between timm and Hugging Face models (and any family added later)
lives behind :class:`ModelFamily`: recognising the model and its attention modules, reading
their projections, building the grouped replacement, writing MHA weights back for export,
reading features for fidelity, the input geometry, and how to record and rebuild the base
model offline. The rest of kdgqa is written against this interface only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from kdgqa.attention import GroupedQueryAttention

__all__ = ["Features", "InputGeometry", "MHAWeights", "ModelFamily"]


@dataclass
class MHAWeights:
    """The four projections of one multi-head attention, as ``(out, in)`` weights + biases."""

    num_heads: int
    head_dim: int
    q_weight: Tensor
    k_weight: Tensor
    v_weight: Tensor
    o_weight: Tensor
    q_bias: Tensor | None
    k_bias: Tensor | None
    v_bias: Tensor | None
    o_bias: Tensor | None
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    #: Keys are normalised after the projection (qk-norm): rotating heads (``align``) or
    #: fitting K from moments (``pooling="fit"``) reasons about raw projections and is refused.
    key_norm: bool = False

    @property
    def width(self) -> int:
        """The model width the projections read from (and the output projection writes)."""
        return int(self.q_weight.shape[1])


@dataclass(frozen=True)
class InputGeometry:
    """The images a model expects: channels, square size and normalisation."""

    channels: int
    image_size: int
    mean: list[float]
    std: list[float]


@dataclass(frozen=True)
class Features:
    """A model's last representation of a batch (pre-logits) and its logits, if it has a
    classifier."""

    pre_logits: Tensor
    logits: Tensor | None


class ModelFamily(ABC):
    """One family of models (timm ViTs, Hugging Face ViTs, ...) as kdgqa sees it.

    Subclasses are stateless; register an instance with
    :func:`kdgqa.models.registry.register_model_family`.
    """

    #: Short name used in messages, e.g. ``"timm ViT"``.
    name: ClassVar[str]
    #: The ``library`` value of the base-model records this family writes and rebuilds.
    library: ClassVar[str]
    #: What a supported model and attention look like, for "cannot convert" messages.
    supported: ClassVar[str]

    # ---------------------------------------------------------------- the model
    @abstractmethod
    def owns(self, model: nn.Module) -> bool:
        """Whether ``model`` (the whole model) belongs to this family."""

    @abstractmethod
    def is_attention(self, module: nn.Module) -> bool:
        """Whether ``module`` is a multi-head attention this family can read."""

    @abstractmethod
    def read_attention(self, module: nn.Module, label: str) -> MHAWeights:
        """The projections of ``module``; ``ConversionError`` naming ``label`` when the
        configuration cannot be reproduced."""

    def keeps(self, module: nn.Module) -> bool:
        """Whether ``module`` is an attention this family deliberately leaves multi-head
        (e.g. a latent-query pooling head); conversion skips it and everything inside it.
        By default none."""
        return False

    def check_model(self, model: nn.Module, attention_paths: list[str]) -> None:  # noqa: B027
        """Raise ``ConversionError`` when attention is found only in part of ``model``
        (e.g. blocks whose attention is fused into the block); by default nothing to check."""

    def data_pooling_reason(self, model: nn.Module, module: nn.Module) -> str | None:
        """Why data-driven pooling or grouping (``pooling="fit"``, ``align``, calibrated
        schemes) would not be exact on attention ``module`` of ``model`` (e.g. a norm between
        the projections and the logits), or None when it is; by default None."""
        return None

    @abstractmethod
    def grouped_attention(self, module: nn.Module, weights: MHAWeights, num_kv_heads: int,
                          scheme: str, options: dict[str, Any]) -> GroupedQueryAttention:
        """An uninitialised replacement for ``module`` that its parent can call as before."""

    @abstractmethod
    def write_attention(self, module: nn.Module, weights: MHAWeights) -> None:
        """Copy ``weights`` (one K/V head per query head) into an MHA ``module``."""

    def write_extras(self, module: nn.Module, grouped: GroupedQueryAttention) -> None:  # noqa: B027
        """Copy what ``grouped`` holds besides its projections (q/k norms, output norm) into
        the family's own attention ``module``; by default there is nothing."""

    @abstractmethod
    def features(self, model: nn.Module, x: Tensor) -> Features:
        """Pre-logit features (and logits) of ``model`` on images ``x``."""

    @abstractmethod
    def num_classes(self, model: nn.Module) -> int | None:
        """The classes ``model``'s classifier predicts (None without a classifier)."""

    @abstractmethod
    def reset_classifier(self, model: nn.Module, num_classes: int) -> None:
        """Give ``model`` a new classifier for ``num_classes`` classes, drawn from torch's
        generator (the caller seeds it)."""

    @abstractmethod
    def input_geometry(self, model: nn.Module) -> InputGeometry:
        """Channels, size and normalisation of the inputs ``model`` expects."""

    # ---------------------------------------------------------------- rebuilding offline
    @abstractmethod
    def base_spec(self, model: nn.Module) -> dict[str, Any] | None:
        """A JSON record from which :meth:`build_base` rebuilds ``model``'s architecture,
        or None when this family cannot describe it."""

    @abstractmethod
    def build_base(self, spec: dict[str, Any]) -> nn.Module:
        """The randomly initialised MHA model a record describes; ``SourceError`` if bad."""

    @abstractmethod
    def save_plain(self, model: nn.Module, spec: dict[str, Any], directory: Path) -> None:
        """Write an MHA ``model`` in the family's own format, loadable without kdgqa."""

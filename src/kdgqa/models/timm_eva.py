"""timm's ``Eva`` family: EVA, EVA-02 (rotary position embedding, SwiGLU, qk-norm, scale-norm).

Attention is timm's ``EvaAttention`` (``attn_type="eva"``) or ``AttentionRope``
(``attn_type="rope"``), fused ``qkv`` (with ``q_bias`` / ``v_bias`` and a fixed zero K bias)
or separate ``q_proj`` / ``k_proj`` / ``v_proj``. Why pooling K/V stays exact with each extra:

* **rope**: the block passes one rotary tensor that rotates every head's queries and keys by
  the same position-dependent rotation (prefix tokens untouched), so a KV head pooled from a
  group is rotated exactly as each head of the group would have rotated it. Per-head
  frequencies (``rope_type="mixed"``) would need one rotation per query head of a shared key
  and are refused.
* **qk-norm**: ``q_norm`` / ``k_norm`` are one norm over ``head_dim`` shared by all heads, so
  the grouped model normalises the pooled key exactly as the MHA model with pooled K weights
  normalises each copy of it.
* **scale-norm** (``scale_attn_inner``): a norm over the concatenated head outputs before
  ``proj``; every query head still produces its own output, so it is kept as it is. Query
  heads are never permuted here (calibrated schemes are refused), so its weights stay valid.

Gated attention, ``AttentionRope`` with fewer KV heads already, and ``AttentionRope`` outside
an ``Eva`` are refused. ``pooling="fit"``, ``align`` and calibrated schemes assume logits
``q . k`` linear in the K projection and outputs linear in V; rope (``align``'s rotations
do not commute with it), qk-norm and scale-norm break that, so they are refused on such
models.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import Tensor, nn

from kdgqa.attention import GroupedQueryAttention
from kdgqa.errors import ConversionError
from kdgqa.models.base import MHAWeights
from kdgqa.models.timm_vit import TimmViT, fused_qkv_parts, is_identity, jsonable

__all__ = ["EVA_CLASSES", "EvaRotary", "TimmEva", "create_timm_eva", "eva_full_kwargs"]

EVA_CLASSES = ("Eva",)
#: A registered Eva name whose builder lets every constructor argument be overridden, so
#: ``create_model(name, **full_kwargs)`` builds ``Eva(**full_kwargs)`` (checked on export).
EVA_STAND_IN = "eva02_tiny_patch14_224"
# Constructor arguments that are objects, not JSON: they keep Eva's defaults.
_NOT_RECORDED = {"self", "norm_layer", "device", "dtype"}


def _attention_classes() -> tuple[type, ...]:
    classes: list[type] = []
    try:
        from timm.models.eva import EvaAttention

        classes.append(EvaAttention)
    except ImportError:
        pass
    try:
        from timm.layers import AttentionRope

        classes.append(AttentionRope)
    except ImportError:
        pass
    return tuple(classes)


def _dropout_p(module: Any) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


class EvaRotary(nn.Module):
    """Rotates queries or keys ``(B, heads, N, head_dim)`` by timm's concatenated sin/cos
    rotary tensor, leaving the first ``num_prefix_tokens`` tokens (class/register) alone,
    as timm's Eva attention does. Holds no parameters."""

    def __init__(self, num_prefix_tokens: int, rotate_half: bool) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.rotate_half = rotate_half

    def forward(self, t: Tensor, rope: Tensor) -> Tensor:
        from timm.layers import apply_rot_embed_cat

        npt = self.num_prefix_tokens
        rotated = apply_rot_embed_cat(t[:, :, npt:, :], rope, half=self.rotate_half)
        return torch.cat([t[:, :, :npt, :], rotated.type_as(t)], dim=2)

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}, rotate_half={self.rotate_half}"


def _extras_reason(attn: Any, rope: bool) -> str | None:
    """Why a data-driven pooling/grouping would not be exact on ``attn`` (None: it would)."""
    found = [name for name, present in (
        ("rotary position embedding", rope),
        ("qk-norm", not is_identity(getattr(attn, "q_norm", None))),
        ("scale-norm", not is_identity(getattr(attn, "norm", None))),
    ) if present]
    return ", ".join(found) or None


def eva_full_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every JSON-able ``Eva`` constructor argument: ``kwargs`` over the class defaults."""
    from timm.models.eva import Eva

    full = {name: p.default for name, p in inspect.signature(Eva.__init__).parameters.items()
            if name not in _NOT_RECORDED and p.default is not inspect.Parameter.empty}
    full.update(kwargs)
    return dict(jsonable(full))


class TimmEva(TimmViT):
    """timm ``Eva`` (EVA / EVA-02) with ``EvaAttention`` or ``AttentionRope``.

    Features, classifier and input geometry work as for timm ViTs (same timm head API), so
    those come from :class:`TimmViT`; attention, records and export are Eva's own.
    """

    name = "timm Eva"
    library = "timm-eva"
    supported = ("timm EvaAttention / AttentionRope inside Eva (rope, qk-norm, scale-norm; "
                 "no gate)")

    def owns(self, model: nn.Module) -> bool:
        return type(model).__name__ in EVA_CLASSES and hasattr(model, "blocks")

    def is_attention(self, module: nn.Module) -> bool:
        return type(module) in _attention_classes()

    def read_attention(self, module: nn.Module, label: str) -> MHAWeights:
        attn: Any = module
        allowed = {"qkv", "q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "attn_drop",
                   "norm", "proj", "proj_drop", "gate"}
        extra = sorted({name for name, _ in attn.named_children()} - allowed)
        if extra:
            raise ConversionError(f"cannot convert module {label!r}: unknown submodule "
                                  f"{extra[0]!r} in timm {type(attn).__name__}")
        if getattr(attn, "gate", None) is not None:
            raise ConversionError(f"cannot convert module {label!r}: gated attention is not "
                                  "supported")
        heads, head_dim = int(attn.num_heads), int(attn.head_dim)
        for name in ("q_norm", "k_norm"):
            norm: Any = getattr(attn, name, None)
            if not is_identity(norm) and any(p.numel() != head_dim for p in norm.parameters()):
                # A per-head norm would have to be pooled too: one KV head, several norms.
                raise ConversionError(f"cannot convert module {label!r}: {name} must be one "
                                      f"norm over head_dim={head_dim} shared by every head")
        kv_heads = int(getattr(attn, "num_kv_heads", heads))
        if kv_heads != heads:
            raise ConversionError(f"cannot convert module {label!r}: it has {kv_heads} KV "
                                  f"heads already; expected multi-head attention ({heads})")
        width = heads * head_dim
        proj = attn.proj
        if not isinstance(proj, nn.Linear) or proj.in_features != width:
            raise ConversionError(f"cannot convert module {label!r}: proj must be an "
                                  f"nn.Linear reading {heads} heads x {head_dim}")
        if attn.qkv is not None:
            qkv = attn.qkv
            if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * width:
                raise ConversionError(f"cannot convert module {label!r}: qkv must be an "
                                      f"nn.Linear with 3 x {heads} heads x {head_dim} outputs")
            qw, kw, vw, qb, kb, vb = fused_qkv_parts(attn)
        else:
            projs = (attn.q_proj, attn.k_proj, attn.v_proj)
            if not all(isinstance(p, nn.Linear) and p.out_features == width for p in projs):
                raise ConversionError(f"cannot convert module {label!r}: q/k/v_proj must be "
                                      f"nn.Linear with {heads} heads x {head_dim} outputs")
            qw, kw, vw = (p.weight for p in projs)
            biases = [p.bias for p in projs]
            if all(b is None for b in biases):
                qb = kb = vb = None
            else:
                qb, kb, vb = (torch.zeros(width, dtype=qw.dtype, device=qw.device)
                              if b is None else b for b in biases)
        in_width = int(qw.shape[1])
        if proj.out_features != in_width:
            raise ConversionError(f"cannot convert module {label!r}: output width "
                                  f"{proj.out_features} differs from input width {in_width}")
        return MHAWeights(heads, head_dim, qw, kw, vw, proj.weight, qb, kb, vb, proj.bias,
                          attn_drop=_dropout_p(getattr(attn, "attn_drop", None)),
                          proj_drop=_dropout_p(getattr(attn, "proj_drop", None)))

    def check_model(self, model: nn.Module, attention_paths: list[str]) -> None:
        if type(model).__name__ not in EVA_CLASSES:
            paths = ", ".join(repr(p) for p in attention_paths[:1])
            raise ConversionError(f"cannot convert module {paths}: timm EvaAttention / "
                                  f"AttentionRope is supported inside timm Eva only, not "
                                  f"{type(model).__qualname__}")
        if getattr(model, "rope_mixed", False):
            raise ConversionError("cannot convert this Eva: rope_type='mixed' rotates every "
                                  "head by its own learnt frequencies, so one KV head cannot "
                                  "serve a group exactly")
        super().check_model(model, attention_paths)

    def data_pooling_reason(self, model: nn.Module, module: nn.Module) -> str | None:
        rope = getattr(model, "rope", None) is not None
        return _extras_reason(module, rope)

    def grouped_attention(self, module: nn.Module, weights: MHAWeights, num_kv_heads: int,
                          scheme: str, options: dict[str, Any]) -> GroupedQueryAttention:
        attn: Any = module

        def kept(name: str) -> nn.Module | None:
            part = getattr(attn, name, None)
            return None if is_identity(part) else copy.deepcopy(part)

        rotary = EvaRotary(int(attn.num_prefix_tokens), bool(getattr(attn, "rotate_half",
                                                                      False)))
        return GroupedQueryAttention(weights.width, weights.num_heads, num_kv_heads, scheme,
                                     q_norm=kept("q_norm"), k_norm=kept("k_norm"),
                                     rotary=rotary, out_norm=kept("norm"), **options)

    # ---------------------------------------------------------------- records
    def base_spec(self, model: nn.Module) -> dict[str, Any] | None:
        return None  # an Eva is recorded when built by create_timm_eva or load_model

    def unnamed_class(self, spec: dict[str, Any]) -> type[nn.Module]:
        from timm.models.eva import Eva

        return Eva

    def _export_config(self, spec: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        if spec.get("name"):
            return super()._export_config(spec, model)
        stand_in = {**spec, "name": EVA_STAND_IN,
                    "kwargs": eva_full_kwargs(dict(spec.get("kwargs") or {}))}
        return super()._export_config(stand_in, model)


def create_timm_eva(name: str | None = None, **eva_kwargs: Any) -> nn.Module:
    """Build a randomly initialised timm Eva that remembers how it was built.

    With ``name`` from ``timm.create_model(name, pretrained=False, **kwargs)``; without, from
    ``timm.models.eva.Eva(**kwargs)``. :func:`kdgqa.save_pretrained` can then rebuild it
    offline. Keyword values must be JSON-serialisable.
    """
    spec = {"library": TimmEva.library, "name": name, "class": None if name else "Eva",
            "kwargs": jsonable(dict(eva_kwargs))}
    model = TimmEva().build_base(spec)
    setattr(model, "kdgqa_base", spec)  # noqa: B010 (nn.Module attribute typing)
    return model.eval()

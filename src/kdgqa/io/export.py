"""Write a grouped-query model with a fixed allocation back as a plain MHA checkpoint.

Each query head gets its own copy of the K/V head it reads, so the exported model computes
exactly what the grouped one computes at evaluation time, and loads with timm or
transformers alone -- no kdgqa needed. Schemes whose map is not fixed (``kdgqa``,
``kdgqa-ps``, reference DGQA, reference PGQA's evaluation noise, or any registered scheme
that does not declare a fixed map) are refused; sound DGQA exports its frozen, learnt
allocation.

Output: timm models get ``model.safetensors`` + a timm ``config.json`` (``architecture``,
``model_args``), loadable with ``timm.create_model("local-dir:DIR", pretrained=True)`` or
``timm.create_model(architecture, checkpoint_path=DIR/model.safetensors, **model_args)``;
Hugging Face models get the model's own ``save_pretrained`` output.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from torch import Tensor, nn

from kdgqa.attention import GroupedQueryAttention
from kdgqa.errors import ExportError, OutputError
from kdgqa.io.base import base_spec, build_base
from kdgqa.io.weights import safetensors_failure
from kdgqa.models.base import MHAWeights
from kdgqa.models.locate import grouped_layers
from kdgqa.models.registry import family_for_library, family_of_attention
from kdgqa.models.timm_pool import GroupedAttentionPoolLatent, expanded_kv_state

__all__ = ["export_mha", "fixed_kv_index"]


def fixed_kv_index(module: GroupedQueryAttention, path: str = "") -> Tensor:
    """The query-head -> KV-head map ``module`` uses at evaluation time, if it is fixed;
    :class:`~kdgqa.errors.ExportError` naming ``path`` and the reason otherwise."""
    index = module.allocator.fixed_kv_index()
    if index is None:
        raise ExportError(f"cannot export {path or '<root>'!r}: "
                          f"{module.allocator.dynamic_reason()}")
    return index.cpu()


def expanded_weights(module: GroupedQueryAttention, kv_index: Tensor) -> MHAWeights:
    """The projections of ``module`` as plain MHA: K/V repeated along ``kv_index``."""
    heads, kv_heads, dim = module.num_heads, module.num_kv_heads, module.head_dim

    def split(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = t.detach().split([heads * dim, kv_heads * dim, kv_heads * dim])

        def repeat(x: Tensor) -> Tensor:
            rows = x.reshape(kv_heads, dim, *x.shape[1:])[kv_index]
            return rows.reshape(heads * dim, *x.shape[1:])

        return q, repeat(k), repeat(v)

    qw, kw, vw = split(module.qkv.weight)
    qb, kb, vb = split(module.qkv.bias) if module.qkv.bias is not None else (None, None, None)
    ob = module.proj.bias.detach() if module.proj.bias is not None else None
    return MHAWeights(heads, dim, qw, kw, vw, module.proj.weight.detach(), qb, kb, vb, ob)


def export_mha(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (converted, fixed allocation) as a plain timm/HF MHA checkpoint.

    Every non-attention tensor is copied unchanged; attention K/V heads are repeated so each
    query head has the one it reads. Returns ``directory``.
    """
    grouped = list(grouped_layers(model))
    if not grouped:
        raise ExportError("model has no GroupedQueryAttention to export; save it directly")
    plans = [(path, module, fixed_kv_index(module, path)) for path, module in grouped]
    spec = base_spec(model)
    base = build_base(spec)
    base_state = base.state_dict()
    attention_paths = [path for path, _, _ in plans]
    copied = {
        key: value
        for key, value in model.state_dict().items()
        if not any(key.startswith(p + ".") for p in attention_paths)
    }
    for path, pool in model.named_modules():  # grouped attention-pooling heads: repeat K/V
        if isinstance(pool, GroupedAttentionPoolLatent):
            copied.update(expanded_kv_state(pool, f"{path}."))
    for key, value in copied.items():
        if key not in base_state or base_state[key].shape != value.shape:
            raise ExportError(f"tensor {key!r} has no counterpart in the rebuilt base model")
    base.load_state_dict(copied, strict=False)
    family = family_for_library(spec.get("library"))
    for path, module, kv_index in plans:
        target = base.get_submodule(path)
        # The attention's own family: one library (timm) serves several families.
        writer = family_of_attention(target) or family
        writer.write_attention(target, expanded_weights(module, kv_index))
        writer.write_extras(target, module)
    base.to(grouped[0][1].qkv.weight.dtype)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        family.save_plain(base, spec, directory)
    except (OSError, SafetensorError) as error:  # the writers on a full disk
        raise OutputError(directory, safetensors_failure(error)) from None
    return directory

"""The model families kdgqa supports, as tiny real models, and the checks that back the
families table (``docs/families.md``, written by ``scripts/families_table.py``).

One list (:data:`CASES`) is read by the tests (``test_families_matrix.py``) and the script,
so the table states what the tests check. Every model is tiny (width 32, 4 heads, 1-2
blocks) and its norms and layer scales are perturbed away from their initial values (ones,
zeros, 1e-5), so exactness is tested on a layer that does something.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: fp32 logits within 1e-5 relative (to the largest logit): SDPA vs the original's attention
#: path differ by rounding only (~1e-7), far below.
RTOL = 1e-5
HEADS = 4
FEWER = 2  # G < H: two KV heads of two query heads each


@dataclass(frozen=True)
class Case:
    """One family member: how to build it tiny, and what kdgqa should do with it."""

    name: str
    library: str
    build: Callable[[], nn.Module]
    image_size: int = 32
    #: A substring of the one-line ConversionError expected instead of a conversion.
    refuses: str | None = None
    #: What the table says beside the checks (why something is left or kept).
    note: str = ""
    #: Checks expected to fail, with why (the table reports them as they come out).
    known_gaps: dict[str, str] = field(default_factory=dict)
    #: Whether a uniform conversion exports as a native timm GQA checkpoint (``export_native``)
    #: that stock timm loads; when False, export_native must refuse in one line.
    native: bool = False


def _perturb(model: nn.Module) -> nn.Module:
    """Move norm weights/biases and layer scales off their initial values (seeded)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if ((param.dim() == 1 and ("norm" in name or leaf in {"gamma", "gamma_1", "gamma_2", "lambda_1", "lambda_2"}
                                      or ".ls" in name or "layer_scale" in name))
                    or leaf == "relative_position_bias_table"):  # BEiT's starts at zero
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _timm(name: str | None = None, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from kdgqa.models.timm_vit import create_timm_vit

        torch.manual_seed(0)
        args = dict(embed_dim=32, depth=2, num_heads=HEADS, num_classes=5, img_size=32,
                    patch_size=8)
        args.update(kwargs)
        return _perturb(create_timm_vit(name, **args))
    return build


def _timm_class(**kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        args = dict(embed_dim=32, depth=2, num_heads=HEADS, num_classes=5, img_size=32,
                    patch_size=8)
        args.update(kwargs)
        return _perturb(VisionTransformer(**args))
    return build


#: The schemes that choose groups from calibration images.
CALIBRATED_SCHEMES = ("calibrated", "similarity")
#: Why calibrated grouping is refused where position terms act on each head's logits.
INEXACT_CALIBRATION = ("calibrated grouping refused: the calibration objective measures raw "
                       "projections, not the {what} the logits go through")


def _eva(name: str | None = None, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from kdgqa.models.timm_eva import create_timm_eva

        torch.manual_seed(0)
        args = dict(embed_dim=32, depth=2, num_heads=HEADS, num_classes=5, img_size=32,
                    patch_size=8)
        args.update(kwargs)
        return _perturb(create_timm_eva(name, **args))
    return build


def _swin() -> nn.Module:
    from kdgqa.models.timm_vit import create_timm_vit

    torch.manual_seed(0)
    # 8 x 8 patches in 4 x 4 windows: the second block shifts its windows (masked attention).
    return _perturb(create_timm_vit("swin_tiny_patch4_window7_224", img_size=32, patch_size=4,
                                    window_size=4, embed_dim=32, depths=(2,),
                                    num_heads=(HEADS,), num_classes=5))


def _parallel_scaling() -> nn.Module:
    from timm.models.vision_transformer import ParallelScalingBlock

    return _timm_class(block_fn=ParallelScalingBlock)()


def _hf(cls_name: str, config_name: str, init: dict[str, Any] | None = None,
        **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        args: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=HEADS, intermediate_size=64,
                                    image_size=32, patch_size=8)
        args.update(config)
        cfg = getattr(transformers, config_name)(**args)
        return _perturb(getattr(transformers, cls_name)(cfg, **(init or {})))
    return build


def _clip_model() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=HEADS,
                 intermediate_size=64)
    config = CLIPConfig(text_config=dict(small, vocab_size=50, bos_token_id=0, eos_token_id=1),
                        vision_config=dict(small, image_size=32, patch_size=8),
                        projection_dim=16)
    return CLIPModel(config).eval()


def _clip_classifier(prefix: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS,
                     intermediate_size=64)
        config = getattr(transformers, f"{prefix}Config")(
            text_config=dict(small, vocab_size=50, bos_token_id=0, eos_token_id=1),
            vision_config=dict(small, image_size=32, patch_size=8), num_labels=5)
        return _perturb(getattr(transformers, f"{prefix}ForImageClassification")(config))
    return build


QK_NORM_EXPORT = ("export copies qkv/proj only (io/export.py), so the trained q/k norms "
                  "would be lost; refused")

CASES: list[Case] = [
    Case("ViT", "timm", _timm("vit_tiny_patch16_224"), native=True),
    Case("DeiT distilled", "timm", _timm("deit_tiny_distilled_patch16_224")),
    Case("DeiT III (layer scale, no_embed_class)", "timm", _timm("deit3_small_patch16_224"),
         native=True),
    Case("DINOv2 (layer scale, patch 14, 4 registers, no_embed_class)", "timm",
         _timm("vit_small_patch14_reg4_dinov2", img_size=28, patch_size=14), image_size=28,
         native=True),
    Case("CLIP image tower (pre_norm, quick_gelu, token pool)", "timm",
         _timm("vit_base_patch16_clip_quickgelu_224")),
    Case("SigLIP image tower (global_pool='map')", "timm",
         _timm("vit_base_patch16_siglip_224"),
         note="the AttentionPoolLatent head stays MHA by default (one latent query, no KV "
              "cache); attention_pool='gqa' groups it too"),
    Case("qk-norm ViT (qk_norm=True)", "timm", _timm(None, qk_norm=True), native=True,
         note="LayerNorm over head_dim is shared by all heads: a pooled key reuses K-norm"),
    Case("NaFlexVit", "timm", _timm("naflexvit_base_patch16_gap", img_size=None)),
    Case("ResPostBlock (residual post-norm)", "timm", _timm("vit_base_patch16_rpn_224")),
    Case("ParallelThingsBlock (2 parallel attentions per block)", "timm",
         _timm("vit_small_patch16_18x2_224")),
    Case("ParallelScalingBlock", "timm", _parallel_scaling, refuses="ParallelScalingBlock",
         note="attention is fused into the block's in-projection with the MLP"),
    Case("DiffParallelScalingBlock", "timm", _timm("vit_dpwee_patch16_reg1_gap_256"),
         refuses="DiffParallelScalingBlock", note="fused as above, differential attention"),
    Case("differential attention (attn_layer='diff')", "timm",
         _timm("vit_dwee_patch16_reg1_gap_256"), refuses="DiffAttention",
         note="two softmax maps subtracted per head: not a layout kdgqa groups"),
    Case("scale-norm ViT (scale_attn_norm=True)", "timm",
         _timm_class(scale_attn_norm=True), refuses="scale-norm",
         note="a norm over all heads' outputs mixes heads"),
    Case("EVA-02 (rope, SwiGLU, fused qkv with q/v biases)", "timm",
         _eva("eva02_tiny_patch14_224"), native=True,
         known_gaps={"calibrated": INEXACT_CALIBRATION.format(what="rotary embedding")}),
    Case("Eva with qk-norm (qk_norm=True)", "timm", _eva(None, qk_norm=True), native=True,
         note="timm's q/k norms act over head_dim, shared by every head",
         known_gaps={"calibrated": INEXACT_CALIBRATION.format(what="q/k norms")}),
    Case("BEiT (relative position bias per head)", "timm",
         _timm("beit_base_patch16_224"),
         note="the bias is per query head on the logits; pooling K/V leaves it exact",
         known_gaps={"calibrated": INEXACT_CALIBRATION.format(what="relative position bias")}),
    Case("Swin (windows, shifted-window mask, relative position bias)", "timm", _swin,
         known_gaps={"calibrated": INEXACT_CALIBRATION.format(what="relative position bias")}),
    Case("ViTForImageClassification", "transformers",
         _hf("ViTForImageClassification", "ViTConfig", num_labels=5)),
    Case("ViTForMaskedImageModeling", "transformers",
         _hf("ViTForMaskedImageModeling", "ViTConfig", encoder_stride=8)),
    Case("DeiTForImageClassificationWithTeacher", "transformers",
         _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", num_labels=5)),
    Case("DeiTModel", "transformers", _hf("DeiTModel", "DeiTConfig")),
    Case("Dinov2ForImageClassification (layer scale)", "transformers",
         _hf("Dinov2ForImageClassification", "Dinov2Config", num_labels=5,
             layerscale_value=0.5)),
    Case("Dinov2Model (SwiGLU MLP)", "transformers",
         _hf("Dinov2Model", "Dinov2Config", use_swiglu_ffn=True)),
    Case("Dinov2WithRegistersModel", "transformers",
         _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", num_register_tokens=2)),
    Case("CLIPVisionModel", "transformers", _hf("CLIPVisionModel", "CLIPVisionConfig")),
    Case("CLIPVisionModelWithProjection", "transformers",
         _hf("CLIPVisionModelWithProjection", "CLIPVisionConfig", projection_dim=16)),
    Case("SiglipVisionModel", "transformers", _hf("SiglipVisionModel", "SiglipVisionConfig"),
         note="the attention-pooling head (nn.MultiheadAttention, one probe) stays MHA"),
    Case("CLIPForImageClassification", "transformers", _clip_classifier("CLIP"),
         note="only the vision tower is built for classification"),
    Case("SiglipForImageClassification", "transformers", _clip_classifier("Siglip")),
    Case("BeitForImageClassification (relative position bias)", "transformers",
         _hf("BeitForImageClassification", "BeitConfig", num_labels=5,
             use_relative_position_bias=True, use_mean_pooling=True),
         note="the bias is per query head on the logits; pooling K/V leaves it exact"),
    Case("BeitModel (shared relative position bias)", "transformers",
         _hf("BeitModel", "BeitConfig", use_shared_relative_position_bias=True)),
    Case("BeitForMaskedImageModeling", "transformers",
         _hf("BeitForMaskedImageModeling", "BeitConfig", vocab_size=64,
             use_shared_relative_position_bias=True)),
    Case("CLIPModel (image + text towers)", "transformers", _clip_model,
         refuses="text tower", note="the text tower's attention is causal"),
]


def case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


# ---------------------------------------------------------------- checks


def images(c: Case, batch: int = 2) -> Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, c.image_size, c.image_size, generator=generator)


def output(model: nn.Module, x: Tensor) -> Tensor:
    """The logits, or the pre-logit feature of a model without classifier."""
    from kdgqa.models import family_of

    family = family_of(model)
    assert family is not None, f"no family owns {type(model).__name__}"
    with torch.no_grad():
        features = family.features(model, x)
    return features.logits if features.logits is not None else features.pre_logits


def relative_error(out: Tensor, ref: Tensor) -> float:
    out, ref = out.detach(), ref.detach()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def mean_pooled_mha(model: nn.Module, groups: int,
                    plan: dict[str, list[list[int]]] | None = None) -> nn.Module:
    """Independent reference: the MHA model whose K and V heads are replaced, in place in its
    own projections, by their group means (every head of a group uses the mean); groups are
    contiguous, or per layer path those of ``plan`` (a calibrated conversion's)."""
    from kdgqa.models import find_attention

    model = copy.deepcopy(model)
    for layer in find_attention(model):
        attn: Any = layer.module
        heads, dim = layer.weights.num_heads, layer.weights.head_dim
        size = heads // groups
        members = (plan[layer.path] if plan is not None else
                   [list(range(g * size, (g + 1) * size)) for g in range(groups)])
        if hasattr(attn, "qkv"):  # timm: K and V are the 2nd and 3rd thirds of qkv
            tensors = [(t, part) for t in (attn.qkv.weight, attn.qkv.bias) if t is not None
                       for part in (1, 2)]
            # BEiT, Eva: separate q/v biases beside a bias-free qkv (K has none).
            tensors += [(t, None) for t in (getattr(attn, "v_bias", None),)
                        if isinstance(t, torch.Tensor)]
        else:  # transformers: separate k_proj / v_proj
            tensors = [(t, None) for lin in (attn.k_proj, attn.v_proj)
                       for t in (lin.weight, lin.bias) if t is not None]
        with torch.no_grad():
            for tensor, part in tensors:
                rows = tensor if part is None else tensor[part * heads * dim:
                                                          (part + 1) * heads * dim]
                per_head = rows.view(heads, dim, -1)
                for group in members:
                    per_head[group] = per_head[group].mean(0, keepdim=True)
    return model


def converted(c: Case, kv_heads: int, scheme: str = "gqa", **options: Any) -> nn.Module:
    from kdgqa.conversion.converter import convert

    return convert(c.build(), scheme, kv_heads, **options)


def check_refusal(c: Case) -> str:
    """The one-line message of the refusal, after checking nothing was changed."""
    from kdgqa.conversion.converter import convert
    from kdgqa.errors import ConversionError

    model = c.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    try:
        convert(model, "gqa", FEWER)
    except ConversionError as error:
        message = str(error)
    else:
        raise AssertionError(f"{c.name} was converted; expected a refusal")
    assert c.refuses is not None and c.refuses in message, message
    assert "\n" not in message
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return message


def check_same_heads(c: Case) -> float:
    """G = H: relative error of the converted model's logits against the original's."""
    x = images(c)
    reference = output(c.build(), x)
    return relative_error(output(converted(c, HEADS), x), reference)


def check_fewer_heads(c: Case) -> tuple[float, float]:
    """G < H: relative error against the mean-pooled MHA model, and how far that model is
    from the original (pooling must really change something)."""
    x = images(c)
    original = c.build()
    reference = output(mean_pooled_mha(original, FEWER), x)
    return (relative_error(output(converted(c, FEWER), x), reference),
            relative_error(output(original, x), reference))


def check_calibrated(c: Case) -> float:
    """G < H with a calibrated scheme (groups chosen from 4 images, query heads reordered so
    each group is contiguous): relative error against the MHA model pooled by those groups."""
    x = images(c)
    original = c.build()
    model = converted(c, FEWER, "calibrated", calibration=images(c, 4))
    plan = {path: record["groups"]
            for path, record in model.kdgqa_conversion["calibration"].items()}
    return relative_error(output(model, x), output(mean_pooled_mha(original, FEWER, plan), x))


def check_round_trip(c: Case, directory: Path) -> float:
    """save_pretrained + load of a G < H model (a key-driven scheme, so allocator state
    travels too): relative error of the reloaded model's outputs."""
    from kdgqa.io.checkpoint import load, save_pretrained

    x = images(c)
    model = converted(c, FEWER, "kdgqa")
    save_pretrained(model, directory)
    return relative_error(output(load(directory), x), output(model, x))


def check_export(c: Case, directory: Path) -> float:
    """export_mha of a G < H model, loaded back as a plain MHA model by the source loader:
    relative error of its outputs against the grouped model's."""
    from kdgqa.io.export import export_mha
    from kdgqa.io.sources import load_model

    x = images(c)
    model = converted(c, FEWER)
    export_mha(model, directory)
    return relative_error(output(load_model(str(directory)), x), output(model, x))


def check_native(c: Case, directory: Path) -> float:
    """export_native of a G < H ``gqa`` model, loaded back by timm alone
    (``timm.create_model("local-dir:...")``): relative error of its outputs, after checking
    that its K/V projections hold G heads."""
    import timm

    from kdgqa.io.export_native import export_native

    x = images(c)
    model = converted(c, FEWER)
    export_native(model, directory)
    native = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
    attn: Any = native.blocks[0].attn
    dim = attn.head_dim
    assert attn.k_proj.weight.shape[0] == attn.v_proj.weight.shape[0] == FEWER * dim
    with torch.no_grad():
        return relative_error(native(x), output(model, x))


def check_cli(c: Case, directory: Path) -> int:
    """``kdgqa convert --model DIR`` on the model saved in its library's own format; the
    number of grouped layers of the checkpoint it writes (checked against the attention
    layers of the model)."""
    from kdgqa.cli import main
    from kdgqa.io.base import base_spec
    from kdgqa.io.checkpoint import load
    from kdgqa.models import family_of, find_attention, grouped_layers

    model = c.build()
    family = family_of(model)
    assert family is not None
    source = directory / "source"
    source.mkdir(parents=True)
    family.save_plain(model, base_spec(model), source)
    status = main(["convert", "--model", str(source), "--scheme", "gqa", "--kv-heads",
                   str(FEWER), "--out", str(directory / "out")])
    assert status == 0, f"kdgqa convert exited with {status}"
    grouped = len(list(grouped_layers(load(directory / "out"))))
    expected = len(find_attention(model))
    assert grouped == expected, f"{grouped} grouped layers, expected {expected}"
    return grouped


def check_schemes(c: Case) -> list[str]:
    """The schemes that convert the model at G < H and run a forward pass."""
    from kdgqa.schemes.registry import SCHEMES

    x = images(c)
    working = []
    for scheme, cls in SCHEMES.items():
        if scheme == "mha":
            kv = HEADS
        elif scheme == "mqa":
            kv = 1
        else:
            kv = FEWER
        options: dict[str, Any] = {}
        if cls.needs_calibration:
            options["calibration"] = images(c, 4)
        try:
            model = converted(c, kv, scheme, **options)
            output(model, x)
        except Exception:
            continue
        working.append(scheme)
    return working


def to_json(value: Any) -> str:
    return json.dumps(value)

"""convert(): exactness against the original MHA model, pooling, refusals, timm and HF."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from conftest import TINY_VIT, tiny_hf_config
from kdgqa.attention import GroupedQueryAttention
from kdgqa.conversion.converter import convert
from kdgqa.conversion.pooling import pool_heads
from kdgqa.core.apportion import even_counts
from kdgqa.errors import ConversionError
from kdgqa.models.hf_vit import HFViTGroupedAttention

TOL = 1e-5


def _timm(**overrides: object) -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(**{**TINY_VIT, **overrides}).eval()  # type: ignore[arg-type]


def _hf(**overrides: object) -> nn.Module:
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(tiny_hf_config(**overrides)).eval()


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x) if not hasattr(model, "config") else model(pixel_values=x).logits
    return out


def _mean_pool_mha_timm(model: nn.Module, groups: int) -> nn.Module:
    """Independent reference: MHA whose K/V heads are replaced by their group means."""
    model = copy.deepcopy(model)
    for block in model.blocks:
        attn = block.attn
        h, d = attn.num_heads, attn.head_dim
        sizes = even_counts(h, groups)
        with torch.no_grad():
            for part in (1, 2):  # K and V thirds of the fused qkv
                rows = slice(part * h * d, (part + 1) * h * d)
                for tensor in (attn.qkv.weight, attn.qkv.bias):
                    heads = tensor[rows].reshape(h, d, -1)
                    start = 0
                    for size in sizes:
                        heads[start:start + size] = heads[start:start + size].mean(0)
                        start += size
                    tensor[rows] = heads.reshape(tensor[rows].shape)
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"qkv_bias": False, "proj_bias": False},
        {"reg_tokens": 2, "class_token": True},
        {"global_pool": "avg", "class_token": False},
        {"embed_dim": 40, "num_heads": 4, "init_values": 1e-3},
    ],
)
def test_timm_same_heads_is_exact(overrides: dict, images: torch.Tensor) -> None:
    model = _timm(**overrides)
    reference = _logits(model, images)
    heads = model.blocks[0].attn.num_heads
    converted = convert(copy.deepcopy(model), "gqa", heads)
    assert all(isinstance(b.attn, GroupedQueryAttention) for b in converted.blocks)
    assert (_logits(converted, images) - reference).abs().max() <= TOL


def test_timm_other_parameters_bit_identical() -> None:
    model = _timm()
    before = {k: v.clone() for k, v in model.state_dict().items() if ".attn." not in k}
    convert(model, "gqa", 3)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    attn = model.blocks[0].attn
    assert attn.qkv.weight.shape == ((6 + 2 * 3) * 8, 48)


def test_timm_distilled_deit(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False,
                              **TINY_VIT).eval()
    reference = _logits(model, images)
    converted = convert(copy.deepcopy(model), "gqa", 6)
    assert (_logits(converted, images) - reference).abs().max() <= TOL


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_timm_fewer_groups_equals_mean_pooled_mha(groups: int, images: torch.Tensor) -> None:
    model = _timm()
    reference = _logits(_mean_pool_mha_timm(model, groups), images)
    converted = convert(copy.deepcopy(model), "gqa", groups)
    assert (_logits(converted, images) - reference).abs().max() <= TOL
    assert (_logits(model, images) - reference).abs().max() > 1e-3  # pooling really changed it


def test_parameter_and_kv_cache_shrink() -> None:
    model = _timm()
    dim, depth, heads, head_dim, groups = 48, 2, 6, 8, 2
    before = sum(p.numel() for p in model.parameters())
    convert(model, "gqa", groups)
    after = sum(p.numel() for p in model.parameters())
    removed_rows = 2 * (heads - groups) * head_dim
    assert before - after == depth * removed_rows * (dim + 1)
    attn = model.blocks[0].attn
    assert attn.kv_cache_bytes_per_token(torch.float32) == 2 * groups * head_dim * 4
    assert attn.kv_cache_bytes_per_token(torch.bfloat16) * heads == (
        2 * heads * head_dim * 2 * groups
    )


def test_uneven_groups_for_key_driven_schemes(images: torch.Tensor) -> None:
    model = _timm()
    original_k = model.blocks[0].attn.qkv.weight[48:96].detach().clone()
    convert(model, "kdgqa", 4)
    attn = model.blocks[0].attn
    assert attn.num_kv_heads == 4
    k = attn.qkv.weight[48:48 + 32].detach()
    # groups of sizes 2, 2, 1, 1 (contiguous, as even as possible)
    heads = original_k.reshape(6, 8, 48)
    expected = torch.cat([heads[0:2].mean(0), heads[2:4].mean(0), heads[4], heads[5]])
    torch.testing.assert_close(k, expected, rtol=0, atol=1e-7)
    assert _logits(model, images).shape == (2, 5)
    with pytest.raises(ConversionError, match="divisible"):
        convert(_timm(), "gqa", 4)


def test_pooling_methods() -> None:
    weight = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(8, 3)
    mean = pool_heads(weight, 4, 2, "mean")
    expected = torch.cat([(weight[0:2] + weight[2:4]) / 2, (weight[4:6] + weight[6:8]) / 2])
    torch.testing.assert_close(mean, expected)
    first = pool_heads(weight, 4, 2, "first")
    assert torch.equal(first, torch.cat([weight[0:2], weight[4:6]]))
    torch.manual_seed(3)
    random = pool_heads(weight, 4, 2, "random")
    assert random.shape == (4, 3) and not torch.equal(random, mean)
    assert torch.equal(pool_heads(torch.ones(8), 4, 2, "random"), torch.zeros(4))
    with pytest.raises(ConversionError, match="pooling"):
        pool_heads(weight, 4, 2, "max")


def test_first_pooling_in_model() -> None:
    model = _timm()
    k = model.blocks[1].attn.qkv.weight[48:96].detach().clone()
    convert(model, "gqa", 2, pooling="first")
    new_k = model.blocks[1].attn.qkv.weight[48:64].detach()
    assert torch.equal(new_k, torch.cat([k[0:8], k[24:32]]))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"scale_attn_norm": True}, "scale-norm"),
    ],
)
def test_refuses_unsupported_timm_variants(overrides: dict, match: str) -> None:
    model = _timm(**overrides)
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(ConversionError, match=match):
        convert(model, "gqa", 3)
    assert not any(isinstance(m, GroupedQueryAttention) for m in model.modules())
    assert model.state_dict().keys() == snapshot.keys()


def test_refuses_fused_block_and_foreign_attention() -> None:
    from timm.models.vision_transformer import ParallelScalingBlock

    model = _timm(block_fn=ParallelScalingBlock)
    with pytest.raises(ConversionError, match=r"blocks\.0"):
        convert(model, "gqa", 3)
    hybrid = _timm()
    hybrid.blocks[1].attn = nn.MultiheadAttention(48, 6)
    with pytest.raises(ConversionError, match=r"blocks\.1\.attn.*MultiheadAttention"):
        convert(hybrid, "gqa", 3)
    assert isinstance(hybrid.blocks[0].attn, timm.layers.Attention)  # nothing half-converted
    with pytest.raises(ConversionError, match="no convertible"):
        convert(nn.Sequential(nn.Linear(4, 4)), "gqa", 1)


def test_refuses_bad_arguments_before_changing_anything() -> None:
    model = _timm()
    for scheme, groups, match in [("nope", 3, "unknown scheme"), ("gqa", 7, "num_kv_heads"),
                                  ("gqa", 0, "num_kv_heads"), ("mha", 3, "mha")]:
        with pytest.raises(ConversionError, match=match):
            convert(model, scheme, groups)
        assert not any(isinstance(m, GroupedQueryAttention) for m in model.modules())
    with pytest.raises(ConversionError, match="window_size"):
        convert(model, "dgqa-ema", 3, window_size=0)
    convert(model, "gqa", 3)
    with pytest.raises(ConversionError, match="already"):
        convert(model, "gqa", 3)


def test_dtype_device_and_mode_preserved() -> None:
    model = _timm().to(torch.bfloat16).train()
    convert(model, "dgqa-ema", 3)
    attn = model.blocks[0].attn
    assert attn.qkv.weight.dtype == torch.bfloat16 and attn.training
    assert attn.allocator.cache.dtype == torch.float32


# ---------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": False}])
def test_hf_same_heads_is_exact(overrides: dict, images: torch.Tensor) -> None:
    model = _hf(**overrides)
    reference = _logits(model, images)
    converted = convert(copy.deepcopy(model), "gqa", 6)
    layers = [m for m in converted.modules() if isinstance(m, HFViTGroupedAttention)]
    assert len(layers) == 2
    assert (_logits(converted, images) - reference).abs().max() <= TOL


def _hf_kv(model: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    from transformers.models.vit.modeling_vit import ViTAttention

    pairs = []
    for module in model.modules():
        if isinstance(module, ViTAttention):
            if hasattr(module, "k_proj"):
                pairs.append((module.k_proj, module.v_proj))
            else:
                pairs.append((module.attention.key, module.attention.value))
    return pairs


def test_hf_fewer_groups_equals_mean_pooled_mha(images: torch.Tensor) -> None:
    model = _hf()
    pooled = copy.deepcopy(model)
    with torch.no_grad():
        for linears in _hf_kv(pooled):
            for linear in linears:
                for tensor in (linear.weight, linear.bias):
                    heads = tensor.reshape(3, 2, 8, -1)  # 3 groups of 2 heads
                    tensor.copy_(heads.mean(1, keepdim=True).expand_as(heads)
                                 .reshape(tensor.shape))
    reference = _logits(pooled, images)
    converted = convert(copy.deepcopy(model), "gqa", 3)
    assert (_logits(converted, images) - reference).abs().max() <= TOL
    assert (_logits(model, images) - reference).abs().max() > 1e-3


def test_hf_vit_model_outputs_and_untouched_parameters(images: torch.Tensor) -> None:
    from transformers import ViTModel

    torch.manual_seed(0)
    model = ViTModel(tiny_hf_config()).eval()
    with torch.no_grad():
        reference = model(pixel_values=images)
    others = {k: v.clone() for k, v in model.state_dict().items() if ".attention." not in k}
    convert(model, "mqa", 1)
    with torch.no_grad():
        out = model(pixel_values=images)
    assert out.last_hidden_state.shape == reference.last_hidden_state.shape
    assert out.pooler_output.shape == reference.pooler_output.shape
    state = model.state_dict()
    for key, value in others.items():
        assert torch.equal(state[key], value), key


def test_hf_adapter_return_styles() -> None:
    x = torch.randn(1, 3, 16)
    flat = HFViTGroupedAttention(16, 2, 1, "mqa", output_style="flat")
    out, weights = flat(x, None)
    assert out.shape == x.shape and weights is None
    legacy = HFViTGroupedAttention(16, 2, 1, "mqa", output_style="legacy-tuple")
    assert len(legacy(x, None, False)) == 1 and legacy(x, None, True)[1] is None
    with pytest.raises(ValueError, match="head_mask"):
        legacy(x, torch.ones(2))
    tensor = HFViTGroupedAttention(16, 2, 1, "mqa", output_style="tensor")
    assert isinstance(tensor(x), torch.Tensor)
    tensor.load_state_dict(flat.state_dict())
    torch.testing.assert_close(tensor(x), flat(x)[0])


def test_hf_other_model_refused() -> None:
    from transformers import SwinConfig, SwinModel

    model = SwinModel(SwinConfig(embed_dim=16, depths=[1], num_heads=[2], image_size=16,
                                 patch_size=4, window_size=2))
    with pytest.raises(ConversionError, match="Swin"):
        convert(model, "gqa", 1)

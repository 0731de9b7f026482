"""timm ViT family specifics: the latent pooling head stays MHA, NaFlexVit with padding,
constructor arguments read back from modules (quick_gelu, qk-norm)."""

from __future__ import annotations

import copy

import families_matrix as fm
import torch

from kdgqa.conversion.converter import convert
from kdgqa.io.base import build_base
from kdgqa.models import family_of


def test_attention_pool_latent_is_left_multi_head() -> None:
    c = fm.case("SigLIP image tower (global_pool='map')")
    model = c.build()
    pool = copy.deepcopy(model.attn_pool)
    convert(model, "gqa", 2)
    assert type(model.attn_pool) is type(pool)
    for key, value in pool.state_dict().items():
        assert torch.equal(model.attn_pool.state_dict()[key], value)
    assert model.kdgqa_conversion["layers"] == ["blocks.0.attn", "blocks.1.attn"]


def test_naflexvit_with_padded_patches_stays_exact() -> None:
    model = fm.case("NaFlexVit").build()
    tokens, patch = 12, 8
    grid = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij"), -1)
    valid = torch.ones(2, tokens, dtype=torch.bool)
    valid[1, 8:] = False  # the second image is shorter: padding masked in attention
    batch = {"patches": torch.randn(2, tokens, patch * patch * 3,
                                    generator=torch.Generator().manual_seed(2)),
             "patch_coord": grid.reshape(1, tokens, 2).repeat(2, 1, 1), "patch_valid": valid}
    with torch.no_grad():
        reference = fm.mean_pooled_mha(model, 2)(batch)
        out = convert(copy.deepcopy(model), "gqa", 2)(batch)
    assert fm.relative_error(out, reference) <= fm.RTOL


def test_class_built_models_record_quick_gelu_and_qk_norm() -> None:
    from timm.models.vision_transformer import VisionTransformer

    for kwargs in ({"act_layer": "quick_gelu"}, {"qk_norm": True}):
        model = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1,
                                  num_heads=4, num_classes=3, **kwargs)
        family = family_of(model)
        assert family is not None
        spec = family.base_spec(model)
        assert spec is not None
        assert repr(build_base(spec)) == repr(model)

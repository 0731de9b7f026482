"""Fitted pooling: the closed form, its objective, planted cases, and convert(pooling="fit")."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from conftest import TINY_VIT
from kdgqa.calibration.measure import InputMoments
from kdgqa.conversion.converter import convert
from kdgqa.conversion.fit import augmented_heads, fitted_kv, logit_error, weighted_mean
from kdgqa.conversion.pooling import pool_heads
from kdgqa.errors import ConversionError
from kdgqa.io.checkpoint import load, save_pretrained
from kdgqa.models.base import MHAWeights

HEADS, DIM, WIDTH = 4, 3, 8


def _weights(seed: int = 0, bias: bool = True) -> MHAWeights:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    rows = HEADS * DIM
    return MHAWeights(HEADS, DIM, rand(rows, WIDTH), rand(rows, WIDTH), rand(rows, WIDTH),
                      rand(WIDTH, rows), rand(rows) if bias else None,
                      rand(rows) if bias else None, rand(rows) if bias else None,
                      rand(WIDTH) if bias else None)


def _moments(tokens: torch.Tensor) -> InputMoments:
    """Moments of one image's tokens ``(N, C)``, as ``measure`` accumulates them."""
    moments = InputMoments.zeros(tokens.shape[1], tokens.device)
    moments.add(tokens[None])
    return moments


def _tokens(seed: int = 1, count: int = 200) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, WIDTH, generator=gen, dtype=torch.float64)


def test_equal_weights_give_the_plain_mean() -> None:
    blocks = torch.randn(3, DIM, 5, dtype=torch.float64)
    spd = torch.randn(DIM, DIM, dtype=torch.float64)
    weights = (spd @ spd.T + torch.eye(DIM, dtype=torch.float64)).expand(3, DIM, DIM)
    assert torch.allclose(weighted_mean(blocks, weights), blocks.mean(0), atol=1e-12)


def test_equal_query_heads_make_fit_the_mean() -> None:
    w = _weights()
    w.q_weight[DIM:2 * DIM] = w.q_weight[:DIM]  # heads 0 and 1 ask the same questions
    w.q_bias[DIM:2 * DIM] = w.q_bias[:DIM]  # type: ignore[index]
    w.o_weight[:, DIM:2 * DIM] = w.o_weight[:, :DIM]  # and read their values the same way
    k_weight, k_bias, v_weight, v_bias = fitted_kv(w, _moments(_tokens()), [[0, 1], [2], [3]])
    assert torch.allclose(k_weight[:DIM], pool_heads(w.k_weight, HEADS, 3, "mean",
                                                     [[0, 1], [2], [3]])[:DIM], atol=1e-9)
    assert torch.allclose(v_weight[:DIM], w.v_weight[:2 * DIM].reshape(2, DIM, -1).mean(0),
                          atol=1e-9)
    # A group of one keeps its head exactly.
    assert torch.allclose(k_weight[DIM:2 * DIM], w.k_weight[2 * DIM:3 * DIM], atol=1e-9)
    assert torch.allclose(v_bias[2 * DIM:], w.v_bias[3 * DIM:], atol=1e-9)  # type: ignore[index]
    assert k_bias is not None


def test_a_head_whose_queries_are_silent_does_not_pull_the_key() -> None:
    w = _weights()
    w.q_weight[DIM:2 * DIM] = 0  # head 1 never attends by content: its key is irrelevant
    w.q_bias[DIM:2 * DIM] = 0  # type: ignore[index]
    w.o_weight[:, DIM:2 * DIM] = 0  # and nothing reads its value
    groups = [[0, 1], [2, 3]]
    moments = _moments(_tokens())
    k_weight, k_bias, v_weight, _ = fitted_kv(w, moments, groups)
    # Exact but for the ridge, which pulls by RIDGE x (mean / smallest eigenvalue of head
    # 0's query moment) towards the mean: below 1e-4 here.
    assert torch.allclose(k_weight[:DIM], w.k_weight[:DIM], rtol=1e-4, atol=1e-4)
    assert torch.allclose(v_weight[:DIM], w.v_weight[:DIM], rtol=1e-4, atol=1e-4)
    mean_k = pool_heads(w.k_weight, HEADS, 2, "mean", groups)
    mean_b = pool_heads(w.k_bias, HEADS, 2, "mean", groups)  # type: ignore[arg-type]
    assert logit_error(w, moments, groups, k_weight, k_bias) < logit_error(
        w, moments, groups, mean_k, mean_b)


def test_fit_minimises_the_logit_error() -> None:
    w = _weights(3)
    moments = _moments(_tokens(4))
    groups = [[0, 2, 3], [1]]
    k_weight, k_bias, *_ = fitted_kv(w, moments, groups)
    best = logit_error(w, moments, groups, k_weight, k_bias)
    mean_k = pool_heads(w.k_weight, HEADS, 2, "mean", groups)
    mean_b = pool_heads(w.k_bias, HEADS, 2, "mean", groups)  # type: ignore[arg-type]
    assert best < logit_error(w, moments, groups, mean_k, mean_b)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        nudged = k_weight + 1e-3 * torch.randn(k_weight.shape, generator=gen,
                                               dtype=torch.float64)
        assert logit_error(w, moments, groups, nudged, k_bias) >= best - 1e-12


def test_the_logit_error_is_the_mean_squared_change_of_the_logits() -> None:
    w = _weights(6)
    tokens = _tokens(7, 50)
    groups = [[0, 1, 2, 3]]
    k_weight, k_bias, *_ = fitted_kv(w, _moments(tokens), groups)
    ones = torch.ones(len(tokens), 1, dtype=torch.float64)
    x = torch.cat([tokens, ones], 1)
    q = augmented_heads(w.q_weight, w.q_bias, HEADS) @ x.T  # (H, d, N)
    k = augmented_heads(w.k_weight, w.k_bias, HEADS) @ x.T
    shared = augmented_heads(k_weight, k_bias, 1)[0] @ x.T
    mha = torch.einsum("hdt,hdu->htu", q, k)
    gqa = torch.einsum("hdt,du->htu", q, shared)
    direct = float(((mha - gqa) ** 2).sum() / (mha ** 2).sum())
    assert logit_error(w, _moments(tokens), groups, k_weight, k_bias) == pytest.approx(
        direct, rel=1e-9)


def _vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**TINY_VIT).eval()  # type: ignore[arg-type]


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_fit_at_one_kv_head_per_query_head_is_the_mha_model(images: torch.Tensor) -> None:
    model = _vit()
    calibration = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    fitted = convert(copy.deepcopy(model), "gqa", 6, "fit", calibration=calibration)
    assert (_logits(fitted, images) - _logits(model, images)).abs().max() <= 1e-5


@pytest.mark.parametrize("scheme,kv", [("gqa", 2), ("gqa", 3), ("kdgqa", 4), ("calibrated", 2),
                                       ("similarity", 3)])
def test_every_grouping_converts_with_fit_and_reloads(scheme: str, kv: int, tmp_path,
                                                      images: torch.Tensor) -> None:
    calibration = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model = convert(_vit(), scheme, kv, "fit", calibration=calibration, align=True)
    assert model.kdgqa_conversion["pooling"] == "fit" and model.kdgqa_conversion["align"]
    save_pretrained(model, tmp_path / "m")
    again = load(tmp_path / "m")
    assert torch.equal(_logits(again, images), _logits(model.eval(), images))
    assert again.kdgqa_conversion["pooling"] == "fit" and again.kdgqa_conversion["align"]


def test_fit_and_align_ask_for_calibration_and_only_they_accept_it() -> None:
    with pytest.raises(ConversionError, match="this pooling needs calibration"):
        convert(_vit(), "gqa", 2, "fit")
    with pytest.raises(ConversionError, match="this pooling needs calibration"):
        convert(_vit(), "gqa", 2, align=True)
    with pytest.raises(ConversionError, match="calibration is only used by"):
        convert(_vit(), "gqa", 2, calibration=torch.zeros(2, 3, 32, 32))
    with pytest.raises(ConversionError, match="align must be True or False"):
        convert(_vit(), "gqa", 2, align="yes")  # type: ignore[arg-type]
    with pytest.raises(ConversionError, match="calibration_images must be an integer >= 1"):
        convert(_vit(), "gqa", 2, "fit", calibration=torch.zeros(2, 3, 32, 32),
                calibration_images=0)


def test_fit_keeps_more_of_a_model_than_mean_pooling(images: torch.Tensor) -> None:
    """On a model whose heads differ in scale, fitted pooling stays closer to MHA."""
    model = _vit()
    with torch.no_grad():
        for block in model.blocks:  # heads of very different strength, as in trained models
            q = block.attn.qkv.weight[:48].view(6, 8, 48)
            q.mul_(torch.tensor([4.0, 0.1, 3.0, 0.2, 2.0, 0.1])[:, None, None])
    calibration = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    reference = _logits(model, images)
    mean = _logits(convert(copy.deepcopy(model), "gqa", 3), images)
    fit = _logits(convert(copy.deepcopy(model), "gqa", 3, "fit", calibration=calibration),
                  images)
    assert (fit - reference).norm() < (mean - reference).norm()


def test_calibration_given_as_an_iterator_serves_fit_and_group_planning() -> None:
    calibration = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    from_tensor = convert(_vit(), "calibrated", 2, "fit", calibration=calibration, align=True)
    from_batches = convert(_vit(), "calibrated", 2, "fit", align=True,
                           calibration=iter(calibration.split(5)))
    assert from_batches.kdgqa_conversion["calibration"] is not None
    # The same images in other batch sizes: fp32 forward passes round differently (1e-8).
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(
        from_tensor.state_dict().values(), from_batches.state_dict().values(), strict=True))

"""Measuring attention layers on calibration images: second moments of their inputs.

A forward pre-hook on every attention layer accumulates, in fp64, the second moment of the
layer's input ``x`` augmented with a constant 1 (``sum_t [x_t, 1][x_t, 1]^T``) and the same for
the per-image token means. Every query, key and value is an affine function of ``x``, so any
second moment between heads follows exactly from these and the weights:
``sum_t k_i k_j^T = Wk_i S Wk_j^T`` (bias folded in). The cost is one ``(C+1) x (C+1)`` matrix
per layer, whatever the number of images.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdgqa.errors import ConversionError

__all__ = ["BATCH_SIZE", "InputMoments", "first_images", "image_batches", "measure"]

#: Images per forward pass while measuring.
BATCH_SIZE = 64


@dataclass
class InputMoments:
    """Second moments of one attention layer's input over the calibration tokens (fp64).

    ``second`` is ``sum_t x~_t x~_t^T`` with ``x~ = [x, 1]``; ``image_means`` is
    ``sum_b n_b m~_b m~_b^T`` for the per-image token means ``m~_b``, so ``second -
    image_means`` is the second moment of the tokens centred per image.
    """

    second: Tensor
    image_means: Tensor
    tokens: int = 0
    images: int = 0

    @classmethod
    def zeros(cls, width: int, device: torch.device) -> InputMoments:
        shape = (width + 1, width + 1)
        return cls(torch.zeros(shape, dtype=torch.float64, device=device),
                   torch.zeros(shape, dtype=torch.float64, device=device))

    def add(self, x: Tensor) -> None:
        """Accumulate a batch of layer inputs ``(B, N, C)``."""
        batch, tokens, width = x.shape
        ones = x.new_ones(batch, tokens, 1, dtype=torch.float64)
        aug = torch.cat([x.detach().to(torch.float64), ones], dim=-1)
        flat = aug.reshape(-1, width + 1)
        self.second += flat.T @ flat
        means = aug.mean(dim=1)
        self.image_means += tokens * (means.T @ means)
        self.tokens += batch * tokens
        self.images += batch


def _layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    return kwargs.get("hidden_states", kwargs.get("x"))


def image_batches(calibration: Any, batch_size: int) -> Iterator[Tensor]:
    """Batches ``(b, C, H, W)`` from a tensor of images or an iterable of batches."""
    if isinstance(calibration, Tensor):
        items: Iterable[Any] = [calibration]
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes)):
        items = calibration
    else:
        raise ConversionError(
            f"calibration must be images (N, C, H, W) as a tensor or an iterable of such "
            f"batches, got {type(calibration).__qualname__}"
        )
    for item in items:
        if isinstance(item, (tuple, list)) and item:  # (images, labels) pairs
            item = item[0]
        if not isinstance(item, Tensor) or item.dim() != 4 or not item.is_floating_point():
            shape = tuple(item.shape) if isinstance(item, Tensor) else type(item).__qualname__
            raise ConversionError(
                f"calibration images must be float tensors (N, C, H, W) normalised like the "
                f"model's inputs, got {shape}"
            )
        yield from item.split(batch_size)


def measure(
    model: nn.Module,
    modules: Sequence[tuple[str, nn.Module]],
    calibration: Any,
    max_images: int,
    batch_size: int = BATCH_SIZE,
) -> dict[str, InputMoments]:
    """Run ``model`` (in eval mode, no grad) on up to ``max_images`` calibration images and
    return the input moments of each of ``modules``, keyed by path. The model is left as it
    was (training flags included); raises :class:`ConversionError` on unusable input."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    moments: dict[str, InputMoments] = {}

    def hook_for(path: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _layer_input(args, kwargs)
            if not isinstance(x, Tensor) or x.dim() != 3:
                raise ConversionError(f"cannot calibrate {path!r}: its input is not a "
                                      "(batch, tokens, channels) tensor")
            if path not in moments:
                moments[path] = InputMoments.zeros(x.shape[-1], x.device)
            moments[path].add(x)

        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(hook_for(p), with_kwargs=True) for p, m in modules]
    seen = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in image_batches(calibration, batch_size):
                batch = batch[: max_images - seen]
                try:
                    model(batch.to(device=device, dtype=dtype))
                except ConversionError:
                    raise
                except (RuntimeError, TypeError, ValueError, AssertionError) as error:
                    message = " ".join(str(error).split())[:300]
                    raise ConversionError(
                        f"calibration images {tuple(batch.shape)} do not fit the model: "
                        f"{message}"
                    ) from None
                seen += batch.shape[0]
                if seen >= max_images:
                    break
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    if seen == 0:
        raise ConversionError("calibration gave no images")
    missing = [path for path, _ in modules if path not in moments]
    if missing:
        raise ConversionError(f"calibration never reached attention module {missing[0]!r}")
    for path, moment in moments.items():  # groups chosen from NaN would be arbitrary
        if not bool(torch.isfinite(moment.second).all()):
            raise ConversionError(
                f"calibration statistics of {path!r} are not finite: the calibration images "
                "or the model's activations hold NaN or inf (check the normalisation)")
    return moments


def first_images(calibration: Any, max_images: int) -> list[Tensor]:
    """The first ``max_images`` calibration images as a list of batches (validated)."""
    batches: list[Tensor] = []
    seen = 0
    for batch in image_batches(calibration, BATCH_SIZE):
        batches.append(batch[: max_images - seen])
        seen += batches[-1].shape[0]
        if seen >= max_images:
            break
    return batches

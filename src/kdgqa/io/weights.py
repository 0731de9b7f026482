"""Reading model weights from files: safetensors, or pickles that need no code to load."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from kdgqa.errors import OutputError, SourceError
from kdgqa.io.durable import torch_load_detail

__all__ = ["load_weights", "read_state_dict", "safetensors_failure", "write_safetensors"]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file's tensors, unwrapping the usual ``state_dict``/``model`` keys.

    ``.safetensors`` files go through safetensors; others through
    ``torch.load(weights_only=True)``, and a pickle that needs arbitrary Python objects is
    refused rather than executed.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise SourceError(f"cannot read safetensors file {str(path)!r}: {error}") from None
    try:
        with warnings.catch_warnings():  # e.g. about pickle protocols: the error says enough
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not _looks_like_torch_file(path):
            raise SourceError(f"cannot read checkpoint {str(path)!r}: it is not a PyTorch "
                              "file (corrupt, or another format)") from None
        raise SourceError(
            f"refusing to load {str(path)!r}: it needs arbitrary Python objects (classes or "
            "functions), which torch.load(weights_only=True) does not execute; re-save it as "
            "a plain state dict or safetensors"
        ) from None
    except Exception as error:  # garbage can fail anywhere inside the unpickler
        if path.stat().st_size == 0:
            detail = "the file is empty"
        elif not _looks_like_torch_file(path):
            detail = "it is not a PyTorch file (corrupt, or another format)"
        else:
            detail = f"{torch_load_detail(error)} (the file is corrupt or truncated)"
        raise SourceError(f"cannot read checkpoint {str(path)!r}: {detail}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SourceError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    prefix = "module."
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


def load_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], origin: str, assign: bool = False
) -> None:
    """Load ``state_dict`` strictly, turning key or shape mismatches into one clear error.

    ``assign=True`` keeps the tensors' own dtypes (e.g. bf16 weights, fp32 DGQA buffers).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise SourceError(f"weights in {origin} do not fit the model: {detail} keys")
    for key, value in state_dict.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise SourceError(
                f"weights in {origin} do not fit the model: {key!r} has shape "
                f"{tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
    model.load_state_dict(state_dict, strict=True, assign=assign)


def _looks_like_torch_file(path: Path) -> bool:
    """A zip (``torch.save``) or a protocol-2+ pickle (legacy format), by its first bytes."""
    with path.open("rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def safetensors_failure(error: Exception) -> str:
    """The reason in a safetensors write error ("... I/O error: No space left on device")."""
    text = " ".join(str(error).split())
    return text.rsplit("I/O error: ", 1)[-1] if "I/O error: " in text else text


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.torch.save_file`` with a failure (a full disk) as
    :class:`~kdgqa.errors.OutputError` naming ``path``."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except (SafetensorError, OSError) as error:
        raise OutputError(path, safetensors_failure(error)) from None

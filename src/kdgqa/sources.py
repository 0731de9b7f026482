"""Where models come from: names, local checkpoints and directories, and how to rebuild them.

A *source* string (the CLI's ``--model``) is one of

* ``timm:NAME`` -- a timm model with its pretrained weights (downloaded when online);
* a local timm checkpoint file (``.safetensors``, ``.pth``/``.pt``/``.bin``); its architecture
  comes from ``arch=``/``model_kwargs=`` or from a timm ``config.json`` beside it;
* a directory: a kdgqa checkpoint (``kdgqa_config.json``), a Hugging Face ViT directory
  (``config.json`` with ``model_type: vit``) or a timm export (``config.json`` with
  ``architecture``).

Every model built here remembers how it was built (``model.kdgqa_base``), which is what
:mod:`kdgqa.checkpoint` writes so the base model can be rebuilt offline. Pickles are loaded
with ``weights_only=True`` only; anything needing arbitrary objects is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "SourceError",
    "base_spec",
    "build_base",
    "create_timm_vit",
    "load_model",
    "read_state_dict",
]

HF_VIT_CLASSES = ("ViTModel", "ViTForImageClassification", "ViTForMaskedImageModeling")
TIMM_VIT_CLASSES = ("VisionTransformer", "VisionTransformerDistilled")
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class SourceError(ValueError):
    """A model source cannot be resolved or loaded; the message says which and why."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise SourceError(f"model argument {value!r} is not JSON-serialisable")


# --------------------------------------------------------------------------------------------
# timm


def _timm_class(name: str) -> type[nn.Module]:
    from timm.models import deit, vision_transformer

    classes = {
        "VisionTransformer": vision_transformer.VisionTransformer,
        "VisionTransformerDistilled": deit.VisionTransformerDistilled,
    }
    if name not in classes:
        raise SourceError(f"unknown timm class {name!r}; expected one of {', '.join(classes)}")
    return classes[name]


def create_timm_vit(name: str | None = None, **vit_kwargs: Any) -> nn.Module:
    """Build a randomly initialised timm ViT that remembers how it was built.

    With ``name`` the model comes from ``timm.create_model(name, pretrained=False, **kwargs)``;
    without, from ``timm.models.vision_transformer.VisionTransformer(**kwargs)``. Either way
    :func:`kdgqa.checkpoint.save_pretrained` can rebuild it offline. Keyword values must be
    JSON-serialisable (numbers, strings, booleans, lists).
    """
    kwargs = _jsonable(dict(vit_kwargs))
    spec: dict[str, Any] = {"library": "timm", "name": name, "class": None, "kwargs": kwargs}
    if name is None:
        spec["class"] = "VisionTransformer"
    model = build_base(spec)
    return model


def _timm_kwargs_guess(model: Any) -> dict[str, Any]:
    """Constructor arguments of a timm ViT read back from its modules."""
    pe = model.patch_embed
    block = model.blocks[0]
    embed_dim = int(model.embed_dim)
    attn = block.attn
    ls = getattr(block, "ls1", None)
    kwargs: dict[str, Any] = {
        "img_size": list(pe.img_size) if pe.img_size is not None else None,
        "patch_size": list(pe.patch_size),
        "in_chans": int(pe.proj.in_channels),
        "num_classes": int(model.num_classes),
        "global_pool": model.global_pool,
        "embed_dim": embed_dim,
        "depth": len(model.blocks),
        "num_heads": int(attn.num_heads),
        "mlp_ratio": block.mlp.fc1.out_features / embed_dim,
        "qkv_bias": attn.qkv.bias is not None,
        "proj_bias": attn.proj.bias is not None,
        "class_token": model.cls_token is not None,
        "reg_tokens": int(getattr(model, "num_reg_tokens", 0)),
        "no_embed_class": bool(getattr(model, "no_embed_class", False)),
        "pre_norm": not isinstance(model.norm_pre, nn.Identity),
        "fc_norm": not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity),
        "dynamic_img_size": bool(getattr(model, "dynamic_img_size", False)),
    }
    if ls is not None and not isinstance(ls, nn.Identity):
        kwargs["init_values"] = 1e-5
    if getattr(model, "pos_embed", None) is None:
        kwargs["pos_embed"] = "none"
    return kwargs


def _check_rebuild(spec: dict[str, Any], model: nn.Module) -> None:
    """Rebuild ``spec`` on the meta device and insist it has ``model``'s structure."""
    conversion = getattr(model, "kdgqa_conversion", None)
    with torch.device("meta"):
        rebuilt = build_base(spec)
        if conversion is not None:
            from kdgqa.convert import convert

            convert(rebuilt, conversion["scheme"], conversion["num_kv_heads"],
                    **conversion["scheme_options"])
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if theirs != ours or repr(rebuilt) != repr(model):
        raise SourceError(
            f"cannot record how to rebuild this {type(model).__name__}: rebuilding it from "
            f"{spec} gives a different structure; build it with kdgqa.create_timm_vit(...) or "
            "load it through kdgqa.sources.load_model"
        )


def base_spec(model: nn.Module) -> dict[str, Any]:
    """The JSON description that :func:`build_base` turns back into ``model``'s base.

    Uses ``model.kdgqa_base`` when the model came from this module; otherwise reads it from
    the model (HF config, or timm constructor arguments verified by rebuilding the structure).
    """
    spec = getattr(model, "kdgqa_base", None)
    if spec is not None:
        return dict(spec)
    cls_name = type(model).__name__
    config = getattr(model, "config", None)
    hf_model: Any = model
    if cls_name in HF_VIT_CLASSES and config is not None:
        init_kwargs: dict[str, Any] = {}
        if cls_name == "ViTModel":
            init_kwargs["add_pooling_layer"] = hf_model.pooler is not None
            init_kwargs["use_mask_token"] = hf_model.embeddings.mask_token is not None
        return {
            "library": "transformers",
            "class": cls_name,
            "config": config.to_dict(),
            "init_kwargs": init_kwargs,
        }
    if cls_name in TIMM_VIT_CLASSES:
        kwargs = _timm_kwargs_guess(model)
        spec = {"library": "timm", "name": None, "class": cls_name, "kwargs": kwargs}
        _check_rebuild(spec, model)
        return spec
    raise SourceError(
        f"cannot save a {cls_name}: expected a timm VisionTransformer(Distilled) or a "
        f"transformers {', '.join(HF_VIT_CLASSES)}"
    )


def build_base(spec: dict[str, Any]) -> nn.Module:
    """Build the randomly initialised base (MHA) model described by ``spec``, offline."""
    library = spec.get("library")
    if library == "timm":
        import timm

        kwargs = spec.get("kwargs") or {}
        name = spec.get("name")
        if not isinstance(kwargs, dict) or not (name is None or isinstance(name, str)):
            raise SourceError(f"malformed timm model description: name {name!r} must be a "
                              f"string and kwargs {kwargs!r} a mapping")
        try:
            if name:
                model = timm.create_model(name, pretrained=False, **kwargs)
            else:
                model = _timm_class(spec.get("class") or "VisionTransformer")(**kwargs)
        except SourceError:
            raise
        except Exception as error:  # any constructor failure on bad arguments
            if name and not timm.is_model(name):
                raise SourceError(f"unknown timm model {name!r}: {error}") from None
            detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise SourceError(f"cannot build timm model {name or spec.get('class')!r} "
                              f"with {kwargs}: {detail or type(error).__name__}") from None
    elif library == "transformers":
        import transformers

        cls_name = spec.get("class")
        if cls_name not in HF_VIT_CLASSES:
            raise SourceError(
                f"unsupported transformers class {cls_name!r}; expected one of "
                f"{', '.join(HF_VIT_CLASSES)}"
            )
        try:
            config = transformers.ViTConfig.from_dict(dict(spec["config"]))
            model = getattr(transformers, cls_name)(config, **dict(spec.get("init_kwargs") or {}))
        except Exception as error:  # malformed or inconsistent config values
            detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise SourceError(f"cannot build transformers {cls_name} from its recorded config: "
                              f"{detail or type(error).__name__}") from None
    else:
        raise SourceError(f"unknown base library {library!r}; expected 'timm' or 'transformers'")
    setattr(model, "kdgqa_base", dict(spec))  # noqa: B010
    return model.eval()


# --------------------------------------------------------------------------------------------
# Reading weights


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
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            detail = f"{first} (the file is corrupt or truncated)"
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


# --------------------------------------------------------------------------------------------
# Resolving source strings


def _looks_like_torch_file(path: Path) -> bool:
    """A zip (``torch.save``) or a protocol-2+ pickle (legacy format), by its first bytes."""
    with path.open("rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SourceError(f"cannot read {str(path)!r}: {error}") from None
    if not isinstance(data, dict):
        raise SourceError(f"{str(path)!r} does not hold a JSON object")
    return data


def _timm_from_name(name: str) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise SourceError(f"unknown timm model {name!r}; see timm.list_models()")
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as error:  # download or hub failures of any kind
        raise SourceError(f"cannot load pretrained timm model {name!r}: {error}") from None
    setattr(model, "kdgqa_base", {"library": "timm", "name": name, "class": None, "kwargs": {}})  # noqa: B010
    return model.eval()


def _timm_spec_from_config(path: Path) -> dict[str, Any]:
    cfg = _read_json(path)
    if "architecture" not in cfg:
        raise SourceError(f"{str(path)!r} is not a timm config (no 'architecture')")
    if not isinstance(cfg["architecture"], str) or not isinstance(
        cfg.get("model_args") or {}, dict
    ):
        raise SourceError(f"{str(path)!r} is malformed: 'architecture' must be a string and "
                          "'model_args' a mapping")
    kwargs = dict(cfg.get("model_args") or {})
    if "num_classes" in cfg:
        kwargs.setdefault("num_classes", cfg["num_classes"])
    return {"library": "timm", "name": cfg["architecture"], "class": None, "kwargs": kwargs}


def _timm_from_file(
    path: Path, arch: str | None, model_kwargs: dict[str, Any] | None
) -> nn.Module:
    if arch is not None:
        spec = {"library": "timm", "name": arch, "class": None,
                "kwargs": _jsonable(dict(model_kwargs or {}))}
    elif (path.parent / "config.json").is_file():
        spec = _timm_spec_from_config(path.parent / "config.json")
        spec["kwargs"].update(_jsonable(dict(model_kwargs or {})))
    else:
        raise SourceError(
            f"cannot tell the architecture of {str(path)!r}: pass arch= (CLI: --arch NAME) or "
            "put a timm config.json (architecture, model_args) beside it"
        )
    state_dict = read_state_dict(path)
    model = build_base(spec)
    load_weights(model, state_dict, repr(str(path)))
    return model


def _hf_from_dir(path: Path) -> nn.Module:
    import transformers

    cfg = _read_json(path / "config.json")
    archs = cfg.get("architectures") or ["ViTModel"]
    cls_name = archs[0]
    if cfg.get("model_type") != "vit" or cls_name not in HF_VIT_CLASSES:
        raise SourceError(
            f"unsupported Hugging Face model in {str(path)!r}: model_type "
            f"{cfg.get('model_type')!r}, architecture {cls_name!r}; expected a ViT "
            f"({', '.join(HF_VIT_CLASSES)})"
        )
    with _quiet_transformers():
        try:
            model, info = getattr(transformers, cls_name).from_pretrained(
                str(path), local_files_only=True, output_loading_info=True)
        except Exception as error:  # corrupt weights, bad config values, shape mismatches
            first = " ".join(str(error).split())[:300] or type(error).__name__
            if "mismatch" in first:
                first = "tensor shapes in the weights do not match its config.json"
            raise SourceError(
                f"cannot load Hugging Face model from {str(path)!r}: {first}") from None
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("pooler."))
    if missing:  # transformers' own report is held back; say it in one line
        warnings.warn(f"{str(path)!r} lacks {len(missing)} weights of {cls_name} (e.g. "
                      f"{missing[0]!r}); they are randomly initialised", stacklevel=2)
    return model.eval()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
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


def load_model(
    source: str,
    *,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Resolve a source string to a model in eval mode (see the module docstring)."""
    if not isinstance(source, str) or not source:
        raise SourceError(f"model source must be a non-empty string, got {source!r}")
    if source.startswith("timm:"):
        if model_kwargs:
            raise SourceError("model arguments apply to checkpoint files, not to timm: names")
        return _timm_from_name(source[len("timm:"):])
    path = Path(source)
    if path.is_dir():
        if (path / "kdgqa_config.json").is_file():
            from kdgqa.checkpoint import load

            return load(path)
        config = path / "config.json"
        if not config.is_file():
            raise SourceError(
                f"directory {source!r} holds neither kdgqa_config.json nor config.json"
            )
        data = _read_json(config)
        if "architecture" in data:
            weights = path / "model.safetensors"
            if not weights.is_file():
                weights = path / "pytorch_model.bin"
            return _timm_from_file(weights, arch, model_kwargs)
        return _hf_from_dir(path)
    if path.suffix in CHECKPOINT_SUFFIXES:
        if not path.is_file():
            raise SourceError(f"checkpoint file {source!r} does not exist")
        return _timm_from_file(path, arch, model_kwargs)
    if path.exists():
        raise SourceError(
            f"unsupported model file {source!r}; expected one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    raise SourceError(
        f"unknown model {source!r}: expected timm:NAME, a checkpoint file "
        f"({', '.join(CHECKPOINT_SUFFIXES)}) or a model directory"
    )

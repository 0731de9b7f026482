"""Whole-model speed: train and inference img/s, MFU and peak memory of converted timm ViTs.

Every row is one (model, image size, batch, implementation, scheme, compiled, mode). In the
same process and on the same GPU as the kdgqa rows run two baselines:

* ``impl=timm``: timm's own ViT (multi-head attention through fused SDPA), untouched;
* ``impl=official``: the same timm ViT with every attention replaced by the official code's
  execution pattern (``official_reference.py``: separate q/k/v, per-group Python loop,
  allocation read on the host), for ``mha``, ``gqa`` and each scheme the official code has.

``impl=kdgqa`` rows are ``kdgqa.convert(model, scheme, G)`` in default mode (schemes that
calibrate at conversion get ``--calibration-images`` synthetic images). Train step:
forward + cross-entropy + backward + AdamW (fused on CUDA, the same for every row), bf16
autocast over fp32 weights, synthetic images and labels already on the device (two batches,
alternated). Inference: eval mode, ``torch.inference_mode``, bf16 autocast. Timing: warm-up
steps, then one CUDA-event pair around the timed steps (no per-step sync); peak memory is
``torch.cuda.max_memory_allocated``, reset per row. MFU = img/s x 3 (train; 1 for inference)
x forward matmul FLOPs per image / 790 TFLOP/s (the H200's measured dense bf16 rate); FLOPs
are counted analytically (2 per multiply-add), with each row's own K/V width (``mfu``) and with
the MHA count (``mfu_mha_flops``, like for like).

    python benchmarks/model.py --models vit_b --batch 128 --out benchmarks/results/model.json
    python benchmarks/model.py --smoke          # tiny ViT on the CPU in a few seconds
    python benchmarks/model.py --table benchmarks/results/model_*.json   # docs/performance.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdgqa
from attention import emit
from official_reference import KINDS as OFFICIAL_KINDS
from official_reference import TrainingClock, replace_attention
from table import load, model_tables

PEAK_TFLOPS = 790.0  # dense bf16 matmul rate measured on the H200 (datasheet ~989)
DEFAULT_EXCLUDED = ("mha", "mqa")


@dataclass(frozen=True)
class ModelSpec:
    timm_name: str
    kv_heads: int
    overrides: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {
    "vit_s": ModelSpec("vit_small_patch16_224", 3),
    "vit_b": ModelSpec("vit_base_patch16_224", 6),
    "vit_l": ModelSpec("vit_large_patch16_224", 4),
    # --smoke: a 2-block ViT that runs on a CPU in milliseconds
    "tiny": ModelSpec("vit_small_patch16_224", 3,
                      {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 6}),
}


# --------------------------------------------------------------------------------------------
# FLOPs


@dataclass(frozen=True)
class ViTArch:
    """What the forward matmul FLOPs of a plain ViT depend on."""

    patches: int
    prefix_tokens: int
    dim: int
    depth: int
    heads: int
    head_dim: int
    mlp_hidden: int
    patch_in: int  # in_chans x patch x patch
    num_classes: int


def vit_arch(model: nn.Module) -> ViTArch:
    """Read the architecture of an (unconverted) timm VisionTransformer."""
    m: Any = model
    block = m.blocks[0]
    weight = m.patch_embed.proj.weight
    return ViTArch(
        patches=int(m.patch_embed.num_patches),
        prefix_tokens=int(m.num_prefix_tokens),
        dim=int(m.embed_dim),
        depth=len(m.blocks),
        heads=int(block.attn.num_heads),
        head_dim=int(block.attn.head_dim),
        mlp_hidden=int(block.mlp.fc1.out_features),
        patch_in=int(weight.shape[1] * weight.shape[2] * weight.shape[3]),
        num_classes=int(m.num_classes),
    )


def vit_forward_flops(arch: ViTArch, kv_heads: int | None = None) -> int:
    """Forward matmul FLOPs per image (2 per multiply-add).

    Patch embedding, per block the q/k/v projection (``(H + 2G) x head_dim`` outputs), the
    attention matmuls ``Q K^T`` and ``A V`` for every query head, the output projection and
    the MLP, and the classifier head on the pooled token. Norms, softmax, GELU and the
    allocation are not matmuls and are not counted. ViT-B/16 at 224 px: 35.1 GFLOP.
    """
    g = arch.heads if kv_heads is None else kv_heads
    tokens = arch.patches + arch.prefix_tokens
    width = arch.heads * arch.head_dim
    qkv = tokens * arch.dim * (arch.heads + 2 * g) * arch.head_dim
    scores_and_values = 2 * arch.heads * tokens * tokens * arch.head_dim
    proj = tokens * width * arch.dim
    mlp = 2 * tokens * arch.dim * arch.mlp_hidden
    block = qkv + scores_and_values + proj + mlp
    macs = arch.patches * arch.patch_in * arch.dim + arch.depth * block
    macs += arch.dim * arch.num_classes
    return 2 * macs


# --------------------------------------------------------------------------------------------
# Configurations


@dataclass(frozen=True)
class Config:
    """One model build; each mode in ``modes`` gives one row."""

    model: str
    img_size: int
    batch: int
    impl: str  # timm | kdgqa | official
    scheme: str
    compiled: bool
    expand_method: str = "auto"


def map_can_be_uneven(scheme: str) -> bool:
    """Schemes whose head map is chosen from the keys or calibrated: the ones an expand
    method (``GroupedQueryAttention.expand_method``) changes."""
    return bool(kdgqa.GroupedQueryAttention(8, 2, 1, scheme).allocator.key_driven
                or needs_calibration(scheme))


def plan(args: argparse.Namespace) -> list[Config]:
    configs: list[Config] = []
    compile_flags = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for name in args.models:
        for size in args.img_size:
            for batch in args.batch:
                for compiled in compile_flags:
                    if "timm" in args.baselines:
                        configs.append(Config(name, size, batch, "timm", "mha", compiled))
                    for scheme in args.schemes:
                        methods = args.expand_methods if map_can_be_uneven(scheme) else ["auto"]
                        for method in methods:
                            configs.append(Config(name, size, batch, "kdgqa", scheme, compiled,
                                                  method))
                    if "official" in args.baselines and not compiled:
                        for kind in args.official:
                            configs.append(Config(name, size, batch, "official", kind, False))
    return configs


def default_official(schemes: list[str]) -> list[str]:
    """``mha`` and ``gqa`` always, then each benchmarked scheme the official code has."""
    return ["mha", "gqa", *(s for s in schemes if s in OFFICIAL_KINDS and s not in ("mha", "gqa"))]


# --------------------------------------------------------------------------------------------
# Building and timing


@dataclass
class Built:
    model: nn.Module
    arch: ViTArch
    kv_heads: int
    timm_name: str
    clock: TrainingClock | None = None


def kv_heads_for(cfg: Config, spec: ModelSpec, arch: ViTArch, override: int | None) -> int:
    if cfg.scheme == "mha":
        return arch.heads
    if cfg.scheme == "mqa":
        return 1
    return override or spec.kv_heads


def needs_calibration(scheme: str) -> bool:
    """Schemes that pick their groups from data at conversion (``calibrated``, ...)."""
    return bool(getattr(kdgqa.SCHEMES.get(scheme), "needs_calibration", False))


def build(cfg: Config, device: torch.device, kv_override: int | None,
          calibration_images: int = 64) -> Built:
    import timm

    spec = MODELS[cfg.model]
    torch.manual_seed(0)
    with device:
        model = timm.create_model(spec.timm_name, pretrained=False, img_size=cfg.img_size,
                                  num_classes=1000, **spec.overrides)
    arch = vit_arch(model)
    kv = kv_heads_for(cfg, spec, arch, kv_override)
    clock = None
    if cfg.impl == "kdgqa":
        options: dict[str, Any] = {}
        if needs_calibration(cfg.scheme):  # speed does not depend on which images
            gen = torch.Generator(device=device).manual_seed(2)
            options["calibration"] = torch.randn(
                calibration_images, 3, cfg.img_size, cfg.img_size, device=device, generator=gen)
        kdgqa.convert(model, cfg.scheme, kv, **options)
        for module in model.modules():
            if isinstance(module, kdgqa.GroupedQueryAttention):
                module.expand_method = cfg.expand_method
    elif cfg.impl == "official":
        clock = replace_attention(model, cfg.scheme, kv)
    return Built(model.to(device), arch, kv, spec.timm_name, clock)


def synthetic_batches(batch: int, img_size: int, device: torch.device,
                      count: int = 2) -> list[tuple[Tensor, Tensor]]:
    """Fixed random images and labels on the device; two of them, so that consecutive batches
    differ (the official DGQA-diff divides by the norm change between evaluation batches)."""
    gen = torch.Generator(device=device).manual_seed(1)
    return [
        (torch.randn(batch, 3, img_size, img_size, device=device, generator=gen),
         torch.randint(0, 1000, (batch,), device=device, generator=gen))
        for _ in range(count)
    ]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[int], None], warmup: int, steps: int,
          device: torch.device) -> tuple[float, float]:
    """Run ``warmup`` then ``steps`` steps; return (first step in s, mean ms per timed step).

    The first step is timed alone (it includes compilation, autotuning, kernel JIT); the
    timed steps are bracketed by one pair of CUDA events, so the host may run ahead exactly
    as far as the step itself lets it.
    """
    start = time.perf_counter()
    step(0)
    synchronize(device)
    first_s = time.perf_counter() - start
    for i in range(1, warmup):
        step(i)
    synchronize(device)
    if device.type == "cuda":
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        begin.record()
        for i in range(warmup, warmup + steps):
            step(i)
        end.record()
        end.synchronize()
        total_ms = begin.elapsed_time(end)
    else:
        start = time.perf_counter()
        for i in range(warmup, warmup + steps):
            step(i)
        total_ms = (time.perf_counter() - start) * 1e3
    return first_s, total_ms / steps


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_optimizer(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                             fused=fused, foreach=None if fused else True)


def optimizer_name(device: torch.device) -> str:
    return f"AdamW(lr=1e-4, wd=0.05, {'fused' if device.type == 'cuda' else 'foreach'})"


def measure_mode(mode: str, built: Built, run: nn.Module | Callable[..., Tensor],
                 batches: list[tuple[Tensor, Tensor]], args: argparse.Namespace,
                 warmup: int) -> tuple[float, float]:
    model, device, dtype = built.model, args.device, args.dtype
    if mode == "train":
        model.train()
        optimizer = make_optimizer(model, device)
        clock = built.clock

        def train_step(i: int) -> None:
            if clock is not None:
                clock.step = i  # the official loop sets its global step each batch
            x, y = batches[i % len(batches)]
            with autocast(device, dtype):
                loss = F.cross_entropy(run(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            return timed(train_step, warmup, args.steps, device)
        finally:
            model.zero_grad(set_to_none=True)  # the optimizer state goes with this frame
    model.eval()

    def infer_step(i: int) -> None:
        x, _ = batches[i % len(batches)]
        with torch.inference_mode(), autocast(device, dtype):
            run(x)

    return timed(infer_step, warmup, args.steps, device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def environment(device: torch.device) -> dict[str, Any]:
    import timm

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timm": timm.__version__,
        "kdgqa": kdgqa.__version__,
        "python": platform.python_version(),
        # rows compare only with baselines of the same run (same process, same GPU)
        "run_id": f"{time.strftime('%Y%m%dT%H%M%S')}-{platform.node()}-{os.getpid()}-{device}",
        "git_commit": commit,
    }


def dynamo_graphs() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # counters are private API; absent is fine
        return None


def run_config(cfg: Config, args: argparse.Namespace,
               env: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Build one model and yield a row per mode; errors (OOM included) become rows."""
    device, dtype = args.device, args.dtype
    spec = MODELS[cfg.model]
    base: dict[str, Any] = {
        "model": cfg.model,
        "timm_name": spec.timm_name,
        "img_size": cfg.img_size,
        "batch": cfg.batch,
        "scheme": cfg.scheme,
        "impl": cfg.impl,
        "compiled": cfg.compiled,
        **({"expand_method": cfg.expand_method} if cfg.expand_method != "auto" else {}),
    }
    settings: dict[str, Any] = {
        "dtype": str(dtype).removeprefix("torch."),
        "autocast": dtype != torch.float32,
        "optimizer": optimizer_name(device),
        "data": "synthetic, on device (2 fixed batches, alternated)",
        "warmup": args.warmup + (1 if cfg.compiled else 0),
        "steps": args.steps,
        "peak_tflops": args.peak_tflops,
        **env,
    }
    built: Built | None = None
    run: Any = None
    try:
        free_memory(device)
        if cfg.compiled:
            torch._dynamo.reset()
        built = build(cfg, device, args.kv_heads, args.calibration_images)
        run = torch.compile(built.model) if cfg.compiled else built.model
        batches = synthetic_batches(cfg.batch, cfg.img_size, device)
    except Exception as error:  # a failed build fails every mode of the config
        traceback.print_exc(file=sys.stderr)
        for mode in args.modes:
            yield {**base, "mode": mode, "error": _describe(error), **settings}
        return
    flops = vit_forward_flops(built.arch, built.kv_heads)
    mha_flops = vit_forward_flops(built.arch)
    params = sum(p.numel() for p in built.model.parameters())
    if cfg.impl == "kdgqa" and needs_calibration(cfg.scheme):
        settings["calibration"] = f"{args.calibration_images} synthetic images, at conversion"
    for mode in args.modes:
        row: dict[str, Any] = {**base, "mode": mode}
        free_memory(device)
        warmup = args.warmup + (1 if cfg.compiled else 0)
        graphs_before = dynamo_graphs()
        try:
            first_s, ms = measure_mode(mode, built, run, batches, args, warmup)
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            row["error"] = _describe(error)
            free_memory(device)
            yield {**row, **settings}
            continue
        img_s = cfg.batch / ms * 1e3
        factor = 3 if mode == "train" else 1
        peak = args.peak_tflops * 1e12
        row.update({
            "img_per_s": round(img_s, 1),
            "ms_per_step": round(ms, 3),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            if device.type == "cuda" else None,
            "mfu": round(img_s * factor * flops / peak, 4),
            "mfu_mha_flops": round(img_s * factor * mha_flops / peak, 4),
            "flop_factor": factor,
            "fwd_gflop_per_img": round(flops / 1e9, 3),
            "mha_fwd_gflop_per_img": round(mha_flops / 1e9, 3),
            "heads": built.arch.heads,
            "kv_heads": built.kv_heads,
            "params_m": round(params / 1e6, 2),
            "first_step_s": round(first_s, 2),
        })
        if cfg.compiled:
            row["compile_s"] = row["first_step_s"]
            graphs = dynamo_graphs()
            # 1 = one graph for the whole model (no graph break, no recompilation)
            row["dynamo_graphs"] = None if graphs is None or graphs_before is None \
                else graphs - graphs_before
        yield {**row, **settings}
    del built, run, batches
    free_memory(device)


def _describe(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return "out of memory"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


# --------------------------------------------------------------------------------------------
# Command line


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str) -> list[int]:
    return [int(part) for part in _csv(text)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=_csv, default=["vit_b"],
                        help=f"comma list of {', '.join(MODELS)} (default vit_b)")
    parser.add_argument("--img-size", type=_ints, default=[224], help="comma list (224)")
    parser.add_argument("--batch", type=_ints, default=[128], help="comma list (128)")
    parser.add_argument("--schemes", type=_csv, default=None,
                        help="comma list; default: every registered scheme but mha and mqa")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="G for every model (default ViT-S 3, ViT-B 6, ViT-L 4)")
    parser.add_argument("--modes", type=_csv, default=["train", "infer"])
    parser.add_argument("--expand-methods", type=_csv, default=["auto"],
                        help="comma list: one kdgqa row per method for schemes whose map can "
                             "be uneven (e.g. auto,gather: the head-map kernel beside the "
                             "expansion)")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off",
                        help="torch.compile(model) rows (official rows are always eager)")
    parser.add_argument("--baselines", type=_csv, default=["timm", "official"],
                        help="comma list of timm, official; 'none' for neither")
    parser.add_argument("--official", type=_csv, default=None,
                        help=f"official-style kinds ({', '.join(OFFICIAL_KINDS)}); default "
                        "mha, gqa and the benchmarked schemes the official code has")
    parser.add_argument("--warmup", type=int, default=10,
                        help="warm-up steps (compiled rows: one more, the compiling step)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--calibration-images", type=int, default=64,
                        help="synthetic images for schemes that calibrate at conversion")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", default=None, help="e.g. cuda:1 (default cuda, else cpu)")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no new model after this many minutes (rows marked skipped)")
    parser.add_argument("--out", type=Path, help="JSON list of rows (rewritten after each row)")
    parser.add_argument("--list", action="store_true", help="print the configurations only")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny ViT, CPU, fp32, batch 4, 1+2 steps: checks the plumbing")
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                        help="print the docs/performance.md tables of result files and exit")
    parser.add_argument("--full", action="store_true", help="with --table: one line per row")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.img_size, args.batch = ["tiny"], [32], [4]
        args.dtype, args.warmup, args.steps = "fp32", 1, 2
        args.calibration_images = 4
        args.device = args.device or "cpu"
    registered = kdgqa.available_schemes()
    if args.schemes is None:
        args.schemes = [s for s in registered if s not in DEFAULT_EXCLUDED]
    for name, valid, given in (("model", list(MODELS), args.models),
                               ("scheme", registered, args.schemes),
                               ("mode", ["train", "infer"], args.modes),
                               ("baseline", ["timm", "official", "none"], args.baselines)):
        bad = [g for g in given if g not in valid]
        if bad:
            parser.error(f"unknown {name} {bad[0]!r}; valid: {', '.join(valid)}")
    if args.official is None:
        args.official = default_official(args.schemes)
    bad = [k for k in args.official if k not in OFFICIAL_KINDS]
    if bad:
        parser.error(f"unknown official kind {bad[0]!r}; valid: {', '.join(OFFICIAL_KINDS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.device = device
    args.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    return args


def _save(rows: list[dict[str, Any]], out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(out.suffix + ".partial")
        partial.write_text(json.dumps(rows, indent=1) + "\n")
        partial.replace(out)


def _progress(row: dict[str, Any]) -> str:
    what = (f"{row['model']} {row['img_size']}px b{row['batch']} {row['mode']:<5} "
            f"{'compiled' if row['compiled'] else 'eager':<8} {row['impl']:<8} {row['scheme']:<9}"
            f"{' ' + row['expand_method'] if 'expand_method' in row else ''}")
    if "error" in row:
        return f"{what} ERROR {row['error']}"
    extra = f" compile {row['compile_s']:.0f}s" if "compile_s" in row else ""
    mem = "" if row["peak_mem_gib"] is None else f" {row['peak_mem_gib']:6.1f} GiB"
    return (f"{what} {row['img_per_s']:9.1f} img/s {row['ms_per_step']:8.2f} ms{mem} "
            f"MFU {100 * row['mfu']:4.1f}%{extra}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(model_tables(load(args.table), full=args.full), end="")
        return 0
    configs = plan(args)
    if args.list:
        for cfg in configs:
            print(cfg)
        print(f"{len(configs)} models, {len(configs) * len(args.modes)} rows", file=sys.stderr)
        return 0
    threads = torch.get_num_threads()
    if args.smoke:  # tiny ops: threads only contend (on a shared 2-core box, 100x slower)
        torch.set_num_threads(1)
    try:
        return _run(args, configs)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, configs: list[Config]) -> int:
    device = args.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    env = environment(device)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for cfg in configs:
        elapsed_min = (time.perf_counter() - started) / 60
        if args.max_minutes is not None and elapsed_min > args.max_minutes:
            for mode in args.modes:
                rows.append({"model": cfg.model, "img_size": cfg.img_size, "batch": cfg.batch,
                             "scheme": cfg.scheme, "impl": cfg.impl, "compiled": cfg.compiled,
                             "mode": mode, "error": "skipped: --max-minutes reached", **env})
            continue
        for row in run_config(cfg, args, env):
            print(_progress(row), file=sys.stderr, flush=True)
            rows.append(row)
            _save(rows, args.out)
    print(f"done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    emit(rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

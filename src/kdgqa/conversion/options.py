"""The choices a conversion accepts, importable without torch (the CLI's help reads them)."""

from __future__ import annotations

__all__ = ["DATA_POOLING", "FIT_CALIBRATION_IMAGES", "POOLING_METHODS"]

#: How each KV head starts from the heads of its group: their mean (GQA's recipe), the first
#: head, random values with the group's spread (GQA's "random init" ablation), or ``fit``:
#: solved from calibration images to keep the layer's function (``kdgqa.conversion.fit``).
POOLING_METHODS = ("mean", "first", "random", "fit")
#: Pooling methods that need calibration images.
DATA_POOLING = ("fit",)
#: Calibration images measured for ``pooling="fit"`` and ``align=True`` by default.
FIT_CALIBRATION_IMAGES = 512

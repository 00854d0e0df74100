"""Memorization detectors as plug-ins: DETECTORS (name -> Detector class) and `register` (utils/detection/base.py);
one file per detector registers itself when imported. The built-in ones, in the order their hooks run:"""
from .base import DETECTORS, Detector, Sampling, register  # noqa: F401
from . import sharpness, wen, anisotropy, tiled_l2, le, ae, be  # noqa: F401,E402  (each registers itself)
from . import metric2, dsm, curv_ds, curv_dh, nemo  # noqa: F401,E402  (the 2024-26 detectors, docs/detection.md)
from . import curv_ds_theta, curv_dh_theta  # noqa: F401,E402  (Kim & Lee's earlier-checkpoint variants)
from .sharpness import sharpness_scores  # noqa: F401,E402

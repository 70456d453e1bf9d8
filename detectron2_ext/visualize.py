"""Figures of a built detectron2 model's necks and backbone (FINE, ASFF, MAF, MSCSA, ERF).

:func:`draw_detectron2_model` feeds one image through ``model.backbone`` (the neck included) and
draws with :mod:`maformer_zoo.utils.visualize`; ``scripts/visualize.py --config-file`` and the
demo call it.
"""
from typing import List, Sequence

import numpy as np
import torch
from torch import nn

from maformer_zoo.utils.visualize import _resize_rgb, draw_all, draw_erf, resize_image

__all__ = ['draw_detectron2_model']


def draw_detectron2_model(model: nn.Module, images: Sequence[np.ndarray], out_dir: str,
                          input_format: str = 'RGB', size: int = 512, erf: bool = True) -> List[str]:
    """Draw every figure the model allows into ``out_dir``; returns the PNG paths.

    Args:
        model: a detectron2 meta-architecture (``GeneralizedRCNN``, ``SemanticSegmentor``, ...)
            with ``backbone``, ``pixel_mean`` and ``pixel_std``.
        images: ``(H, W, 3)`` uint8 RGB images; the maps are drawn over the first, the effective
            receptive field is averaged over all.
        out_dir: output directory.
        input_format: the model's ``INPUT.FORMAT`` ('RGB' or 'BGR').
        size: shorter side the first image is resized to (rounded to the backbone's
            ``size_divisibility``); the others are resized to the same size.
        erf: also draw the ERF of every bottom-up stage (``backbone.bottom_up`` when there is
            one, else the backbone's outputs).
    """
    backbone = model.backbone
    divisor = max(32, int(getattr(backbone, 'size_divisibility', 0) or 0))
    arrays = [resize_image(images[0], size, divisor)]
    arrays += [_resize_rgb(im, arrays[0].shape[:2]) for im in images[1:]]

    def to_input(a: np.ndarray) -> torch.Tensor:
        a = a[:, :, ::-1] if input_format == 'BGR' else a
        x = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float().to(model.pixel_mean.device)
        return (x - model.pixel_mean) / model.pixel_std

    tensors = [to_input(a) for a in arrays]
    paths = draw_all(model, tensors[0], arrays[0], out_dir, forward=backbone)
    if erf:
        stages = getattr(backbone, 'bottom_up', backbone)
        names = list(stages.output_shape())
        was_training = model.training
        model.eval()
        try:
            paths += draw_erf(lambda x: [stages(x)[n] for n in names], tensors, arrays[0], out_dir,
                              names=names)
        finally:
            model.train(was_training)
    return paths

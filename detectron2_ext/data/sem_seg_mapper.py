"""mmsegmentation's ADE20K data pipeline as detectron2 augmentations and a dataset mapper (``INPUT.SEM_SEG_PIPELINE:
"mmseg"``); the rules: docs/segmentation.md#data-pipeline-mmsegs-ade20k."""
import copy
import functools
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .mapper import read_image_rgb8
from .sem_seg_labels import LabelFormat, read_label

__all__ = ['RatioRangeResize', 'PhotometricDistortion', 'SemSegDatasetMapper', 'uses_mmseg_pipeline']


def uses_mmseg_pipeline(cfg) -> bool:
    return cfg.INPUT.SEM_SEG_PIPELINE == 'mmseg'


class CVResizeTransform(T.ResizeTransform):
    """detectron2's resize with OpenCV's bilinear (image) and nearest (label) resampling, as mmcv."""

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return cv2.resize(img, (self.new_w, self.new_h), interpolation=cv2.INTER_LINEAR)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return cv2.resize(segmentation, (self.new_w, self.new_h), interpolation=cv2.INTER_NEAREST)


class RatioRangeResize(T.Augmentation):
    """mmseg's ``Resize(img_scale, ratio_range, keep_ratio=True)``: ``scale`` (long, short) times a
    uniform ratio from ``ratio_range`` (``(1, 1)``: the test resize), sides truncated to integers, then
    the largest aspect-keeping size within it, a portrait image fitted as a landscape one."""

    def __init__(self, scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0)):
        super().__init__()
        self.scale = tuple(int(s) for s in scale)
        self.ratio_range = tuple(float(r) for r in ratio_range)

    def get_transform(self, image: np.ndarray) -> CVResizeTransform:
        low, high = self.ratio_range
        ratio = np.random.random_sample() * (high - low) + low if high > low else low
        long_side, short_side = int(max(self.scale) * ratio), int(min(self.scale) * ratio)
        h, w = image.shape[:2]
        factor = min(long_side / max(h, w), short_side / min(h, w))
        return CVResizeTransform(h, w, int(h * factor + 0.5), int(w * factor + 0.5))


def _affine(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # each step rounds back to uint8, as mmseg does between its steps
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _photometric(img: np.ndarray, brightness: Optional[float], contrast: Optional[float], contrast_first: bool,
                 saturation: Optional[float], hue: Optional[int], rgb: bool) -> np.ndarray:
    """mmseg's steps in its order (``None``: a step not drawn); OpenCV's 8-bit hue is degrees / 2."""
    to_hsv, from_hsv = (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB) if rgb else (cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR)
    if brightness is not None:
        img = _affine(img, beta=brightness)
    if contrast is not None and contrast_first:
        img = _affine(img, alpha=contrast)
    for channel, change, value in ((1, lambda s: _affine(s, alpha=saturation), saturation),
                                   (0, lambda h: ((h.astype(np.int32) + hue) % 180).astype(np.uint8), hue)):
        if value is not None:
            hsv = cv2.cvtColor(img, to_hsv)
            hsv[..., channel] = change(hsv[..., channel])
            img = cv2.cvtColor(hsv, from_hsv)
    if contrast is not None and not contrast_first:
        img = _affine(img, alpha=contrast)
    return img


class PhotometricDistortion(T.Augmentation):
    """mmseg's ``PhotoMetricDistortion`` on uint8 ``image_format`` ('RGB' or 'BGR') images: each with
    probability 0.5, brightness ``+U(-32, 32)``, contrast ``x U(0.5, 1.5)`` (first or last),
    saturation ``x U(0.5, 1.5)``, hue ``+ randint(-18, 18)`` (OpenCV units)."""

    def __init__(self, brightness_delta: int = 32, contrast_range: Tuple[float, float] = (0.5, 1.5),
                 saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18,
                 image_format: str = 'RGB'):
        super().__init__()
        if image_format not in ('RGB', 'BGR'):
            raise ValueError(f"PhotometricDistortion needs INPUT.FORMAT 'RGB' or 'BGR', got {image_format!r}.")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.ColorTransform:
        rng = np.random  # draws in mmseg's order
        brightness = rng.uniform(-self.brightness_delta, self.brightness_delta) if rng.randint(2) else None
        contrast_first = bool(rng.randint(2))
        contrast = rng.uniform(*self.contrast_range) if rng.randint(2) else None
        saturation = rng.uniform(*self.saturation_range) if rng.randint(2) else None
        hue = int(rng.randint(-self.hue_delta, self.hue_delta)) if rng.randint(2) else None
        return T.ColorTransform(functools.partial(
            _photometric, brightness=brightness, contrast=contrast, contrast_first=contrast_first,
            saturation=saturation, hue=hue, rgb=self.image_format == 'RGB'))


def _pad(array: np.ndarray, size: Optional[Tuple[int, int]], value) -> np.ndarray:
    """``array`` padded at the bottom and right to at least ``size`` (h, w) with ``value``."""
    h, w = array.shape[:2]
    if size is None or (h >= size[0] and w >= size[1]):
        return array
    out = np.full((max(h, size[0]), max(w, size[1])) + array.shape[2:], value, dtype=array.dtype)
    out[:h, :w] = array
    return out


class SemSegDatasetMapper:
    """Dataset dict -> ``image`` (float32 CHW in ``image_format``; training crops padded to
    ``pad_size`` with ``pixel_mean``), ``sem_seg`` (int64 HW, training only; read by
    :func:`~detectron2_ext.data.sem_seg_labels.read_label` with the record's ``label_format``, padded
    with ``ignore_value``) and ``transforms`` (the applied ``TransformList``)."""

    @configurable
    def __init__(self, is_train: bool, *, augmentations: List[T.Augmentation], image_format: str,
                 pad_size: Optional[Tuple[int, int]], pixel_mean: Sequence[float], ignore_value: int):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.pad_size = tuple(pad_size) if pad_size else None
        self.pixel_mean = np.asarray(pixel_mean, dtype=np.float32)
        self.ignore_value = ignore_value

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict:
        scale = tuple(cfg.INPUT.SEM_SEG_SCALE)
        augs, crop = [RatioRangeResize(scale, (1.0, 1.0))], None
        if is_train:
            crop = tuple(cfg.INPUT.CROP.SIZE)
            if not (cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == 'absolute'):
                raise ValueError("INPUT.SEM_SEG_PIPELINE 'mmseg' crops INPUT.CROP.SIZE pixels: set "
                                 "INPUT.CROP.ENABLED True and INPUT.CROP.TYPE 'absolute'.")
            augs = [RatioRangeResize(scale, cfg.INPUT.SEM_SEG_RATIO_RANGE),
                    T.RandomCrop_CategoryAreaConstraint('absolute', crop, cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                                                        cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE),
                    T.RandomFlip(0.5, horizontal=True, vertical=False)]
            augs += [PhotometricDistortion(image_format=cfg.INPUT.FORMAT)] if cfg.INPUT.SEM_SEG_PHOTOMETRIC else []
        return dict(is_train=is_train, augmentations=augs, image_format=cfg.INPUT.FORMAT, pad_size=crop,
                    pixel_mean=cfg.MODEL.PIXEL_MEAN, ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)

    def __call__(self, dataset_dict: Dict) -> Dict:
        record = copy.deepcopy(dataset_dict)
        image = read_image_rgb8(record['file_name'], format=self.image_format)
        utils.check_image_size(record, image)  # sets height / width: the output size
        label_file = record.pop('sem_seg_file_name', None)  # sizes checked at start-up (set_sem_seg_num_classes)
        label = read_label(label_file, LabelFormat(**record.get('label_format', {}))) if self.is_train else None
        aug_input = T.AugInput(image, sem_seg=label)
        record['transforms'] = self.augmentations(aug_input)
        image = _pad(aug_input.image.astype(np.float32), self.pad_size, self.pixel_mean)
        record['image'] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if label is not None:
            label = _pad(aug_input.sem_seg, self.pad_size, self.ignore_value)
            record['sem_seg'] = torch.as_tensor(label.astype(np.int64))
        return record

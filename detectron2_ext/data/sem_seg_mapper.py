"""mmsegmentation's ADE20K data pipeline as detectron2 augmentations and a dataset mapper.

``INPUT.SEM_SEG_PIPELINE: "mmseg"`` (the semantic configs) selects :class:`SemSegDatasetMapper` in
our trainer. Training, in mmseg's order: :class:`RatioRangeResize`, detectron2's
``RandomCrop_CategoryAreaConstraint``, horizontal flip, :class:`PhotometricDistortion`, padding to
the crop size; test: the resize at ratio 1. The rules and their config keys:
docs/segmentation.md#data-pipeline-mmsegs-ade20k.
"""
import copy
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .mapper import read_image_rgb8
from .sem_seg_labels import LabelFormat, read_label

__all__ = ['RatioRangeResize', 'PhotometricDistortion', 'SemSegDatasetMapper', 'uses_mmseg_pipeline',
           'MMSEG_PIPELINE']

MMSEG_PIPELINE = 'mmseg'


def uses_mmseg_pipeline(cfg) -> bool:
    return cfg.INPUT.SEM_SEG_PIPELINE == MMSEG_PIPELINE


class CVResizeTransform(T.Transform):
    """Resize with OpenCV: bilinear for images, nearest for labels (mmcv's ``imresize``)."""

    def __init__(self, h: int, w: int, new_h: int, new_w: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return cv2.resize(img, (self.new_w, self.new_h), interpolation=cv2.INTER_LINEAR)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return cv2.resize(segmentation, (self.new_w, self.new_h), interpolation=cv2.INTER_NEAREST)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        coords[:, 0] = coords[:, 0] * (self.new_w / self.w)
        coords[:, 1] = coords[:, 1] * (self.new_h / self.h)
        return coords

    def inverse(self) -> T.Transform:
        return CVResizeTransform(self.new_h, self.new_w, self.h, self.w)


class RatioRangeResize(T.Augmentation):
    """mmseg's ``Resize(img_scale, ratio_range, keep_ratio=True)``: the scale times a ratio drawn
    uniformly from ``ratio_range`` (truncated to integers), then the largest aspect-preserving
    size whose long side is <= the scale's long side and short side <= its short side
    (orientation-free: a portrait image is fitted as a landscape one)."""

    def __init__(self, scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0)):
        """
        Args:
            scale: ``(long, short)`` sides at ratio 1 (ADE20K: 2048, 512).
            ratio_range: ``(low, high)`` of the uniform ratio; ``(1, 1)`` is mmseg's test resize.
        """
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


class PhotometricTransform(T.Transform):
    """The sampled colour changes of :class:`PhotometricDistortion` (``None``: not applied)."""

    def __init__(self, brightness: Optional[float], contrast: Optional[float],
                 contrast_first: bool, saturation: Optional[float], hue: Optional[int],
                 rgb: bool):
        super().__init__()
        self._set_attributes(locals())

    @staticmethod
    def _affine(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        # each step rounds back to uint8, as mmseg does between its steps
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def _hsv(self, img: np.ndarray, channel: int, change) -> np.ndarray:
        to_hsv, from_hsv = ((cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB) if self.rgb
                            else (cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR))
        hsv = cv2.cvtColor(img, to_hsv)
        hsv[..., channel] = change(hsv[..., channel])
        return cv2.cvtColor(hsv, from_hsv)

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f'PhotometricDistortion takes uint8 RGB/BGR images, got {img.dtype} '
                             f'{img.shape}.')
        if self.brightness is not None:
            img = self._affine(img, beta=self.brightness)
        if self.contrast is not None and self.contrast_first:
            img = self._affine(img, alpha=self.contrast)
        if self.saturation is not None:
            img = self._hsv(img, 1, lambda s: self._affine(s, alpha=self.saturation))
        if self.hue is not None:  # OpenCV's 8-bit hue is 0..179 (degrees / 2)
            img = self._hsv(img, 0, lambda h: ((h.astype(np.int32) + self.hue) % 180).astype(np.uint8))
        if self.contrast is not None and not self.contrast_first:
            img = self._affine(img, alpha=self.contrast)
        return img

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def inverse(self) -> T.Transform:
        return T.NoOpTransform()


class PhotometricDistortion(T.Augmentation):
    """mmseg's ``PhotoMetricDistortion``: each with probability 0.5, brightness ``+U(-32, 32)``,
    contrast ``x U(0.5, 1.5)`` (before or after the next two, with probability 0.5 each),
    saturation ``x U(0.5, 1.5)`` and hue ``+ randint(-18, 18)`` (OpenCV units, half degrees)."""

    def __init__(self, brightness_delta: int = 32, contrast_range: Tuple[float, float] = (0.5, 1.5),
                 saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18,
                 image_format: str = 'RGB'):
        """
        Args:
            brightness_delta, contrast_range, saturation_range, hue_delta: mmseg's defaults.
            image_format: ``'RGB'`` or ``'BGR'`` (``INPUT.FORMAT``), for the HSV conversion.
        """
        super().__init__()
        if image_format not in ('RGB', 'BGR'):
            raise ValueError(f"PhotometricDistortion needs INPUT.FORMAT 'RGB' or 'BGR', got "
                             f"{image_format!r}.")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> PhotometricTransform:
        rng = np.random
        brightness = rng.uniform(-self.brightness_delta, self.brightness_delta) if rng.randint(2) else None
        contrast_first = bool(rng.randint(2))
        contrast = rng.uniform(*self.contrast_range) if rng.randint(2) else None
        saturation = rng.uniform(*self.saturation_range) if rng.randint(2) else None
        hue = int(rng.randint(-self.hue_delta, self.hue_delta)) if rng.randint(2) else None
        return PhotometricTransform(brightness, contrast, contrast_first, saturation, hue,
                                    self.image_format == 'RGB')


def _pad(array: np.ndarray, size: Tuple[int, int], value) -> np.ndarray:
    """``array`` padded at the bottom and right to at least ``size`` with ``value``."""
    h, w = array.shape[:2]
    out_h, out_w = max(h, size[0]), max(w, size[1])
    if (out_h, out_w) == (h, w):
        return array
    out = np.empty((out_h, out_w) + array.shape[2:], dtype=array.dtype)
    out[...] = value
    out[:h, :w] = array
    return out


class SemSegDatasetMapper:
    """Dataset dict -> model input with mmseg's pipeline (module docstring). Labels are read by
    :func:`~detectron2_ext.data.sem_seg_labels.read_label` with the record's ``label_format``.

    Outputs ``image`` (float32 CHW, in ``image_format``; padded training crops hold the pixel
    mean), ``sem_seg`` (int64 HW, training only), and ``transforms`` (the applied
    ``TransformList``, for tests and figures).
    """

    @configurable
    def __init__(self, is_train: bool, *, augmentations: List[T.Augmentation], image_format: str,
                 pad_size: Optional[Tuple[int, int]], pixel_mean: Sequence[float], ignore_value: int):
        """
        Args:
            is_train: read and transform the label too.
            augmentations: applied in order to image and label.
            image_format: ``INPUT.FORMAT``.
            pad_size: ``(h, w)`` every training output is padded to (the crop size); ``None``: none.
            pixel_mean: ``MODEL.PIXEL_MEAN``, the image padding value.
            ignore_value: the label padding value.
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.pad_size = tuple(pad_size) if pad_size else None
        self.pixel_mean = np.asarray(pixel_mean, dtype=np.float32)
        self.ignore_value = ignore_value

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict:
        scale = tuple(cfg.INPUT.SEM_SEG_SCALE)
        if is_train:
            crop = tuple(cfg.INPUT.CROP.SIZE)
            if not (cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == 'absolute'):
                raise ValueError("INPUT.SEM_SEG_PIPELINE 'mmseg' crops INPUT.CROP.SIZE pixels: set "
                                 "INPUT.CROP.ENABLED True and INPUT.CROP.TYPE 'absolute'.")
            augs = [RatioRangeResize(scale, cfg.INPUT.SEM_SEG_RATIO_RANGE),
                    T.RandomCrop_CategoryAreaConstraint(
                        'absolute', crop, cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                        cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE),
                    T.RandomFlip(0.5, horizontal=True, vertical=False)]
            if cfg.INPUT.SEM_SEG_PHOTOMETRIC:
                augs.append(PhotometricDistortion(image_format=cfg.INPUT.FORMAT))
        else:
            augs, crop = [RatioRangeResize(scale, (1.0, 1.0))], None
        return dict(is_train=is_train, augmentations=augs, image_format=cfg.INPUT.FORMAT,
                    pad_size=crop, pixel_mean=cfg.MODEL.PIXEL_MEAN,
                    ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)

    def __call__(self, dataset_dict: Dict) -> Dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_rgb8(dataset_dict['file_name'], format=self.image_format)
        utils.check_image_size(dataset_dict, image)  # sets height / width: the output size
        label = None
        if self.is_train:
            label_file = dataset_dict.pop('sem_seg_file_name')
            label = read_label(label_file, LabelFormat(**dataset_dict.get('label_format', {})))
            if label.shape != image.shape[:2]:
                raise ValueError(
                    f"Image '{dataset_dict['file_name']}' is {image.shape[1]}x{image.shape[0]} but "
                    f"its label '{label_file}' is {label.shape[1]}x{label.shape[0]}.")
        dataset_dict.pop('sem_seg_file_name', None)
        aug_input = T.AugInput(image, sem_seg=label)
        transforms = self.augmentations(aug_input)
        image = aug_input.image.astype(np.float32)
        if self.pad_size is not None:
            image = _pad(image, self.pad_size, self.pixel_mean)
        dataset_dict['image'] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if label is not None:
            label = aug_input.sem_seg
            if self.pad_size is not None:
                label = _pad(label, self.pad_size, self.ignore_value)
            dataset_dict['sem_seg'] = torch.as_tensor(label.astype(np.int64))
        dataset_dict['transforms'] = transforms
        return dataset_dict


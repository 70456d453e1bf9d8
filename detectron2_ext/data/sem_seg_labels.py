"""The one reader of semantic segmentation label files: start-up check, training mapper, evaluator.

A label PNG holds a class index per pixel: palette PNGs (mode ``P``) their palette *indices*, 8-
and 16-bit single-channel PNGs their values (never a luminance conversion). :class:`LabelFormat`
then maps the file's values to training labels: the dataset's ignore value becomes the model's,
and ``reduce_zero_label`` (mmsegmentation's, for ADE20K's raw annotations where 0 is "other")
makes 0 ignored and shifts every other class down by one. Everything that reads labels calls
:func:`read_label`, so what the check accepts is what the model trains on and what is evaluated.
"""
from dataclasses import asdict, dataclass
from typing import Dict

import numpy as np
from PIL import Image

__all__ = ['LabelFormat', 'read_raw_label', 'read_label']

_SINGLE_CHANNEL_MODES = ('P', 'L', '1', 'I;16', 'I;16L', 'I;16B', 'I')


@dataclass(frozen=True)
class LabelFormat:
    """How a dataset's label values map to training labels.

    Args:
        reduce_zero_label: 0 -> ignore, ``v`` -> ``v - 1`` for every other class value.
        ignore_label: the value that marks unlabelled pixels in the files (255, or e.g. 65535).
        ignore_value: the value such pixels get (the model's ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``).
    """
    reduce_zero_label: bool = False
    ignore_label: int = 255
    ignore_value: int = 255

    def to_dict(self) -> Dict:
        return asdict(self)

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Training labels (int32) of the file values ``raw``."""
        labels = raw.astype(np.int32)
        ignored = labels == self.ignore_label
        if self.reduce_zero_label:
            ignored |= labels == 0
            labels = labels - 1
        labels[ignored] = self.ignore_value
        return labels


def read_raw_label(path: str) -> np.ndarray:
    """The values stored in a label PNG: palette indices, or the 8-/16-bit values (2-D array).

    Raises:
        ValueError: one line naming the file: it does not decode, or it is not single-channel.
    """
    try:
        with Image.open(path) as image:
            if image.mode not in _SINGLE_CHANNEL_MODES:
                raise ValueError(
                    f"Label file '{path}' is a {image.mode} image: labels must be single-channel "
                    f"(8- or 16-bit) or palette PNGs holding one class index per pixel.")
            values = np.asarray(image)
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise ValueError(f"Cannot decode label file '{path}' ({type(err).__name__}): it is missing, not a "
                         f"PNG or damaged; replace it, or remove it with its image.") from None
    return values.astype(np.uint8) if values.dtype == bool else values


def read_label(path: str, label_format: LabelFormat = LabelFormat(), dtype=np.int32) -> np.ndarray:
    """Training labels of the file ``path`` (:func:`read_raw_label`, then ``label_format``).

    ``dtype=int`` gives what detectron2's ``SemSegEvaluator`` asks its ``sem_seg_loading_fn`` for.
    """
    return label_format.apply(read_raw_label(path)).astype(dtype, copy=False)

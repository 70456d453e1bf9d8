"""The one label reader of the start-up check, the training mapper and the evaluator: a PNG's class
indices (palette indices, 8-/16-bit values; never luminance), then :class:`LabelFormat`.
docs/segmentation.md#train-on-your-data.
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ['LabelFormat', 'read_raw_label', 'read_label']


@dataclass(frozen=True)
class LabelFormat:
    """File values -> training labels: ``ignore_label`` (in the files) becomes ``ignore_value`` (the
    model's), and ``reduce_zero_label`` (mmseg's) makes 0 ignored and ``v`` class ``v - 1``."""
    reduce_zero_label: bool = False
    ignore_label: int = 255
    ignore_value: int = 255

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
    """The values stored in a single-channel or palette PNG (2-D); else one ``ValueError`` line."""
    try:
        with Image.open(path) as image:
            if image.mode not in ('P', 'L', '1', 'I;16', 'I;16L', 'I;16B', 'I'):
                raise ValueError(
                    f"Label file '{path}' is a {image.mode} image: labels must be single-channel "
                    f"(8- or 16-bit) or palette PNGs holding one class index per pixel.")
            values = np.asarray(image)
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise ValueError(f"Cannot decode label file '{path}' ({type(err).__name__}): it is missing, not a "
                         f"PNG or damaged; replace it, or remove it with its image.") from None
    return values.astype(np.uint8) if values.dtype == bool else values


def read_label(path: str, label_format: LabelFormat = LabelFormat(), dtype=np.int32) -> np.ndarray:
    """Training labels of the file ``path``; ``dtype=int`` is what ``SemSegEvaluator`` asks for."""
    return label_format.apply(read_raw_label(path)).astype(dtype, copy=False)

"""One image decoder for every loader: any PIL mode to 8-bit RGB, wide values scaled rather than
clipped (PIL's ``convert('RGB')`` makes a 16-bit PNG white), EXIF orientation applied, and every
failure one :class:`ImageDecodeError` line naming the file. The rules: docs/training.md#image-decoding.
"""
import os
from typing import BinaryIO, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = ['ImageDecodeError', 'decode_image', 'read_image_header', 'to_rgb8']
_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded (missing, not an image, damaged, too large)."""


def to_rgb8(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: integer modes scaled from 16 bits, ``F`` from [0, 1], others by PIL."""
    if image.mode == 'I' or image.mode.startswith('I;16'):
        # round(v * 255 / 65535) = round(v / 257); values past 16 bits saturate
        grey = np.rint(np.asarray(image).astype(np.float64) / 257.0)
    elif image.mode == 'F':
        grey = np.rint(np.nan_to_num(np.asarray(image, dtype=np.float64)) * 255.0)
    else:
        if image.mode == 'P' and 'transparency' in image.info:
            image = image.convert('RGBA')  # PIL's route for palette transparency; the alpha is then dropped
        return image if image.mode == 'RGB' else image.convert('RGB')
    return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), 'L').convert('RGB')


def _error(path: str, err: BaseException) -> ImageDecodeError:
    if isinstance(err, Image.DecompressionBombError):
        return ImageDecodeError(
            f"Refused image '{path}': it has more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, PIL's "
            f"decompression-bomb limit; downscale it, or, if you trust it, raise PIL.Image.MAX_IMAGE_PIXELS.")
    if isinstance(err, FileNotFoundError) or not os.path.exists(path):
        return ImageDecodeError(f"Image '{path}' does not exist; restore it or remove its entry.")
    return ImageDecodeError(f"Cannot decode image '{path}' ({type(err).__name__}): it is not an image or is "
                            f"damaged; replace or remove it.")


def read_image_header(path: str) -> Tuple[Tuple[int, int], Tuple[int, int], int]:
    """``(stored (w, h), EXIF-oriented (w, h), EXIF orientation)`` from the header; else :class:`ImageDecodeError`."""
    try:
        with Image.open(path) as image:
            try:
                orientation = int(image.getexif().get(0x0112, 1) or 1)
            except (ValueError, TypeError, OSError, SyntaxError):  # damaged EXIF block: as if none
                orientation = 1
            width, height = image.size
    except _ERRORS as err:
        raise _error(path, err) from None
    # orientations 5-8 turn the image by 90 degrees
    return (width, height), ((height, width) if orientation in (5, 6, 7, 8) else (width, height)), orientation


def decode_image(source: Union[str, os.PathLike, BinaryIO], mode: str = 'RGB', exif: bool = True,
                 name: str = '') -> Image.Image:
    """An image file (a path, or an open binary file that ``name`` names) as an 8-bit PIL image of ``mode``
    ('RGB', or 'L' from the 8-bit RGB image), EXIF orientation applied if ``exif`` (as detectron2 does);
    :class:`ImageDecodeError` if it is missing, not an image, damaged or over PIL's pixel limit."""
    try:
        with Image.open(source) as image:
            image.load()
            rgb = to_rgb8(ImageOps.exif_transpose(image) if exif else image)
            return rgb if mode == 'RGB' else rgb.convert(mode)
    except _ERRORS as err:
        raise _error(name or str(getattr(source, 'name', source)), err) from None

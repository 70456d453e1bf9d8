"""One image decoder for every loader: any PIL image mode to 8-bit RGB, scaled rather than clipped.

PIL's ``convert('RGB')`` clips 16-bit and 32-bit pixel values at 255, so a 16-bit PNG becomes a
white image; :func:`to_rgb8` scales them instead, and converts palette, grey+alpha, RGBA and CMYK
images with PIL. The scaling rules (integer modes are 16-bit, float mode is [0, 1], alpha is dropped)
and why: docs/training.md#image-decoding. :func:`decode_image` also applies the EXIF orientation
(as detectron2's ``read_image`` does) and turns every failure to read a file into one
:class:`ImageDecodeError` line naming the file and what to do. Used by ``maformer_zoo.training.data``
(timm datasets) and ``detectron2_ext.data`` (the dataset mapper and registration checks).
"""
import os
from typing import BinaryIO, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = ['ImageDecodeError', 'decode_image', 'exif_size', 'read_image_header', 'to_rgb8']

# EXIF orientations 5-8 turn the image by 90 degrees: width and height swap.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 0x0112


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded (missing, not an image, damaged, too large)."""


def to_rgb8(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: integer modes scaled from 16 bits, ``F`` from [0, 1], others by PIL."""
    mode = image.mode
    if mode == 'RGB':
        return image
    if mode == 'I' or mode.startswith('I;16'):
        # round(v * 255 / 65535) = round(v / 257); values past 16 bits saturate
        grey = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8), 'L').convert('RGB')
    if mode == 'F':
        grey = np.nan_to_num(np.asarray(image, dtype=np.float64))
        return Image.fromarray(np.clip(np.rint(grey * 255.0), 0, 255).astype(np.uint8), 'L').convert('RGB')
    if mode == 'P' and 'transparency' in image.info:
        image = image.convert('RGBA')  # PIL's route for palette transparency; the alpha is then dropped
    return image.convert('RGB')


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)
    except (ValueError, TypeError, OSError, SyntaxError):  # damaged EXIF block: as if none
        return 1


def exif_size(image: Image.Image) -> Tuple[int, int]:
    """``(width, height)`` of ``image`` once its EXIF orientation is applied (read from the header only)."""
    width, height = image.size
    return (height, width) if _orientation(image) in _SWAPPING_ORIENTATIONS else (width, height)


def read_image_header(path: str) -> Tuple[Tuple[int, int], Tuple[int, int], int]:
    """``(stored (w, h), EXIF-oriented (w, h), EXIF orientation)`` of an image, from its header only.

    Raises:
        ImageDecodeError: missing, not an image, or over PIL's pixel limit.
    """
    try:
        with Image.open(path) as image:
            orientation = _orientation(image)
            return image.size, exif_size(image), orientation
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise _open_error(path, err) from None


def _open_error(path: str, err: BaseException) -> ImageDecodeError:
    if isinstance(err, Image.DecompressionBombError):
        return ImageDecodeError(
            f"Refused image '{path}': it has more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, PIL's "
            f"decompression-bomb limit; downscale it, or, if you trust it, raise PIL.Image.MAX_IMAGE_PIXELS.")
    if isinstance(err, FileNotFoundError) or not os.path.exists(path):
        return ImageDecodeError(f"Image '{path}' does not exist; restore it or remove its entry.")
    return ImageDecodeError(f"Cannot decode image '{path}' ({type(err).__name__}): it is not an image or is "
                            f"damaged; replace or remove it.")


def decode_image(source: Union[str, os.PathLike, BinaryIO], mode: str = 'RGB', exif: bool = True,
                 name: str = '') -> Image.Image:
    """Read an image file as an 8-bit PIL image of ``mode`` ('RGB' or 'L'), EXIF orientation applied.

    Args:
        source: a path, or an open binary file (as timm's readers give).
        mode: 'RGB', or 'L' for grey models (computed from the 8-bit RGB image).
        exif: apply the EXIF orientation, so the pixels are the photo as viewers show it.
        name: the file's name for error messages when ``source`` is an open file.

    Raises:
        ImageDecodeError: the file is missing, not an image, damaged or over PIL's pixel limit.
    """
    path = name or str(getattr(source, 'name', source))
    try:
        with Image.open(source) as image:
            image.load()
            if exif:
                image = ImageOps.exif_transpose(image)
            rgb = to_rgb8(image)
            return rgb if mode == 'RGB' else rgb.convert(mode)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise _open_error(path, err) from None

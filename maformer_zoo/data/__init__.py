"""Data helpers shared by the classification scripts and the detectron2 glue (no detectron2 here)."""
from .images import ImageDecodeError, decode_image, read_image_header, to_rgb8  # noqa: F401

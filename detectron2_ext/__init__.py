"""detectron2 extension of maformer-zoo: FINE and ASFF FPN necks, timm backbone adapters, semantic heads.

Importing it registers our parts in detectron2's registries; add our config keys with
:func:`detectron2_ext.add_maformer_zoo_config` before merging a config.
"""
try:
    import detectron2  # noqa: F401
    from detectron2.modeling import BACKBONE_REGISTRY  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised by tests with detectron2 hidden
    raise ImportError(
        f"detectron2_ext needs detectron2, which is not installed (or failed to import: {err}). Install it with "
        "pip install 'git+https://github.com/facebookresearch/detectron2.git', or offline from a PyPI mirror as "
        "the wheel sal-detectron2==0.7.2 (README.md#installing-detectron2; `make setup`).") from err

import maformer_zoo  # noqa: F401,E402  (registers our timm models, which the adapters build)

from .config import add_maformer_zoo_config  # noqa: E402
from . import modeling  # noqa: E402,F401  (registers backbones)

__all__ = ['add_maformer_zoo_config']

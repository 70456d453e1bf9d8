"""detectron2 extension of maformer-zoo: FINE and ASFF FPN necks, and timm backbone adapters.

Importing this package registers our parts in detectron2's registries (``BACKBONE_REGISTRY``).
Add our config keys with :func:`detectron2_ext.add_maformer_zoo_config` before merging a config.

detectron2 is optional for maformer-zoo as a whole but required here.
"""
_INSTALL_HELP = (
    "detectron2_ext needs detectron2, which is not installed (or failed to import: {err}).\n"
    "Install it one of two ways:\n"
    "  * with internet (the normal way):\n"
    "      pip install 'git+https://github.com/facebookresearch/detectron2.git'\n"
    "  * offline machines with only a PyPI mirror: `make setup` in this repository, or\n"
    "      pip install --no-deps --only-binary=:all: --python-version 3.10 --target \"$SITE\" "
    "sal-detectron2==0.7.2\n"
    "    where $SITE is your interpreter's site-packages (see README, 'Installing detectron2')."
)

try:
    import detectron2  # noqa: F401
    from detectron2.modeling import BACKBONE_REGISTRY  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised by tests with detectron2 hidden
    raise ImportError(_INSTALL_HELP.format(err=err)) from err

import maformer_zoo  # noqa: F401,E402  (registers our timm models, which the adapters build)

from .config import add_maformer_zoo_config  # noqa: E402
from . import modeling  # noqa: E402,F401  (registers backbones)

__all__ = ['add_maformer_zoo_config']

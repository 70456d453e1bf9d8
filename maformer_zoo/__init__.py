"""maformer-zoo: MAFormer and MSCSA-augmented backbones as timm models.

Importing this package registers every model with timm, so the usual timm calls work::

    import timm, maformer_zoo
    model = timm.create_model('maformer_s', pretrained=False)

This package never imports detectron2; the detectron2 glue lives in :mod:`detectron2_ext`.
"""
from .models import *  # noqa: F401,F403  (registers the models with timm)

__version__ = '0.1.0'


def list_models(pattern: str = '') -> list:
    """Names of the models this package registers with timm (optionally filtered by a wildcard)."""
    from .models import ZOO_MODULES
    import timm
    return sorted(timm.list_models(pattern, module=ZOO_MODULES))

"""detectron2 glue: each module registers its builders in ``BACKBONE_REGISTRY`` on import."""
from . import timm_backbone  # noqa: F401  (timm backbone adapter)
from . import fpn_variants  # noqa: F401  (FPN / FINE-FPN / ASFF-FPN on ResNet and timm backbones)
from . import semantic  # noqa: F401  (UPerNet head in SEM_SEG_HEADS_REGISTRY)

"""detectron2 glue: each module registers its builders in ``BACKBONE_REGISTRY`` on import."""
from . import fpn_variants  # noqa: F401  (FINE-FPN / ASFF-FPN builders)
from . import timm_backbone  # noqa: F401  (timm backbone adapter and its FPN builders)
from . import semantic  # noqa: F401  (UPerNet head in SEM_SEG_HEADS_REGISTRY)

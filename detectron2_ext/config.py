"""Config keys of maformer-zoo for detectron2: call ``add_maformer_zoo_config(cfg)`` on a fresh ``get_cfg()``
before ``merge_from_file``. The keys are documented once: ``MODEL.TIMM.*`` and ``SOLVER.*`` in docs/detectron2.md,
``MODEL.FPN.FUSION`` / ``MODEL.FINE.*`` / ``MODEL.ASFF.*`` in docs/necks.md, the rest in docs/segmentation.md.
"""
from detectron2.config import CfgNode as CN

__all__ = ['add_maformer_zoo_config']


def _set_defaults(node: CN, **values) -> None:
    """Add each key with its value unless it exists, so that a second call keeps what was merged."""
    for key, value in values.items():
        node.setdefault(key, value)


def add_maformer_zoo_config(cfg: CN) -> CN:
    """Add all maformer-zoo keys to ``cfg`` in place (idempotent) and return it."""
    # the necks
    _set_defaults(cfg.MODEL.FPN, FUSION='sum')
    _set_defaults(cfg.MODEL, FINE=CN(), ASFF=CN())
    _set_defaults(cfg.MODEL.FINE, HEAD_DIM=16, RATIO=2, POOL_KERNELS=[8, 2, 1], POOL_TYPE='avg', QKV_BIAS=True,
                  ZERO_INIT_OUT=False, EXTRA_LEVELS=False)
    _set_defaults(cfg.MODEL.ASFF, NORM='', UPSAMPLE_MODE='nearest')
    # the timm backbone adapter and the optimizer
    _set_defaults(cfg.MODEL, TIMM=CN())
    _set_defaults(cfg.MODEL.TIMM, NAME='', PRETRAINED=False, CHECKPOINT='', PRETRAINED_BASE=False, OUT_INDICES=[],
                  FREEZE_AT=0, NORM='FrozenBN', DROP_PATH_RATE=0.0, GRAD_CKPT=False, SIZE_DIVISIBILITY=0,
                  IMG_SIZE=0, KWARGS=CN(new_allowed=True))
    # FUSED: torch's one-pass optimizer kernel (a 3x faster step on a CPU; other round-off than the loop's)
    _set_defaults(cfg.SOLVER, OPTIMIZER='SGD', BETAS=[0.9, 0.999], FUSED=False, NO_WEIGHT_DECAY_KEYWORDS=[
        'pos_embed', 'absolute_pos_embed', 'relative_position_bias_table', 'cls_token', 'rel_pos_h', 'rel_pos_w'])
    # semantic segmentation: DeepLab's poly schedule and crop keys (its names and defaults), the heads, mmseg's pipeline
    _set_defaults(cfg.SOLVER, POLY_LR_POWER=0.9, POLY_LR_CONSTANT_ENDING=0.0)
    _set_defaults(cfg.MODEL, UPERNET=CN(), SEMANTIC_FPN=CN())
    _set_defaults(cfg.MODEL.UPERNET, POOL_SCALES=[1, 2, 3, 6], DROPOUT=0.1, AUX_IN_FEATURE='res4', AUX_CHANNELS=256,
                  AUX_LOSS_WEIGHT=0.4)
    _set_defaults(cfg.MODEL.SEMANTIC_FPN, DROPOUT=0.1)
    _set_defaults(cfg.INPUT, SEM_SEG_PIPELINE='', SEM_SEG_SCALE=[2048, 512], SEM_SEG_RATIO_RANGE=[0.5, 2.0],
                  SEM_SEG_PHOTOMETRIC=True)
    _set_defaults(cfg.INPUT.CROP, SINGLE_CATEGORY_MAX_AREA=1.0)
    _set_defaults(cfg.DATASETS, REDUCE_ZERO_LABEL=[])
    return cfg

"""Config keys of maformer-zoo for detectron2: ``add_maformer_zoo_config(cfg)``.

Call it on a fresh ``get_cfg()`` before ``merge_from_file``; every key below then exists with its
default, and a typo in a YAML file fails loudly as in any detectron2 project.
"""
from detectron2.config import CfgNode as CN


def _set_default(node: CN, key: str, value) -> None:
    """Add ``key`` with ``value`` unless it exists, so that a second call keeps what was merged."""
    if key not in node:
        node[key] = value


def _add_neck_config(cfg: CN) -> None:
    """Keys of the FPN variants (FINE / ASFF), owned by the necks.

    * ``MODEL.FPN.FUSION``: the neck, the one key every builder reads: ``'sum'`` (detectron2's
      FPN), ``'fine'`` (FINE before each top-down fusion) or ``'asff'`` (ASFF on the top-down
      outputs); the simple feature pyramid of single-scale backbones takes ``'sum'`` / ``'asff'``.
    * ``MODEL.FINE.*``: FINE (``maformer_zoo.layers.fine.FINE``). ``POOL_KERNELS[i]`` is the AATS
      kernel ``k`` of the fusion that produces ``p{i+2}`` (``F_low`` at stride ``2**(i+2)``): the
      paper's ``k = 1`` at stride 16 and ``k = 2`` at stride 8, and our ``k = 8`` at detectron2's
      extra stride-4 fusion, which keeps FINE within +1% FLOPs even with its attention matmuls
      counted (``k = 4``, the paper's stride-32 token grid, costs +1.3%; docs/necks.md).
      ``EXTRA_LEVELS``: also put FINE on each adjacent pair among the last FPN level and the top
      block's levels (``P5 <- FINE(P5, P6)``; RetinaNet also ``P6 <- FINE(P6, P7)``), with
      ``k = 1`` unless ``POOL_KERNELS`` has entries that far. Default off (exactly Eq. 3); our
      R50 paper configs turn it on, which gives four FINEs (+1.053M) on both the R-CNN and the
      RetinaNet FPN, the count the paper's +1.0M / +1.1M figures imply.
    * ``MODEL.ASFF.*``: ASFF (``maformer_zoo.layers.asff.ASFF``).
    """
    _set_default(cfg.MODEL.FPN, 'FUSION', 'sum')
    _set_default(cfg.MODEL, 'FINE', CN())
    fine = cfg.MODEL.FINE
    _set_default(fine, 'HEAD_DIM', 16)          # per-head dimension d (Table 4)
    _set_default(fine, 'RATIO', 2)              # alignment-aware sampling ratio r (Fig. 5)
    _set_default(fine, 'POOL_KERNELS', [8, 2, 1])  # k for the fusions producing p2, p3, p4, ...
    _set_default(fine, 'POOL_TYPE', 'avg')      # 'avg' (paper) or 'max' (Table 6)
    _set_default(fine, 'QKV_BIAS', True)
    _set_default(fine, 'ZERO_INIT_OUT', False)  # True: W_O = 0, FINE starts as the identity
    _set_default(fine, 'EXTRA_LEVELS', False)   # True: FINE also on (P5, P6) [and (P6, P7)]
    _set_default(cfg.MODEL, 'ASFF', CN())
    asff = cfg.MODEL.ASFF
    _set_default(asff, 'NORM', '')              # norm after the resize convs, as MODEL.FPN.NORM
    _set_default(asff, 'UPSAMPLE_MODE', 'nearest')  # 'nearest' or 'bilinear'


def _add_timm_backbone_config(cfg: CN) -> None:
    """Keys of the timm backbone adapter (``MODEL.TIMM.*``) and of training extras.

    * ``MODEL.TIMM.NAME``: any timm model name (ours or timm's) that supports
      ``features_only=True``.
    * ``MODEL.TIMM.PRETRAINED``: load initial weights (timm's default source for the name, i.e.
      ``hf_hub_id`` of its pretrained cfg, unless ``CHECKPOINT`` names another source).
    * ``MODEL.TIMM.CHECKPOINT``: a weight source: ``''`` (the default source), a local
      ``.safetensors`` / ``.pth`` file, ``'hf-hub:<repo id>'`` or ``'local-dir:<folder>'``. Setting
      it implies ``PRETRAINED``. Resolved by ``maformer_zoo.weights.pretrained_overlay`` and loaded by
      timm (safetensors or ``weights_only=True``).
    * ``MODEL.TIMM.PRETRAINED_BASE``: MSCSA models: start the base network from timm's ImageNet
      weights (their ``pretrained_base`` argument) while MSCSA is randomly initialised.
    * ``MODEL.TIMM.OUT_INDICES``: timm ``out_indices`` of the stages returned; empty (default):
      the model's stages at strides 4..32. Outputs are named by stride, ``res2..res5``.
    * ``MODEL.TIMM.FREEZE_AT``: detectron2's meaning: 0 trains all, 1 freezes the stem, ``k``
      freezes the stem and the first ``k - 1`` stages.
    * ``MODEL.TIMM.NORM``: ``'FrozenBN'``, ``'SyncBN'``, ``'BN'`` or ``''`` (keep what the model
      has) for the backbone's BatchNorm layers (LayerNorm is never touched).
    * ``MODEL.TIMM.DROP_PATH_RATE``, ``MODEL.TIMM.GRAD_CKPT``: passed to timm.
    * ``MODEL.TIMM.SIZE_DIVISIBILITY``: 0 takes the model's need (largest stride, times a window
      size where the model declares one); a positive value overrides it.
    * ``MODEL.TIMM.IMG_SIZE``: models with a fixed input size (timm's ``fixed_input_size``, no
      ``dynamic_img_size``: MaxViT, CoAtNet, LeViT, ...) are built for a square of this side and
      every batch is padded to it; 0 takes the largest ``INPUT.MAX_SIZE_TRAIN/TEST``.
    * ``MODEL.TIMM.KWARGS``: further ``timm.create_model`` arguments, checked against the model's
      constructor. A YAML mapping (``KWARGS: {window_size: 12}``); yacs takes no new keys from the
      command line, so put it in a small config that ``_BASE_``s the one you use.
    * ``MODEL.BACKBONE.FREEZE_AT`` and ``MODEL.RESNETS.NORM`` are detectron2's ResNet keys: a timm
      backbone refuses them when changed from their defaults and names the key above to use.
    * ``SOLVER.OPTIMIZER``: ``'SGD'`` (detectron2's) or ``'AdamW'``; ``SOLVER.BETAS`` for AdamW.
      ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE`` also takes ``'full_model'`` (one norm over all
      parameters), see :mod:`detectron2_ext.engine.trainer`.
    * ``SOLVER.NO_WEIGHT_DECAY_KEYWORDS``: a parameter with one of these as a component of its
      dotted name is trained without weight decay (position terms); norms and biases follow
      detectron2's ``SOLVER.WEIGHT_DECAY_NORM`` / ``SOLVER.WEIGHT_DECAY_BIAS``, and names a timm
      model lists in its ``no_weight_decay()`` get none either.
    """
    _set_default(cfg.MODEL, 'TIMM', CN())
    timm_cfg = cfg.MODEL.TIMM
    _set_default(timm_cfg, 'NAME', '')
    _set_default(timm_cfg, 'PRETRAINED', False)
    _set_default(timm_cfg, 'CHECKPOINT', '')
    _set_default(timm_cfg, 'PRETRAINED_BASE', False)
    _set_default(timm_cfg, 'OUT_INDICES', [])
    _set_default(timm_cfg, 'FREEZE_AT', 0)
    _set_default(timm_cfg, 'NORM', 'FrozenBN')
    _set_default(timm_cfg, 'DROP_PATH_RATE', 0.0)
    _set_default(timm_cfg, 'GRAD_CKPT', False)
    _set_default(timm_cfg, 'SIZE_DIVISIBILITY', 0)
    _set_default(timm_cfg, 'IMG_SIZE', 0)
    _set_default(timm_cfg, 'KWARGS', CN(new_allowed=True))
    _set_default(cfg.SOLVER, 'OPTIMIZER', 'SGD')
    _set_default(cfg.SOLVER, 'BETAS', [0.9, 0.999])
    _set_default(cfg.SOLVER, 'NO_WEIGHT_DECAY_KEYWORDS', [
        'pos_embed', 'absolute_pos_embed', 'relative_position_bias_table', 'cls_token',
        'rel_pos_h', 'rel_pos_w'])


def _add_semantic_config(cfg: CN) -> None:
    """Keys of semantic segmentation (docs/segmentation.md).

    * ``SOLVER.LR_SCHEDULER_NAME`` also takes ``'WarmupPolyLR'``: ``lr = BASE_LR * (1 - t /
      MAX_ITER) ** SOLVER.POLY_LR_POWER`` after detectron2's warm-up (power 0.9: MSCSA's
      Semantic FPN; power 1.0: the linear decay of MAFormer's UPerNet). ``WARMUP_ITERS`` 0: none.
    * ``MODEL.UPERNET.*``: :class:`detectron2_ext.modeling.semantic.UPerNetHead` (mmseg's
      UPerHead): ``POOL_SCALES`` of the pyramid pooling module, ``DROPOUT`` before the
      classifiers, the auxiliary FCN head on ``AUX_IN_FEATURE`` (``''``: none) with
      ``AUX_CHANNELS`` and ``AUX_LOSS_WEIGHT``. Its width is ``MODEL.SEM_SEG_HEAD.CONVS_DIM``, its
      norm ``MODEL.SEM_SEG_HEAD.NORM``, its top-down merge ``MODEL.FPN.FUSION``.
    * ``MODEL.SEMANTIC_FPN.DROPOUT``: dropout before the classifier of ``SemanticFPNHead``.
    * ``INPUT.SEM_SEG_PIPELINE``: ``''`` (detectron2's ``DatasetMapper``) or ``'mmseg'``
      (:mod:`detectron2_ext.data.sem_seg_mapper`: resize ``INPUT.SEM_SEG_SCALE`` x a ratio from
      ``INPUT.SEM_SEG_RATIO_RANGE``, crop ``INPUT.CROP.SIZE`` with
      ``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA`` (mmseg's ``cat_max_ratio``; 1.0: off), flip, photometric distortion if
      ``INPUT.SEM_SEG_PHOTOMETRIC``, pad; test: resize to fit ``INPUT.SEM_SEG_SCALE``).
    * ``DATASETS.REDUCE_ZERO_LABEL``: names of datasets of ours whose label files are read with
      mmseg's ``reduce_zero_label`` (0 ignored, the rest shifted down by one).
    """
    _set_default(cfg.SOLVER, 'POLY_LR_POWER', 0.9)
    _set_default(cfg.MODEL, 'UPERNET', CN())
    uper = cfg.MODEL.UPERNET
    _set_default(uper, 'POOL_SCALES', [1, 2, 3, 6])
    _set_default(uper, 'DROPOUT', 0.1)
    _set_default(uper, 'AUX_IN_FEATURE', 'res4')
    _set_default(uper, 'AUX_CHANNELS', 256)
    _set_default(uper, 'AUX_LOSS_WEIGHT', 0.4)
    _set_default(cfg.MODEL, 'SEMANTIC_FPN', CN())
    _set_default(cfg.MODEL.SEMANTIC_FPN, 'DROPOUT', 0.1)
    _set_default(cfg.INPUT, 'SEM_SEG_PIPELINE', '')
    _set_default(cfg.INPUT, 'SEM_SEG_SCALE', [2048, 512])
    _set_default(cfg.INPUT, 'SEM_SEG_RATIO_RANGE', [0.5, 2.0])
    _set_default(cfg.INPUT, 'SEM_SEG_PHOTOMETRIC', True)
    # the name detectron2's DeepLab / MaskFormer projects give mmseg's cat_max_ratio
    _set_default(cfg.INPUT.CROP, 'SINGLE_CATEGORY_MAX_AREA', 1.0)
    _set_default(cfg.DATASETS, 'REDUCE_ZERO_LABEL', [])


def add_maformer_zoo_config(cfg: CN) -> CN:
    """Add all maformer-zoo keys to ``cfg`` in place (idempotent) and return it."""
    _add_neck_config(cfg)
    _add_timm_backbone_config(cfg)
    _add_semantic_config(cfg)
    return cfg

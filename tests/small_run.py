"""Test helper: ``KEY VALUE`` overrides that shrink any grid config to a few-second CPU run.

The grid configs describe COCO training on 8+ GPUs. :func:`small_run_opts` returns the list (as
given after ``train_net.py``'s options) that turns any of them into a run on the generated scenes
that fits a test: small images, few proposals, thin heads, random initialisation with trainable
BatchNorm (frozen BN with random statistics diverges), gradient clipping, no workers. The demo
keeps the same settings as a YAML: ``configs/demo/``.
"""
from typing import List, Optional


def small_run_opts(
        train_dataset: str,
        test_dataset: str,
        num_thing_classes: int,
        output_dir: str,
        num_semantic_classes: Optional[int] = None,
        max_iter: int = 2,
        image_size: int = 128,
        ims_per_batch: int = 2,
        base_lr: float = 2e-4,
        fpn_channels: int = 64,
        backbone: Optional[str] = None,
        eval_period: int = 0,
        seed: int = 0,
) -> List[str]:
    """``KEY VALUE`` overrides for a short CPU run (see the module docstring).

    Args:
        train_dataset, test_dataset: registered dataset names.
        num_thing_classes: ``MODEL.ROI_HEADS.NUM_CLASSES`` (and RetinaNet's).
        output_dir: ``OUTPUT_DIR``.
        num_semantic_classes: Panoptic FPN's ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` (stuff + 'things').
        max_iter: training iterations; the learning rate is constant after a short warm-up.
        image_size: shorter image side for training and testing.
        ims_per_batch: images per batch.
        base_lr: learning rate.
        fpn_channels: FPN (and head) width; the papers' 256 is slow on a CPU.
        backbone: ``MODEL.TIMM.NAME`` override (None keeps the config's).
        eval_period: evaluate every this many iterations (0: only at the end).
        seed: ``SEED``.
    """
    opts = {
        'DATASETS.TRAIN': f'("{train_dataset}",)',
        'DATASETS.TEST': f'("{test_dataset}",)',
        'MODEL.ROI_HEADS.NUM_CLASSES': num_thing_classes,
        'MODEL.RETINANET.NUM_CLASSES': num_thing_classes,
        'MODEL.DEVICE': 'cpu',
        'MODEL.TIMM.PRETRAINED': False,
        'MODEL.TIMM.NORM': 'BN',
        'MODEL.TIMM.FREEZE_AT': 0,
        'MODEL.TIMM.DROP_PATH_RATE': 0.0,
        'MODEL.FPN.OUT_CHANNELS': fpn_channels,
        'MODEL.ROI_BOX_HEAD.FC_DIM': 4 * fpn_channels,
        'MODEL.ROI_MASK_HEAD.CONV_DIM': fpn_channels,
        'MODEL.SEM_SEG_HEAD.CONVS_DIM': fpn_channels,
        'MODEL.RPN.PRE_NMS_TOPK_TRAIN': 256,
        'MODEL.RPN.POST_NMS_TOPK_TRAIN': 128,
        'MODEL.RPN.PRE_NMS_TOPK_TEST': 256,
        'MODEL.RPN.POST_NMS_TOPK_TEST': 64,
        'MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE': 64,
        'INPUT.MIN_SIZE_TRAIN': f'({image_size},)',
        'INPUT.MAX_SIZE_TRAIN': 4 * image_size,
        'INPUT.MIN_SIZE_TEST': image_size,
        'INPUT.MAX_SIZE_TEST': 4 * image_size,
        'INPUT.MASK_FORMAT': 'bitmask',
        'SOLVER.IMS_PER_BATCH': ims_per_batch,
        'SOLVER.BASE_LR': base_lr,
        'SOLVER.MAX_ITER': max_iter,
        'SOLVER.STEPS': '()',
        'SOLVER.WARMUP_ITERS': min(50, max_iter),
        'SOLVER.CHECKPOINT_PERIOD': 10 ** 9,  # only model_final
        'SOLVER.CLIP_GRADIENTS.ENABLED': True,
        'SOLVER.CLIP_GRADIENTS.CLIP_TYPE': 'full_model',
        'SOLVER.CLIP_GRADIENTS.CLIP_VALUE': 1.0,
        'SOLVER.AMP.ENABLED': False,
        'TEST.EVAL_PERIOD': eval_period,
        'TEST.DETECTIONS_PER_IMAGE': 50,
        'DATALOADER.NUM_WORKERS': 0,
        'VIS_PERIOD': 0,
        'SEED': seed,
        'OUTPUT_DIR': output_dir,
    }
    if num_semantic_classes is not None:
        opts['MODEL.SEM_SEG_HEAD.NUM_CLASSES'] = num_semantic_classes
    if backbone is not None:
        opts['MODEL.TIMM.NAME'] = backbone
    flat = []
    for key, value in opts.items():
        flat += [key, str(value)]
    return flat

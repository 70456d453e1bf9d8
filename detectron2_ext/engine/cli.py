"""The command line of ``scripts/train_net.py``: detectron2's, plus dataset registration.

``build_argument_parser()`` is detectron2's ``default_argument_parser`` (``--config-file``,
``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``, ``--resume``,
``--eval-only``, trailing ``opts``) with two repeatable options that register the user's own data
in every launched process:

* ``--coco-dataset NAME JSON IMAGE_DIR``: a COCO instances dataset (detection / instance masks);
* ``--coco-panoptic-dataset NAME IMAGE_DIR PANOPTIC_DIR PANOPTIC_JSON INSTANCES_JSON``: a COCO
  panoptic dataset for Panoptic FPN.

``setup(args)`` builds the config (``get_cfg`` + :func:`add_maformer_zoo_config` + file + opts),
checks it against the registered datasets (names, class counts) and the machine (CPU fallback,
AMP needs CUDA), and runs detectron2's ``default_setup``. ``main(args)`` trains or evaluates, as
detectron2's ``tools/train_net.py`` does, and returns the evaluation results.
"""
import argparse
import difflib
import logging
import os
from typing import Dict, List, Optional

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from ..config import add_maformer_zoo_config
from ..data import register_coco_instances_dataset, register_coco_panoptic_dataset
from ..data import register_sem_seg_dataset, set_sem_seg_num_classes
from .trainer import Trainer

__all__ = ['build_argument_parser', 'register_datasets_from_args', 'setup', 'main', 'run']
logger = logging.getLogger(__name__)

_EPILOG = """
Examples:
  Train on your own COCO-format data:
    scripts/train_net.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_resnet18_mscsa_fine_fpn_1x.yaml \\
      --coco-dataset trees_train train.json images/ --coco-dataset trees_val val.json images/ \\
      DATASETS.TRAIN '("trees_train",)' DATASETS.TEST '("trees_val",)' MODEL.ROI_HEADS.NUM_CLASSES 1
  Evaluate a checkpoint:
    scripts/train_net.py --config-file cfg.yaml --eval-only MODEL.WEIGHTS output/model_final.pth
  Multi-GPU / multi-node: as detectron2 (--num-gpus 8; --num-machines 2 --machine-rank 0 --dist-url tcp://host:port)
"""


def build_argument_parser() -> argparse.ArgumentParser:
    """detectron2's argument parser with ``--coco-dataset`` and ``--coco-panoptic-dataset``."""
    parser = default_argument_parser(epilog=_EPILOG)
    parser.add_argument(
        '--coco-dataset', nargs=3, action='append', default=[],
        metavar=('NAME', 'JSON', 'IMAGE_DIR'),
        help='register a COCO instances dataset as NAME (repeatable)')
    parser.add_argument(
        '--coco-panoptic-dataset', nargs=5, action='append', default=[],
        metavar=('NAME', 'IMAGE_DIR', 'PANOPTIC_DIR', 'PANOPTIC_JSON', 'INSTANCES_JSON'),
        help='register a COCO panoptic dataset for Panoptic FPN as NAME (repeatable); its '
             'semantic labels are written to PANOPTIC_DIR_semseg if missing')
    parser.add_argument(
        '--sem-seg-dataset', nargs=3, action='append', default=[],
        metavar=('NAME', 'IMAGE_DIR', 'LABEL_DIR'),
        help='register a semantic segmentation dataset as NAME: images and same-named label PNGs '
             '(class ids, 255 = ignore; MODEL.SEM_SEG_HEAD.NUM_CLASSES classes) (repeatable)')
    return parser


def register_datasets_from_args(args: argparse.Namespace) -> None:
    """Register the datasets given by ``--coco-dataset`` / ``--coco-panoptic-dataset``."""
    for name, json_file, image_dir in getattr(args, 'coco_dataset', None) or []:
        register_coco_instances_dataset(name, json_file, image_dir)
    for name, image_dir, pan_dir, pan_json, inst_json in getattr(args, 'coco_panoptic_dataset',
                                                                  None) or []:
        register_coco_panoptic_dataset(name, image_dir, pan_dir, pan_json, inst_json)
    for name, image_dir, label_dir in getattr(args, 'sem_seg_dataset', None) or []:
        register_sem_seg_dataset(name, image_dir, label_dir)


def _all_keys(node: CfgNode, prefix: str = '') -> List[str]:
    keys = []
    for key, value in node.items():
        keys.append(prefix + key)
        if isinstance(value, CfgNode):
            keys += _all_keys(value, prefix + key + '.')
    return keys


def _merge(cfg: CfgNode, merge, source: str) -> None:
    """Run ``merge``; turn yacs' 'Non-existent key' errors into a message with suggestions."""
    try:
        merge()
    except (KeyError, AssertionError) as err:  # yacs: KeyError from files, assert from lists
        message = str(err.args[0]) if err.args else str(err)
        if not message.startswith(('Non-existent config key', 'Non-existent key')):
            raise
        bad = message.split(':', 1)[1].strip()
        close = difflib.get_close_matches(bad, _all_keys(cfg), n=3, cutoff=0.7)
        hint = f' Did you mean {" or ".join(close)}?' if close else ''
        raise KeyError(f"Unknown config key '{bad}' in {source}.{hint} (maformer-zoo keys are "
                       f"added by detectron2_ext.add_maformer_zoo_config.)") from None


def _check_datasets(cfg: CfgNode) -> None:
    registered = DatasetCatalog.list()
    arch = cfg.MODEL.META_ARCHITECTURE
    num_things = (('MODEL.RETINANET.NUM_CLASSES', cfg.MODEL.RETINANET.NUM_CLASSES)
                  if arch == 'RetinaNet' else
                  ('MODEL.ROI_HEADS.NUM_CLASSES', cfg.MODEL.ROI_HEADS.NUM_CLASSES))
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=3)
            raise KeyError(
                f"Dataset '{name}' is not registered{f' (did you mean {close}?)' if close else ''}. "
                f"Register your own with --coco-dataset NAME JSON IMAGE_DIR (or "
                f"--coco-panoptic-dataset ..., --sem-seg-dataset ...), or use one of detectron2's "
                f"builtin names.")
        set_sem_seg_num_classes(name, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        meta = MetadataCatalog.get(name)
        things = meta.get('thing_classes', None)
        if things is not None and num_things[1] != len(things):
            raise ValueError(
                f"Dataset '{name}' has {len(things)} thing classes but {num_things[0]} is "
                f"{num_things[1]}: add `{num_things[0]} {len(things)}` to the command line.")
        stuff = meta.get('stuff_classes', None)
        if arch == 'PanopticFPN' and stuff is not None \
                and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES != len(stuff):
            raise ValueError(
                f"Dataset '{name}' has {len(stuff)} semantic classes (stuff + 'things') but "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}: add "
                f"`MODEL.SEM_SEG_HEAD.NUM_CLASSES {len(stuff)}` to the command line.")


def _has_checkpoint(output_dir: str) -> bool:
    return os.path.isfile(os.path.join(output_dir, 'last_checkpoint'))


def setup(args: argparse.Namespace) -> CfgNode:
    """Config from ``args`` (see the module docstring), frozen, after ``default_setup``."""
    register_datasets_from_args(args)
    cfg = add_maformer_zoo_config(get_cfg())
    if not args.config_file:
        raise ValueError('--config-file is required (e.g. a file under configs/).')
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"--config-file '{args.config_file}' does not exist.")
    _merge(cfg, lambda: cfg.merge_from_file(args.config_file), f"'{args.config_file}'")
    _merge(cfg, lambda: cfg.merge_from_list(args.opts), 'the command line')
    if cfg.MODEL.DEVICE.startswith('cuda') and not torch.cuda.is_available():
        logger.warning('No CUDA device: running on the CPU (MODEL.DEVICE cpu).')
        cfg.MODEL.DEVICE = 'cpu'
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith('cuda'):
        raise ValueError('SOLVER.AMP.ENABLED needs a CUDA device (detectron2\'s AMPTrainer); add '
                         '`SOLVER.AMP.ENABLED False` to train on the CPU.')
    _check_datasets(cfg)
    # Every weight comes from the detector checkpoint when evaluating or resuming: do not also
    # fetch the backbone's pretrained weights (which may need the network).
    if args.eval_only or (args.resume and _has_checkpoint(cfg.OUTPUT_DIR)):
        cfg.MODEL.TIMM.PRETRAINED = False
        cfg.MODEL.TIMM.PRETRAINED_BASE = False
        cfg.MODEL.TIMM.CHECKPOINT = ''
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args: argparse.Namespace) -> Optional[Dict]:
    """Train (``trainer.train()``) or evaluate (``--eval-only``); returns the evaluation results."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def run(argv: Optional[List[str]] = None) -> None:
    """Parse ``argv`` and ``launch`` :func:`main` on every process (detectron2's launcher)."""
    args = build_argument_parser().parse_args(argv)
    print('Command Line Args:', args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))

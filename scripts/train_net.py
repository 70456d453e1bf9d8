#!/usr/bin/env python
"""Train or evaluate a maformer-zoo detector: detectron2's ``tools/train_net.py``, with our configs.

    scripts/train_net.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_maformer_s_fine_fpn_1x.yaml \\
        --num-gpus 8 [--resume] [--eval-only] [KEY VALUE ...]

Own data: the ``DATASET_FLAGS`` (``--coco-dataset NAME JSON IMAGE_DIR``, ...), then ``DATASETS.TRAIN '("NAME",)'``.
Configs and weights are read without running code. A run never overwrites another: an ``OUTPUT_DIR`` holding
a run is continued with ``--resume`` (same settings, or ``--allow-changes``) or refused; ``--eval-only`` writes
into a new ``OUTPUT_DIR/eval-N``. See docs/training.md.
"""
import argparse
import os
import sys
from typing import Dict, List, Optional

import torch
import yaml
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from detectron2_ext.checkpoint import SafeDetectionCheckpointer
from detectron2_ext.config_file import flatten_keys, load_config
from detectron2_ext.data import register_coco_instances_dataset, register_coco_panoptic_dataset
from detectron2_ext.data import register_sem_seg_dataset, set_sem_seg_num_classes
from detectron2_ext.engine.trainer import Trainer
from maformer_zoo.errors import CheckpointMismatchError, CorruptCheckpointError, PretrainedWeightsNotFoundError, \
    UnsafeCheckpointError
from maformer_zoo.training.run_folder import check_resume_changes, check_run_folder
from maformer_zoo.utils.atomic import write_atomic
from maformer_zoo.utils.names import close_names_hint

# flag -> (its values, the function registering them in that order, help). Repeatable; each
# launched process registers them again (detectron2's catalogs are per process).
DATASET_FLAGS = {
    '--coco-dataset': (('NAME', 'JSON', 'IMAGE_DIR'), register_coco_instances_dataset,
                       'register a COCO instances dataset as NAME (repeatable)'),
    '--coco-panoptic-dataset': (('NAME', 'IMAGE_DIR', 'PANOPTIC_DIR', 'PANOPTIC_JSON', 'INSTANCES_JSON'),
                                register_coco_panoptic_dataset,
                                'register a COCO panoptic dataset for Panoptic FPN as NAME (repeatable); its semantic '
                                'labels are written to PANOPTIC_DIR_semseg if missing'),
    '--sem-seg-dataset': (('NAME', 'IMAGE_DIR', 'LABEL_DIR', '[reduce_zero_label]', '[ignore_label=N]'),
                          register_sem_seg_dataset,
                          'register a semantic segmentation dataset as NAME: images and same-named label '
                          'PNGs (palette, 8- or 16-bit class ids; MODEL.SEM_SEG_HEAD.NUM_CLASSES classes); '
                          'reduce_zero_label: 0 is ignored and the other values shift down by one (ADE20K\'s raw '
                          'annotations); ignore_label=N: N marks unlabelled pixels (default 255) (repeatable)'),
}
USER_ERRORS = (FileNotFoundError, KeyError, ValueError, UnsafeCheckpointError, CorruptCheckpointError,
               CheckpointMismatchError, PretrainedWeightsNotFoundError, FileExistsError)

EPILOG = """
Examples:
  Train on your own COCO-format data:
    scripts/train_net.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_resnet18_mscsa_fine_fpn_1x.yaml \\
      --coco-dataset trees_train train.json images/ --coco-dataset trees_val val.json images/ \\
      DATASETS.TRAIN '("trees_train",)' DATASETS.TEST '("trees_val",)' MODEL.ROI_HEADS.NUM_CLASSES 1
  Evaluate a checkpoint:
    scripts/train_net.py --config-file cfg.yaml --eval-only MODEL.WEIGHTS output/model_final.pth
  Multi-GPU / multi-node: as detectron2 (--num-gpus 8; --num-machines 2 --machine-rank 0 --dist-url tcp://host:port)
"""


class _ArgumentParser(argparse.ArgumentParser):
    """detectron2's parser; a flag with optional trailing words (``--sem-seg-dataset ... [reduce_zero_label]``)
    keeps only the words it knows and gives the rest back to the ``KEY VALUE`` list that follows."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        leftover = []
        for flag, (metavar, _, _) in DATASET_FLAGS.items():
            optional = [m.strip('[]').split('=')[0] for m in metavar if m.startswith('[')]
            if not optional or not hasattr(namespace, _dest(flag)):
                continue
            kept = []
            for values in getattr(namespace, _dest(flag)):
                n = len(metavar) - len(optional)
                while n < len(values) and values[n].split('=')[0] in optional:
                    n += 1
                kept.append(values[:n])
                leftover += values[n:]
            setattr(namespace, _dest(flag), kept)
        namespace.opts = leftover + list(namespace.opts or [])
        return namespace, extra


def _dest(flag: str) -> str:
    return flag[2:].replace('-', '_')


def build_argument_parser() -> argparse.ArgumentParser:
    base = default_argument_parser(epilog=EPILOG)
    parser = _ArgumentParser(parents=[base], add_help=False, epilog=base.epilog,
                             formatter_class=base.formatter_class)
    parser.add_argument('--allow-changes', action='store_true',
                        help='let --resume change training settings (recorded in OUTPUT_DIR/config_changes.yaml)')
    for flag, (metavar, _, text) in DATASET_FLAGS.items():
        if any(m.startswith('[') for m in metavar):  # a variable count (see _ArgumentParser)
            required = ' '.join(m for m in metavar if not m.startswith('['))
            parser.add_argument(flag, nargs='+', action='append', default=[], metavar=(required, 'OPTION'), help=text)
        else:
            parser.add_argument(flag, nargs=len(metavar), action='append', default=[], metavar=metavar, help=text)
    return parser


def register_datasets(args: argparse.Namespace) -> None:
    for flag, (metavar, register, _) in DATASET_FLAGS.items():
        required = [m for m in metavar if not m.startswith('[')]
        for values in getattr(args, _dest(flag)):
            if not len(required) <= len(values) <= len(metavar):
                raise ValueError(f"{flag} takes {' '.join(metavar)}, got {len(values)} value(s): {' '.join(values)}")
            register(*values)


def check_datasets(cfg: CfgNode) -> None:
    """Every dataset of the config is registered and its class counts match the heads."""
    registered = DatasetCatalog.list()
    arch = cfg.MODEL.META_ARCHITECTURE
    head = 'MODEL.RETINANET.NUM_CLASSES' if arch == 'RetinaNet' else 'MODEL.ROI_HEADS.NUM_CLASSES'
    num_things = cfg.MODEL.RETINANET.NUM_CLASSES if arch == 'RetinaNet' else cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name not in registered:
            raise KeyError(f"Dataset '{name}' is not registered{close_names_hint(name, registered)}. Register your own "
                           f"with {' or '.join(DATASET_FLAGS)}, or use one of detectron2's builtin names.")
        # checks the labels with the reader the mapper and the evaluator use
        set_sem_seg_num_classes(name, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
                                reduce_zero_label=name in cfg.DATASETS.REDUCE_ZERO_LABEL,
                                ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
        meta = MetadataCatalog.get(name)
        if name in cfg.DATASETS.TRAIN and meta.get('num_annotations', None) == 0:
            raise ValueError(f"Training dataset '{name}' has no annotations ({meta.json_file}): detectron2 would find "
                             f"no image to train on. Check the json's 'annotations' list.")
        only_crowd = meta.get('num_annotations', 0) and meta.get('num_trainable_annotations', 1) == 0
        if name in cfg.DATASETS.TRAIN and only_crowd:
            raise ValueError(f"Training dataset '{name}' has only crowd annotations (iscrowd 1) ({meta.json_file}): "
                             f"detectron2 trains on none of them. Mark the single objects iscrowd 0.")
        if (name in cfg.DATASETS.TRAIN and cfg.MODEL.MASK_ON and cfg.INPUT.MASK_FORMAT == 'polygon'
                and 'rle' in meta.get('mask_formats', ())):
            raise ValueError(f"Training dataset '{name}' has RLE masks ({meta.json_file}) but INPUT.MASK_FORMAT is "
                             f"'polygon': add `INPUT.MASK_FORMAT bitmask` to the command line.")
        things, stuff = meta.get('thing_classes', None), meta.get('stuff_classes', None)
        if things is not None and num_things != len(things):
            raise ValueError(f"Dataset '{name}' has {len(things)} thing classes but {head} is {num_things}: "
                             f"add `{head} {len(things)}` to the command line.")
        if arch == 'PanopticFPN' and stuff is not None and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES != len(stuff):
            raise ValueError(
                f"Dataset '{name}' has {len(stuff)} semantic classes (stuff + 'things') but "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}: add "
                f"`MODEL.SEM_SEG_HEAD.NUM_CLASSES {len(stuff)}` to the command line.")


# Settings a resumed run may change without --allow-changes: where things are and how it is watched.
RESUME_MAY_CHANGE = ('OUTPUT_DIR', 'MODEL.WEIGHTS', 'MODEL.TIMM.PRETRAINED', 'MODEL.TIMM.PRETRAINED_BASE',
                     'MODEL.TIMM.CHECKPOINT', 'MODEL.DEVICE', 'DATALOADER.NUM_WORKERS', 'TEST.EVAL_PERIOD',
                     'SOLVER.CHECKPOINT_PERIOD', 'VIS_PERIOD', 'CUDNN_BENCHMARK')


def _last_checkpoint(output_dir: str) -> Optional[str]:
    """The complete checkpoint ``last_checkpoint`` names in ``output_dir`` (None: no such file); a
    ``last_checkpoint`` naming nothing readable is an error (our saves write the file before naming it)."""
    tag = os.path.join(output_dir, 'last_checkpoint')
    if not os.path.isfile(tag):
        return None
    with open(tag, encoding='utf-8') as f:
        name = f.read().strip()
    path = os.path.join(output_dir, name)
    if not name or os.path.dirname(name) or not os.path.isfile(path):
        raise FileNotFoundError(f"'{tag}' names {name!r}, which is not a checkpoint file in that folder: write the "
                                f"file name of the checkpoint to resume into it, or start a new `OUTPUT_DIR <folder>`.")
    return path


def _check_resume(cfg: CfgNode, args: argparse.Namespace, record: bool) -> None:
    """``--resume`` continues the run in OUTPUT_DIR under its own settings (run_folder's rules); the
    trainer cuts its metrics back to the checkpoint (a run killed before its first one starts again)."""
    checkpoint = _last_checkpoint(cfg.OUTPUT_DIR)
    saved_file = os.path.join(cfg.OUTPUT_DIR, 'config.yaml')
    if not os.path.isfile(saved_file):
        if not record:  # record: in a launched process, where the others may have begun writing
            check_run_folder(cfg.OUTPUT_DIR, f"OUTPUT_DIR '{cfg.OUTPUT_DIR}'",
                             hint="it has no config.yaml of a run to --resume; give a new `OUTPUT_DIR <folder>`")
        return
    with open(saved_file, encoding='utf-8') as f:  # written by setup() of the run
        saved = yaml.safe_load(f)
    if not isinstance(saved, dict):
        raise ValueError(f"'{saved_file}' is not the run's config: restore it, or start a new `OUTPUT_DIR <folder>`.")
    check_resume_changes(flatten_keys(saved), flatten_keys(yaml.safe_load(cfg.dump())), RESUME_MAY_CHANGE,
                         args.allow_changes, cfg.OUTPUT_DIR,
                         f"checkpoint {os.path.basename(checkpoint) if checkpoint else '(none)'}", record=record)


def _fresh_subfolder(folder: str, prefix: str) -> str:
    n = 1
    while os.path.lexists(os.path.join(folder, f'{prefix}{n}')):
        n += 1
    return os.path.join(folder, f'{prefix}{n}')


def build_config(args: argparse.Namespace) -> CfgNode:
    """The checked, frozen config of ``args`` (datasets registered); raises one of ``USER_ERRORS``."""
    register_datasets(args)
    if not args.config_file:
        raise ValueError('--config-file is required (e.g. a file under configs/).')
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"--config-file '{args.config_file}' does not exist.")
    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.DEVICE.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f"MODEL.DEVICE is '{cfg.MODEL.DEVICE}' but this machine has no CUDA device: add "
                         f"`MODEL.DEVICE cpu` to the command line.")
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith('cuda'):
        raise ValueError("SOLVER.AMP.ENABLED needs a CUDA device (detectron2's AMPTrainer); add "
                         "`SOLVER.AMP.ENABLED False` to train on the CPU.")
    check_datasets(cfg)
    resuming = args.resume and _last_checkpoint(cfg.OUTPUT_DIR) is not None
    # The folder is checked once, before any process is launched: in the launched ones another process
    # may already have written into it (log.txt.rank1 refused rank 0's own run).
    checked, args.folder_checked = getattr(args, 'folder_checked', False), True
    if args.eval_only:  # the run's folder is read, never written: the evaluation gets its own subfolder
        check_run_folder(cfg.OUTPUT_DIR, f"OUTPUT_DIR '{cfg.OUTPUT_DIR}'", resuming=True)
        if resuming:
            cfg.MODEL.WEIGHTS = _last_checkpoint(cfg.OUTPUT_DIR)
        cfg.OUTPUT_DIR = getattr(args, 'eval_dir', None) or _fresh_subfolder(cfg.OUTPUT_DIR, 'eval-')
        args.eval_dir = cfg.OUTPUT_DIR  # the same subfolder in the launched processes
    elif checked:
        pass
    elif args.resume:
        _check_resume(cfg, args, record=False)
    else:
        check_run_folder(cfg.OUTPUT_DIR, f"OUTPUT_DIR '{cfg.OUTPUT_DIR}'",
                         hint='continue it with --resume, or give a new `OUTPUT_DIR <folder>`')
    # Every weight comes from the detector checkpoint when evaluating or resuming: do not also
    # fetch the backbone's pretrained weights (which may need the network).
    if args.eval_only or resuming:
        cfg.MODEL.TIMM.update(PRETRAINED=False, PRETRAINED_BASE=False, CHECKPOINT='')
    cfg.freeze()
    return cfg


def setup(cfg: CfgNode, args: argparse.Namespace) -> None:
    """detectron2's ``default_setup`` from its parts (loggers, environment, seeds, cudnn), with
    ``config.yaml`` written atomically: ``default_setup`` rewrites it in place (truncate, then
    write), so a kill there, also on ``--resume``, left a run without its config."""
    rank = comm.get_rank()
    if comm.is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank, name='fvcore')
    logger = setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank)
    logger.info(f'Rank of current process: {rank}. World size: {comm.get_world_size()}')
    logger.info('Environment info:\n' + collect_env_info())
    logger.info(f'Command line arguments: {args}')
    if comm.is_main_process():
        write_atomic(os.path.join(cfg.OUTPUT_DIR, 'config.yaml'), cfg.dump())
        logger.info(f'Running with full config:\n{cfg.dump()}')
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)  # each process its own, deterministic seed
    if not args.eval_only:
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK


def main(args: argparse.Namespace) -> Optional[Dict]:
    """Train (``trainer.train()``) or evaluate (``--eval-only``) in one process; returns the evaluation results."""
    cfg = build_config(args)
    if args.resume and not args.eval_only and comm.is_main_process():
        _check_resume(cfg, args, record=True)  # before setup writes config.yaml anew
    setup(cfg, args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def run(args: argparse.Namespace) -> Optional[Dict]:
    """:func:`main` in every process (detectron2's ``launch``); bad input fails first, before any process
    starts. Returns the results of a single-process run (``launch`` would drop them)."""
    build_config(args)
    if args.num_gpus * args.num_machines == 1:
        return main(args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
    return None


def cli(argv: Optional[List[str]] = None) -> int:
    args = build_argument_parser().parse_args(argv)
    print('Command Line Args:', args)
    try:
        run(args)
    except USER_ERRORS as err:  # one line; in the single-process case also for weights refused while loading
        print(f'error: {err.args[0] if isinstance(err, KeyError) and err.args else err}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(cli())

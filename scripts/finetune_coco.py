#!/usr/bin/env python
"""Fine-tune a detector of the config grid on a COCO-format dataset and report its AP.

    python scripts/finetune_coco.py --train-json train.json --train-images images/ \\
        --val-json val.json --val-images images/ [--boxes-only] [--max-iter 1000] [KEY VALUE ...]

The datasets are registered as with ``train_net.py --coco-dataset``; the number of classes is read
from the training json; ``--boxes-only`` (or a json without segmentations) turns the Mask R-CNN
config into Faster R-CNN (``MODEL.MASK_ON False``). The default config is the demo's, sized for a
CPU (random initialisation, trainable BatchNorm); ``MODEL.TIMM.NAME`` picks another backbone, and
trailing ``KEY VALUE`` pairs override anything, e.g. ``MODEL.TIMM.CHECKPOINT weights.safetensors
MODEL.TIMM.NORM FrozenBN`` to start from pretrained backbone weights. After ``--max-iter``
iterations the validation AP is printed and written to ``<output-dir>/results.json`` with the
settings that produced it.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, 'configs', 'demo', 'mask_rcnn_resnet18_mscsa_fine_fpn_demo.yaml')


def _mask_format(json_file: str):
    """detectron2's INPUT.MASK_FORMAT for the json's masks: 'bitmask' for RLE, 'polygon' for
    polygons, None without masks."""
    with open(json_file) as f:
        segmentations = [a.get('segmentation') for a in json.load(f).get('annotations', [])]
    segmentations = [s for s in segmentations if s]
    if not segmentations:
        return None
    return 'bitmask' if any(isinstance(s, dict) for s in segmentations) else 'polygon'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--train-json', required=True)
    parser.add_argument('--train-images', required=True)
    parser.add_argument('--val-json', required=True)
    parser.add_argument('--val-images', required=True)
    parser.add_argument('--config-file', default=DEFAULT_CONFIG)
    parser.add_argument('--boxes-only', action='store_true', help='train Faster R-CNN (no masks)')
    parser.add_argument('--output-dir', default=os.path.join('output', 'finetune'))
    parser.add_argument('--max-iter', type=int, default=1000)
    parser.add_argument('--image-size', type=int, default=400, help='shorter image side')
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--fpn-channels', type=int, default=128, help='FPN and head width')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('opts', nargs=argparse.REMAINDER, help='KEY VALUE config overrides')
    args = parser.parse_args(argv)

    import detectron2_ext
    from detectron2_ext.config_file import load_config
    from detectron2.data import MetadataCatalog
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.logger import setup_logger
    from detectron2_ext.data import register_coco_instances_dataset
    from detectron2_ext.engine import Trainer
    from maformer_zoo.training.run_folder import check_run_folder
    from maformer_zoo.utils.atomic import write_atomic

    register_coco_instances_dataset('finetune_train', args.train_json, args.train_images)
    register_coco_instances_dataset('finetune_val', args.val_json, args.val_images)
    num_classes = len(MetadataCatalog.get('finetune_train').thing_classes)
    mask_format = None if args.boxes_only else _mask_format(args.train_json)
    masks = mask_format is not None
    out = os.path.abspath(args.output_dir)
    size, width = args.image_size, args.fpn_channels
    cfg = load_config(args.config_file)  # safe YAML, keys checked
    cfg.merge_from_list([
        'DATASETS.TRAIN', '("finetune_train",)', 'DATASETS.TEST', '("finetune_val",)',
        'MODEL.ROI_HEADS.NUM_CLASSES', num_classes, 'OUTPUT_DIR', out, 'SEED', args.seed,
        'MODEL.MASK_ON', masks, 'INPUT.MASK_FORMAT', mask_format or 'polygon',
        'INPUT.MIN_SIZE_TRAIN', f'({size},)', 'INPUT.MAX_SIZE_TRAIN', 4 * size,
        'INPUT.MIN_SIZE_TEST', size, 'INPUT.MAX_SIZE_TEST', 4 * size,
        'SOLVER.IMS_PER_BATCH', args.batch_size, 'SOLVER.BASE_LR', args.lr,
        'SOLVER.MAX_ITER', args.max_iter, 'SOLVER.STEPS', '()',  # constant after the warm-up
        'SOLVER.WARMUP_ITERS', min(cfg.SOLVER.WARMUP_ITERS, args.max_iter),
        'MODEL.FPN.OUT_CHANNELS', width, 'MODEL.ROI_BOX_HEAD.FC_DIM', 4 * width,
        'MODEL.ROI_MASK_HEAD.CONV_DIM', width,
    ] + args.opts)
    cfg.freeze()
    try:  # never into (or over) another run
        for folder in {out, cfg.OUTPUT_DIR}:
            check_run_folder(folder, f"'{folder}'", hint='give a new --output-dir')
    except FileExistsError as err:
        print(f'[finetune] error: {err}', file=sys.stderr)
        return 2
    setup_logger(out, name='detectron2', configure_stdout=False)  # the log goes to log.txt
    seed_all_rng(cfg.SEED)

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    detector = 'Mask R-CNN' if masks else 'Faster R-CNN'
    print(f'[finetune] {detector}, {cfg.MODEL.TIMM.NAME} ({cfg.MODEL.BACKBONE.NAME}), '
          f'{num_classes} classes, {args.max_iter} iterations', flush=True)
    start = time.perf_counter()
    results = trainer.train()
    iterations = cfg.SOLVER.MAX_ITER
    minutes = (time.perf_counter() - start) / 60

    report = dict(
        results=results, iterations=iterations, minutes_including_eval=round(minutes, 2),
        images_per_batch=args.batch_size, image_size=args.image_size, detector=detector,
        config_file=os.path.relpath(args.config_file, ROOT), backbone=cfg.MODEL.TIMM.NAME,
        train_json=os.path.abspath(args.train_json), val_json=os.path.abspath(args.val_json),
        pretrained=bool(cfg.MODEL.TIMM.PRETRAINED or cfg.MODEL.TIMM.CHECKPOINT), opts=args.opts,
    )
    write_atomic(os.path.join(out, 'results.json'), json.dumps(report, indent=2))
    print(f'[finetune] {iterations} iterations in {minutes:.1f} min (with evaluation)')
    for task in ('bbox', 'segm'):
        if task in results:
            r = results[task]
            print(f'[finetune] {task:4s} AP {r["AP"]:5.1f}  AP50 {r["AP50"]:5.1f}  '
                  f'AP75 {r["AP75"]:5.1f}  APs {r["APs"]:5.1f}  APm {r["APm"]:5.1f}')
    print(f'[finetune] results: {os.path.join(out, "results.json")}; '
          f'log: {os.path.join(out, "log.txt")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

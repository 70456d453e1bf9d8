#!/usr/bin/env python
"""Fine-tune a detector of the config grid on a COCO-format dataset and report its AP.

    python scripts/finetune_coco.py --train-json train.json --train-images images/ \\
        --val-json val.json --val-images images/ [--boxes-only] [--max-iter 1000] [train_net.py's flags] [KEY VALUE ...]

scripts/train_net.py (same flags and ``KEY VALUE`` pairs) with both datasets registered, the class count
from the training json, Faster R-CNN for ``--boxes-only`` or a json without masks, and CPU-sized defaults
(the demo's config). The final AP is printed and written to ``<output-dir>/results.json`` with its settings.
"""
import json
import os
import sys
import time

import train_net  # scripts/train_net.py: the folder of the script run is first on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, 'configs', 'demo', 'mask_rcnn_resnet18_mscsa_fine_fpn_demo.yaml')


def build_argument_parser():
    parser = train_net.build_argument_parser()
    parser.description = __doc__.split('\n\n')[0]
    parser.set_defaults(config_file=DEFAULT_CONFIG)
    parser.add_argument('--train-json', required=True)
    parser.add_argument('--train-images', required=True)
    parser.add_argument('--val-json', required=True)
    parser.add_argument('--val-images', required=True)
    parser.add_argument('--boxes-only', action='store_true', help='train Faster R-CNN (no masks)')
    parser.add_argument('--output-dir', default=os.path.join('output', 'finetune'))
    parser.add_argument('--max-iter', type=int, default=1000)
    parser.add_argument('--image-size', type=int, default=400, help='shorter image side')
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--fpn-channels', type=int, default=128, help='FPN and head width')
    parser.add_argument('--seed', type=int, default=0)
    return parser


def finetune_opts(args) -> list:
    """train_net's dataset flags and ``KEY VALUE`` overrides for ``args`` (before the user's own)."""
    from detectron2.data import MetadataCatalog
    from detectron2_ext.config_file import load_config
    from detectron2_ext.data import register_coco_instances_dataset
    register_coco_instances_dataset('finetune_train', args.train_json, args.train_images)  # checked, one-line errors
    args.coco_dataset += [['finetune_train', args.train_json, args.train_images],
                          ['finetune_val', args.val_json, args.val_images]]
    meta = MetadataCatalog.get('finetune_train')
    masks = not args.boxes_only and bool(meta.get('mask_formats', ()))
    size, width = args.image_size, args.fpn_channels
    return [
        'DATASETS.TRAIN', '("finetune_train",)', 'DATASETS.TEST', '("finetune_val",)',
        'MODEL.ROI_HEADS.NUM_CLASSES', len(meta.thing_classes), 'OUTPUT_DIR', os.path.abspath(args.output_dir),
        'SEED', args.seed, 'MODEL.MASK_ON', masks,
        'INPUT.MASK_FORMAT', 'bitmask' if 'rle' in meta.get('mask_formats', ()) else 'polygon',
        'INPUT.MIN_SIZE_TRAIN', f'({size},)', 'INPUT.MAX_SIZE_TRAIN', 4 * size,
        'INPUT.MIN_SIZE_TEST', size, 'INPUT.MAX_SIZE_TEST', 4 * size,
        'SOLVER.IMS_PER_BATCH', args.batch_size, 'SOLVER.BASE_LR', args.lr,
        'SOLVER.MAX_ITER', args.max_iter, 'SOLVER.STEPS', '()',  # constant after the warm-up
        'SOLVER.WARMUP_ITERS', min(load_config(args.config_file).SOLVER.WARMUP_ITERS, args.max_iter),
        'MODEL.FPN.OUT_CHANNELS', width, 'MODEL.ROI_BOX_HEAD.FC_DIM', 4 * width, 'MODEL.ROI_MASK_HEAD.CONV_DIM', width,
    ]


def main(argv=None) -> int:
    args = build_argument_parser().parse_args(argv)
    user_opts = list(args.opts)
    try:
        args.opts = [str(v) for v in finetune_opts(args)] + user_opts
        cfg = train_net.build_config(args)
        detector = 'Mask R-CNN' if cfg.MODEL.MASK_ON else 'Faster R-CNN'
        print(f'[finetune] {detector}, {cfg.MODEL.TIMM.NAME} ({cfg.MODEL.BACKBONE.NAME}), '
              f'{cfg.MODEL.ROI_HEADS.NUM_CLASSES} classes, {cfg.SOLVER.MAX_ITER} iterations', flush=True)
        start = time.perf_counter()
        results = train_net.run(args)
    except train_net.USER_ERRORS as err:
        print(f'[finetune] error: {err}', file=sys.stderr)
        return 2
    minutes = (time.perf_counter() - start) / 60
    report = dict(
        results=results, iterations=cfg.SOLVER.MAX_ITER, minutes_including_eval=round(minutes, 2),
        images_per_batch=cfg.SOLVER.IMS_PER_BATCH, image_size=args.image_size, detector=detector,
        config_file=os.path.relpath(args.config_file, ROOT), backbone=cfg.MODEL.TIMM.NAME,
        train_json=os.path.abspath(args.train_json), val_json=os.path.abspath(args.val_json),
        pretrained=bool(cfg.MODEL.TIMM.PRETRAINED or cfg.MODEL.TIMM.CHECKPOINT), opts=user_opts,
    )
    from maformer_zoo.utils.atomic import write_atomic
    path = os.path.join(cfg.OUTPUT_DIR, 'results.json')
    write_atomic(path, json.dumps(report, indent=2))
    print(f'[finetune] {cfg.SOLVER.MAX_ITER} iterations in {minutes:.1f} min (with evaluation)')
    for task, r in (results or {}).items():
        if task in ('bbox', 'segm'):
            print(f'[finetune] {task:4s} AP {r["AP"]:5.1f}  AP50 {r["AP50"]:5.1f}  '
                  f'AP75 {r["AP75"]:5.1f}  APs {r["APs"]:5.1f}  APm {r["APm"]:5.1f}')
    print(f'[finetune] results: {path}; log: {os.path.join(cfg.OUTPUT_DIR, "log.txt")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

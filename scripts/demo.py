#!/usr/bin/env python
"""`make demo`: train Mask R-CNN with an MSCSA backbone and FINE-FPN on generated scenes, on the CPU.

What it does, with nothing downloaded:

1. writes a small COCO-format dataset of procedural scenes (``detectron2_ext.data``);
2. trains ``configs/COCO-InstanceSegmentation/mask_rcnn_<backbone>_<neck>_1x.yaml`` on it from
   random initialisation, shrunk for a CPU by ``detectron2_ext.engine.small_run_opts``, until
   ``--max-iter`` iterations or ``--minutes`` minutes, whichever comes first;
3. evaluates box and mask AP on the validation split (detectron2's ``COCOEvaluator``);
4. draws ground truth and predictions of a few validation images (detectron2's ``Visualizer``);
5. prints where everything went.

The same run from the command line would be ``scripts/train_net.py --config-file ... --coco-dataset
...``; the demo calls the same library code (``detectron2_ext.engine``).
"""
import argparse
import contextlib
import io
import os
import sys
import time

import numpy as np
import torch

DEFAULT_OUTPUT = os.path.join('output', 'demo')


def _draw_predictions(cfg, model, dataset_name: str, path: str, num_images: int,
                      score_threshold: float) -> None:
    """A grid: one row per image, ground truth left, predictions right."""
    from PIL import Image
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import ColorMode, Visualizer

    metadata = MetadataCatalog.get(dataset_name)
    rows = []
    model.eval()
    for record in DatasetCatalog.get(dataset_name)[:num_images]:
        image = read_image(record['file_name'], format='RGB')
        model_input = image if cfg.INPUT.FORMAT == 'RGB' else image[:, :, ::-1]
        with torch.no_grad():
            instances = model([{'image': torch.as_tensor(model_input.transpose(2, 0, 1).copy()),
                                'height': image.shape[0], 'width': image.shape[1]}])[0]['instances']
        instances = instances.to('cpu')
        instances = instances[instances.scores >= score_threshold]
        truth = Visualizer(image, metadata, scale=2.0).draw_dataset_dict(record).get_image()
        pred = Visualizer(image, metadata, scale=2.0, instance_mode=ColorMode.IMAGE) \
            .draw_instance_predictions(instances).get_image()
        gap = np.full((truth.shape[0], 8, 3), 255, dtype=np.uint8)
        rows.append(np.concatenate([truth, gap, pred], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def _setup(config_file: str, opts: list):
    """The config (safe YAML, keys checked) after detectron2's ``default_setup`` (logging, seed, config.yaml)."""
    from detectron2.engine import default_setup
    from detectron2_ext.config_file import load_config
    cfg = load_config(config_file, opts)
    cfg.freeze()
    default_setup(cfg, argparse.Namespace(config_file=config_file, eval_only=False))
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--output-dir', default=DEFAULT_OUTPUT)
    parser.add_argument('--backbone', default='resnet18_mscsa', help='MODEL.TIMM.NAME of the grid')
    parser.add_argument('--neck', default='fine_fpn', choices=['fpn', 'fine_fpn', 'asff_fpn'])
    parser.add_argument('--max-iter', type=int, default=2000)
    parser.add_argument('--minutes', type=float, default=4.0, help='training time budget')
    parser.add_argument('--num-train', type=int, default=96)
    parser.add_argument('--num-val', type=int, default=24)
    parser.add_argument('--image-size', type=int, default=128, help='shorter image side')
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    try:
        import detectron2_ext  # noqa: F401
    except ImportError as err:
        print(f'[demo] needs detectron2: {err}')
        return 1
    from detectron2_ext.data import register_synthetic_dataset, write_synthetic_coco
    from detectron2_ext.engine import (
        Trainer, small_run_opts, train_within_budget,
    )

    out = os.path.abspath(args.output_dir)
    data_root = os.path.join(out, 'data')
    height = args.image_size
    size = (height, height * 5 // 4)
    for split, count in (('train', args.num_train), ('val', args.num_val)):
        write_synthetic_coco(data_root, num_images=count, image_size=size, seed=args.seed,
                             split=split)
    register_synthetic_dataset('demo_train', data_root, 'train')
    register_synthetic_dataset('demo_val', data_root, 'val')
    print(f'[demo] wrote {args.num_train} + {args.num_val} scenes ({size[0]}x{size[1]}) to '
          f'{data_root}')

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                          'COCO-InstanceSegmentation',
                          f'mask_rcnn_{args.backbone}_{args.neck}_1x.yaml')
    opts = small_run_opts('demo_train', 'demo_val', 3, os.path.join(out, 'model'),
                          max_iter=args.max_iter, image_size=args.image_size,
                          ims_per_batch=args.batch_size, base_lr=args.lr, seed=args.seed)
    # detectron2's console log (environment, full config, per-iteration metrics) goes to
    # log.txt only: its console handler is created inside setup() on the stdout in place then.
    with contextlib.redirect_stdout(io.StringIO()):
        cfg = _setup(config, opts)

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    params = sum(p.numel() for p in trainer.model.parameters())
    print(f'[demo] Mask R-CNN, {args.backbone} + {args.neck}: {params / 1e6:.1f}M parameters; '
          f'training for up to {args.max_iter} iterations or {args.minutes:g} minutes')
    train_start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        results, iterations = train_within_budget(trainer, args.minutes)
    train_time = time.perf_counter() - train_start
    print(f'[demo] trained {iterations} iterations ({args.batch_size} images each) in '
          f'{train_time / 60:.1f} min, {train_time / max(iterations, 1):.2f} s/iteration '
          f'(including the evaluation)')

    picture = os.path.join(out, 'predictions.png')
    _draw_predictions(cfg, trainer.model, 'demo_val', picture, num_images=4, score_threshold=0.5)

    box, mask = results['bbox'], results['segm']
    print('[demo] validation AP (COCO, %):')
    print(f'         box  AP {box["AP"]:5.1f}   AP50 {box["AP50"]:5.1f}   AP75 {box["AP75"]:5.1f}')
    print(f'         mask AP {mask["AP"]:5.1f}   AP50 {mask["AP50"]:5.1f}   AP75 {mask["AP75"]:5.1f}')
    print('[demo] outputs:')
    print(f'         dataset      {data_root}/{{train,val}}/ (images, instances.json, panoptic)')
    print(f'         config       {os.path.join(cfg.OUTPUT_DIR, "config.yaml")}')
    print(f'         checkpoint   {os.path.join(cfg.OUTPUT_DIR, "model_final.pth")}')
    print(f'         metrics      {os.path.join(cfg.OUTPUT_DIR, "metrics.json")}')
    print(f'         log          {os.path.join(cfg.OUTPUT_DIR, "log.txt")}')
    print(f'         predictions  {picture} (left: ground truth, right: predictions >= 0.5)')
    print(f'[demo] done in {(time.perf_counter() - started) / 60:.1f} min')
    return 0


if __name__ == '__main__':
    sys.exit(main())

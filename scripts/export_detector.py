#!/usr/bin/env python
"""Export a detector (Mask / Cascade Mask R-CNN, Panoptic FPN, Semantic FPN / UPerNet, RetinaNet)
to TorchScript or ONNX as detectron2's ``tools/deploy/export_model.py``, then print its largest
difference to eager on the sample and a second size. Logic: :mod:`detectron2_ext.export`; details:
docs/detectron2.md#deploying-detectors-scriptsexport_detectorpy-detectron2_extexportpy.

    python scripts/export_detector.py --config-file CFG --weights model_final.pth \\
        --format torchscript --export-method tracing --sample-image img.jpg --output out/ts \\
        [KEY VALUE ...]
"""
import argparse
import os
import sys
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model

import detectron2_ext  # noqa: F401  (registers our timm models, backbones and heads)
from detectron2_ext.checkpoint import SafeDetectionCheckpointer
from detectron2_ext.config_file import load_config
from detectron2_ext.export import FORMATS, METHODS, check_exportable, check_output_dir, export_detector, \
    max_difference


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config-file', required=True, metavar='FILE', help='detectron2 config')
    parser.add_argument('--weights', default='', help='checkpoint (.pth / .pkl; empty: MODEL.WEIGHTS)')
    parser.add_argument('--format', choices=FORMATS, default='torchscript')
    parser.add_argument('--export-method', choices=METHODS, default='tracing')
    parser.add_argument('--sample-image', required=True, metavar='IMG',
                        help='image the export is traced and checked on')
    parser.add_argument('--output', required=True, metavar='DIR', help='new or empty folder')
    parser.add_argument('--opset', type=int, default=17, help='ONNX opset (FINE needs >= 14)')
    parser.add_argument('--tolerance', type=float, default=1e-3,
                        help='exit 1 when the largest difference to eager exceeds this')
    parser.add_argument('opts', nargs=argparse.REMAINDER, metavar='KEY VALUE',
                        help='config overrides')
    return parser.parse_args(argv)


def build_detector(config_file: str, weights: str = '', opts: Sequence[str] = ()):
    """``(cfg, model)``: the config read as safe YAML with ``opts``, ``build_model`` in eval mode, and
    ``weights`` (else ``MODEL.WEIGHTS``; none: as built) read by ``SafeDetectionCheckpointer``."""
    cfg = load_config(config_file, opts)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.freeze()
    weights = weights or cfg.MODEL.WEIGHTS
    # detectron2's checkpointer would start from scratch on a missing file, with a log line only
    if weights and '://' not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"Weights '{weights}' are not a file; give a checkpoint path.")
    model = build_model(cfg).eval()
    if weights:
        SafeDetectionCheckpointer(model).load(weights)
    return cfg, model


def load_sample(cfg, image_path: str) -> torch.Tensor:
    """The sample as the model's ``(3, H, W)`` float input, resized as ``DefaultPredictor`` does."""
    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"--sample-image '{image_path}' is not a file; give an image path.")
    image = detection_utils.read_image(image_path, format=cfg.INPUT.FORMAT)
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = aug.get_transform(image).apply_image(image)
    return torch.as_tensor(np.ascontiguousarray(image.astype('float32').transpose(2, 0, 1)))


def resize_sample(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The sample at another size (bilinear), to check an export at."""
    return F.interpolate(image[None], size=(height, width), mode='bilinear', align_corners=False)[0]


@torch.no_grad()  # scoped: main() is also called in-process (tests)
def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # bad input: one line that says what to do
        check_output_dir(args.output)
        cfg, model = build_detector(args.config_file, args.weights, args.opts)
        image = load_sample(cfg, args.sample_image)
        check_exportable(model, args.format, args.export_method)
    except (FileExistsError, FileNotFoundError, KeyError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    exported = export_detector(model, image, args.output, fmt=args.format,
                               method=args.export_method, opset=args.opset)
    print(f'exported {type(model).__name__} to {exported.path}')
    worst = 0.0
    # the second size: another aspect ratio and, after detectron2's padding, another padded size
    h, w = image.shape[-2:]
    for x in (image, resize_sample(image, max(32, h * 3 // 4), max(32, w * 5 // 6))):
        diff = max_difference(exported, x)
        worst = max(worst, diff)
        print(f'max |exported - eager| at {x.shape[-2]}x{x.shape[-1]}: {diff:.3g}')
    if worst > args.tolerance:
        print(f'error: the exported model differs from eager by {worst:.3g} > --tolerance '
              f'{args.tolerance:g}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())

#!/usr/bin/env python
"""Export a detector (Mask / Cascade Mask R-CNN, Panoptic FPN, Semantic FPN / UPerNet, RetinaNet)
with any of our backbones and necks to TorchScript or ONNX, the command line of detectron2's
``tools/deploy/export_model.py``; then check the exported model against eager on the sample and
on a second size and print the largest difference. Logic: :mod:`detectron2_ext.export`; formats
and architectures: docs/detectron2.md#deploying-detectors-scriptsexport_detectorpy-detectron2_extexportpy.

    python scripts/export_detector.py --config-file CFG --weights model_final.pth \\
        --format torchscript --export-method tracing --sample-image img.jpg --output out/ts \\
        [KEY VALUE ...]
"""
import argparse
import sys

import torch

import maformer_zoo  # noqa: F401  (registers our timm models)
import detectron2_ext  # noqa: F401  (registers our backbones and heads)
from detectron2_ext.export import (
    FORMATS, METHODS, OutputFolderError, build_detector, check_exportable, check_output_dir,
    export_detector,
    load_sample, max_difference, resize_sample, second_size,
)


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


def main(argv=None) -> int:
    with torch.no_grad():  # scoped: main() is also called in-process (tests)
        return _export(parse_args(argv))


def _export(args: argparse.Namespace) -> int:
    try:  # bad input: one line that says what to do
        check_output_dir(args.output)
        cfg, model = build_detector(args.config_file, args.weights, args.opts)
        image = load_sample(cfg, args.sample_image)
        check_exportable(model, args.format, args.export_method)
    except (OutputFolderError, FileNotFoundError, KeyError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    exported = export_detector(model, image, args.output, fmt=args.format,
                               method=args.export_method, opset=args.opset)
    print(f'exported {type(model).__name__} to {exported.path}')
    worst = 0.0
    for x in (image, resize_sample(image, *second_size(image))):
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

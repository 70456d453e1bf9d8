#!/usr/bin/env python
"""Draw what the fusion modules of a model do, as PNG files (docs/segmentation.md#scriptsvisualizepy).

    scripts/visualize.py --config-file configs/ADE20K-SemanticSegmentation/semantic_fpn_maformer_s_fine_fpn_80k.yaml \
        [--weights output/model_final.pth] --input photo.jpg [more.jpg ...] --output figures/ [KEY VALUE ...]
    scripts/visualize.py --model maformer_s [--weights maformer_s.safetensors] --input photo.jpg --output figures/

Writes ``fine_*.png`` (FINE neck), ``asff_weights.png`` (ASFF neck), ``maf_attention.png``
(MAFormer), ``mscsa_*.png`` (MSCSA) and ``erf.png``, whichever the model allows. Without
``--weights`` the weights are random (no pretrained weights are fetched unless an override asks).
"""
import argparse
import os
import sys
import warnings

import numpy as np
import torch
from PIL import Image

from maformer_zoo.errors import (  # importing maformer_zoo registers our timm models
    CheckpointMismatchError, CorruptCheckpointError, PretrainedWeightsNotFoundError, UnsafeCheckpointError,
)

# detectron2 scripts a few helpers when it is imported (the figures live in detectron2_ext); torch's
# deprecation notice for that is not this command's output
warnings.filterwarnings('ignore', category=FutureWarning, module=r'torch\.jit\._script')


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--config-file', metavar='CFG', help='a detectron2 config of ours')
    source.add_argument('--model', metavar='NAME', help='a timm model name of ours (backbone maps only)')
    parser.add_argument('--weights', metavar='FILE', default='',
                        help='weights: a detectron2 / timm checkpoint, a state dict or .safetensors (no code is run)')
    parser.add_argument('--input', metavar='IMAGE', nargs='+', required=True,
                        help='image(s); maps are drawn over the first, the ERF averages all')
    parser.add_argument('--output', metavar='DIR', required=True, help='output directory')
    parser.add_argument('--size', type=int, default=0,
                        help='shorter side of the drawn image (default: 512 for configs, 256 for --model)')
    parser.add_argument('--no-erf', action='store_true', help='skip the effective receptive field')
    parser.add_argument('opts', nargs=argparse.REMAINDER, metavar='KEY VALUE',
                        help='config overrides (with --config-file)')
    return parser


def _fail(message: str) -> None:
    print(f'visualize.py: error: {message}', file=sys.stderr)
    sys.exit(2)


def _load_weights(model: torch.nn.Module, path: str) -> None:
    """Load a detectron2 checkpoint, a timm / our checkpoint or a state dict, read by the one weight
    reader (safetensors, torch.load(weights_only=True), numpy-only pickles; any file name)."""
    from maformer_zoo.weights import read_state_dict
    try:
        state = read_state_dict(path)[0]
    except (CorruptCheckpointError, PretrainedWeightsNotFoundError, UnsafeCheckpointError) as err:
        _fail(f'--weights: {err}')
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        _fail(f"--weights '{path}' does not fit the model: {len(result.missing_keys)} missing keys "
              f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected (e.g. "
              f"{result.unexpected_keys[:2]}). Pass the config or --model it was trained with.")


def _detectron2_model(args):
    from detectron2.modeling import build_model
    from detectron2_ext.config_file import UnsafeConfigError, load_config

    if not os.path.isfile(args.config_file):
        _fail(f"--config-file '{args.config_file}' does not exist.")
    # random weights unless --weights (or an override) says otherwise
    opts = ['MODEL.TIMM.PRETRAINED', 'False', 'MODEL.WEIGHTS', ''] + list(args.opts)
    try:
        cfg = load_config(args.config_file, opts)  # safe YAML
    except (ValueError, KeyError, FileNotFoundError, UnsafeConfigError) as err:
        _fail(str(err.args[0]) if err.args else str(err))
    if cfg.MODEL.DEVICE.startswith('cuda') and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = 'cpu'
    cfg.freeze()
    try:  # MODEL.TIMM.CHECKPOINT is read while building
        model = build_model(cfg)
    except (CheckpointMismatchError, CorruptCheckpointError, PretrainedWeightsNotFoundError,
            UnsafeCheckpointError) as err:
        _fail(str(err).splitlines()[0])
    if args.weights:
        _load_weights(model, args.weights)
    return model.eval(), cfg


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.model and args.opts:
        _fail(f'KEY VALUE overrides ({args.opts[:2]} ...) need --config-file, not --model.')
    from maformer_zoo.training.run_folder import check_run_folder
    try:  # figures never go into (or over) a run's folder
        check_run_folder(args.output, f"--output '{args.output}'", hint='give another --output folder')
    except FileExistsError as err:
        _fail(str(err))
    for path in args.input:
        if not os.path.isfile(path):
            _fail(f"--input '{path}' does not exist.")
    images = [np.asarray(Image.open(p).convert('RGB')) for p in args.input]
    if args.model:
        import timm
        from detectron2_ext.visualize import draw_timm_model
        if not timm.is_model(args.model):
            _fail(f"--model {args.model!r} is not a timm model name (see maformer_zoo.list_models()).")
        model = timm.create_model(args.model, pretrained=False)
        if args.weights:
            _load_weights(model, args.weights)
        paths = draw_timm_model(model.eval(), images, args.output, size=args.size or 256,
                                erf=not args.no_erf)
    else:
        from detectron2_ext.visualize import draw_detectron2_model
        model, cfg = _detectron2_model(args)
        paths = draw_detectron2_model(model, images, args.output, input_format=cfg.INPUT.FORMAT,
                                      size=args.size or 512, erf=not args.no_erf)
    if not paths:
        print('The model has no FINE, ASFF, MAF or MSCSA module; nothing but the ERF to draw.')
    for path in paths:
        print(path)
    return 0


if __name__ == '__main__':
    sys.exit(main())

#!/usr/bin/env python
"""FLOPs of the semantic segmentation configs counted two ways, and their parameters.

* ``fvcore``: :func:`maformer_zoo.utils.flops.count_flops` (what every other number of this zoo
  uses): traced operators, one multiply-add = one flop, attention matmuls included (our handle for
  ``scaled_dot_product_attention``, and fvcore's for ``matmul`` / ``einsum``).
* ``mmcv``: what mmcv's ``get_model_complexity_info`` (mmsegmentation's ``tools/get_flops.py``)
  counts: forward hooks on modules only. Conv (multiply-adds + bias), Linear (multiply-adds),
  BatchNorm / GroupNorm / LayerNorm (elements, x2 with affine), ReLU modules (elements; also the
  ReLU inside detectron2's ``Conv2d(activation=F.relu)``, which mmcv's ``ConvModule`` runs as a
  module), pooling (input elements), ``nn.Upsample`` (output elements). Functional ops (SDPA
  attention, ``@`` / ``matmul``, ``F.interpolate``, GELU, softmax) cost nothing.

Counted model: backbone + decoder up to the logits at stride 4, as mmseg's ``forward_dummy``
(no auxiliary head, no final resize); parameters: the whole model, auxiliary head included (what
mmseg's script prints). Configs that differ only in the schedule (``_40k`` / ``_80k``) are one
model. docs/segmentation.md compares the columns with MAFormer's Table 7.

Usage::

    python benchmarks/segmentation_flops.py --backbones maformer_s maformer_b --necks fpn
    python benchmarks/segmentation_flops.py --size 64 128 --json out.json   # every config, tiny
"""
import argparse
import glob
import json
import os
import re
import sys
from typing import Dict

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEMANTIC_DIR = os.path.join(ROOT, 'configs', 'ADE20K-SemanticSegmentation')


def mmcv_style_flops(model: nn.Module, x: torch.Tensor, prefix: str = '') -> Dict[str, float]:
    """GFLOPs as mmcv's module-hook counter counts one forward of ``model(x)`` (module docstring):
    ``{'total': ..., 'part': ...}``, ``part`` being the modules whose names start with ``prefix``."""
    from detectron2.layers import Conv2d as D2Conv2d

    total = [0]
    counts = {'total': 0, 'part': 0}
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
             nn.modules.instancenorm._InstanceNorm)
    pools = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
    relus = (nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6)

    def conv(module, inputs, output):
        kernel = int(np.prod(module.kernel_size))
        per_position = kernel * module.in_channels * module.out_channels // module.groups
        positions = output.shape[0] * int(np.prod(output.shape[2:]))
        flops = per_position * positions + (module.out_channels * positions if module.bias is not None else 0)
        if isinstance(module, D2Conv2d) and module.activation is not None:
            flops += output.numel()  # mmcv's ConvModule runs its ReLU as a module
        total[0] += flops

    def linear(module, inputs, output):
        total[0] += inputs[0].numel() * output.shape[-1]

    def norm(module, inputs, output):
        affine = getattr(module, 'affine', False) or getattr(module, 'elementwise_affine', False)
        total[0] += inputs[0].numel() * (2 if affine else 1)

    def elements_in(module, inputs, output):
        total[0] += inputs[0].numel()

    def elements_out(module, inputs, output):
        total[0] += output.numel()

    def attributed(hook, in_part: bool):
        def fn(module, inputs, output):
            before = total[0]
            hook(module, inputs, output)
            counts['total'] += total[0] - before
            if in_part:
                counts['part'] += total[0] - before
        return fn

    handles = []
    for name, module in model.named_modules():
        hook = (conv if isinstance(module, nn.Conv2d) else linear if isinstance(module, nn.Linear)
                else norm if isinstance(module, norms) else elements_in if isinstance(module, pools)
                else elements_out if isinstance(module, relus + (nn.Upsample,)) else None)
        if hook is not None:
            in_part = bool(prefix) and (name == prefix or name.startswith(prefix + '.'))
            handles.append(module.register_forward_hook(attributed(hook, in_part)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {k: v / 1e9 for k, v in counts.items()}


def fvcore_flops(model: nn.Module, size, prefix: str) -> Dict[str, float]:
    """GFLOPs as :func:`maformer_zoo.utils.flops.count_flops` counts them (same handles), with
    the share of the submodule ``prefix``."""
    from fvcore.nn import FlopCountAnalysis
    from maformer_zoo.utils.flops import sdpa_flop_jit
    analysis = FlopCountAnalysis(model.eval(), (torch.zeros(1, 3, *size),))
    analysis.set_op_handle('aten::scaled_dot_product_attention', sdpa_flop_jit)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings('none')
    with torch.no_grad():
        return dict(total=analysis.total() / 1e9, part=analysis.by_module()[prefix] / 1e9)


class Segmenter(nn.Module):
    """Backbone + decoder logits (stride 4) of a detectron2 ``SemanticSegmentor``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.head = model.sem_seg_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.layers(self.backbone(x))


def model_configs(backbones=None, necks=None, decoders=None) -> Dict[str, str]:
    """One config per distinct model: ``model name -> config path`` (40k preferred over 80k)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(SEMANTIC_DIR, '*.yaml'))):
        match = re.match(r'(semantic_fpn|upernet)_(.+?)_((?:fine_|asff_)?fpn)_\d+k\.yaml$',
                         os.path.basename(path))
        decoder, backbone, neck = match.groups()
        if ((backbones and backbone not in backbones) or (necks and neck not in necks)
                or (decoders and decoder not in decoders)):
            continue
        found.setdefault(f'{decoder}_{backbone}_{neck}', path)
    return found


def build(config: str):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2_ext import add_maformer_zoo_config
    cfg = add_maformer_zoo_config(get_cfg())
    cfg.merge_from_file(config)
    cfg.merge_from_list(['MODEL.TIMM.PRETRAINED', 'False', 'MODEL.DEVICE', 'cpu',
                         'MODEL.TIMM.NORM', 'BN', 'MODEL.SEM_SEG_HEAD.NORM', 'BN'])
    return build_model(cfg).eval()


def measure(config: str, size) -> Dict:
    """One row: parameters (M) and GFLOPs both ways, whole and backbone only."""
    model = build(config)
    x = torch.zeros(1, 3, *size)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    aux = getattr(model.sem_seg_head, 'aux_head', None)
    row = dict(config=os.path.basename(config), height=size[0], width=size[1],
               params_m=round(params, 2),
               aux_params_m=round(sum(p.numel() for p in aux.parameters()) / 1e6, 2) if aux else 0.0)
    segmenter = Segmenter(model)
    # the timm network: the FPN backbone's bottom_up, or UPerNet's backbone itself
    prefix = 'backbone.bottom_up' if hasattr(model.backbone, 'bottom_up') else 'backbone'
    for counter, counts in (('fvcore', fvcore_flops(segmenter, size, prefix)),
                            ('mmcv', mmcv_style_flops(segmenter, x, prefix))):
        row[f'gflops_{counter}'] = round(counts['total'], 1)
        row[f'backbone_gflops_{counter}'] = round(counts['part'], 1)
        row[f'decoder_gflops_{counter}'] = round(counts['total'] - counts['part'], 1)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', nargs=2, type=int, default=(512, 2048), metavar=('H', 'W'),
                        help="input size (default 512 2048: Table 7's 2048x512)")
    parser.add_argument('--backbones', nargs='*', help='only these backbones (timm names)')
    parser.add_argument('--necks', nargs='*', choices=('fpn', 'fine_fpn', 'asff_fpn'))
    parser.add_argument('--decoders', nargs='*', choices=('semantic_fpn', 'upernet'))
    parser.add_argument('--json', help='write the rows as a JSON list')
    args = parser.parse_args(argv)
    configs = model_configs(args.backbones, args.necks, args.decoders)
    if not configs:
        print('error: no config matches the filters', file=sys.stderr)
        return 2
    rows = []
    header = (f"{'model':58s} {'params M':>9s} {'fvcore G':>9s} {'mmcv G':>9s} "
              f"{'backbone fv/mm G':>17s} {'decoder fv/mm G':>16s}")
    print(f'input {args.size[1]}x{args.size[0]} (W x H)\n{header}')
    for name, config in configs.items():
        row = measure(config, args.size)
        rows.append(row)
        print(f"{name:58s} {row['params_m']:9.2f} {row['gflops_fvcore']:9.1f} {row['gflops_mmcv']:9.1f} "
              f"{row['backbone_gflops_fvcore']:8.1f}/{row['backbone_gflops_mmcv']:<8.1f} "
              f"{row['decoder_gflops_fvcore']:7.1f}/{row['decoder_gflops_mmcv']:<8.1f}", flush=True)
    if args.json:
        tmp = args.json + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(rows, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())

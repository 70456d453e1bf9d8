#!/usr/bin/env python
"""Where MAFormer-S and Swin-T spend their CPU time: the op shares behind docs/maformer.md.

``torch.profiler`` over inference forwards of both models in one process, self CPU time summed
per op group (linear layers, attention, layout copies, GELU, convolutions, LayerNorm), at the two
settings of docs/maformer.md ("What bounds MAFormer-S against Swin-T on CPU"):

* ``cls``: batch 4 at 224x224, the classification model;
* ``det``: batch 1 at 800x1216, the ``features_only`` model (Swin-T built for that size).

    python benchmarks/profile_maformer.py                 # both settings, 1 thread (~2 min)
    python benchmarks/profile_maformer.py --settings det --json profile.json
    python benchmarks/profile_maformer.py --tiny          # every code path in seconds (CI)

Prints one table per setting (seconds and share of the profiled total); absolute times depend on
the machine and its load, the shares much less.
"""
import argparse
import json
import sys
from typing import Dict, List, Optional

import torch
import timm
from torch.profiler import ProfilerActivity, profile

import maformer_zoo  # noqa: F401  (registers maformer_s)

MODELS = ('maformer_s', 'swin_tiny_patch4_window7_224')
# op group -> predicate on the profiler's op name (self CPU time, so nested ops are not counted twice)
GROUPS = {
    'linear': lambda n: n in ('aten::addmm', 'aten::mm'),
    'attention': lambda n: 'scaled_dot_product' in n or 'flash_attention' in n or n in (
        'aten::bmm', 'aten::_softmax', 'aten::softmax'),
    'copy': lambda n: n == 'aten::copy_',
    'gelu': lambda n: n == 'aten::gelu',
    'convolution': lambda n: 'convolution' in n,
    'layer_norm': lambda n: n == 'aten::native_layer_norm',
}


def _build(name: str, setting: str, img_size: int):
    if setting == 'cls':  # timm's Swin is built for its input size (224: the default model)
        extra = {} if name.startswith('maformer') else {'img_size': img_size}
        return timm.create_model(name, pretrained=False, **extra).eval()
    # timm's Swin fixes its input size unless told otherwise (as benchmarks/maformer.py builds it)
    extra = {} if name.startswith('maformer') else {'strict_img_size': False}
    return timm.create_model(name, pretrained=False, features_only=True, **extra).eval()


def profile_model(model: torch.nn.Module, x: torch.Tensor, warmup: int) -> Dict[str, float]:
    """Self CPU seconds per op group (and ``total``) of one forward after ``warmup`` forwards."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    seconds = {g: 0.0 for g in GROUPS}
    total = 0.0
    for event in prof.key_averages():
        t = event.self_cpu_time_total / 1e6
        total += t
        for group, match in GROUPS.items():
            if match(event.key):
                seconds[group] += t
                break
    seconds['total'] = total
    return seconds


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--settings', nargs='+', choices=('cls', 'det'), default=['cls', 'det'])
    parser.add_argument('--batch-size', type=int, default=4, help='batch of the cls setting')
    parser.add_argument('--img-size', type=int, default=224, help='side of the cls setting')
    parser.add_argument('--det-size', type=int, nargs=2, default=(800, 1216), metavar=('H', 'W'))
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--warmup', type=int, default=1, help='untimed forwards before the profiled one')
    parser.add_argument('--json', default='', help='also write the rows to this file')
    parser.add_argument('--tiny', action='store_true',
                        help='a seconds-long run of every code path (CI): batch 1, 64x64 and 64x96, '
                             'no warm-up; the shares mean nothing')
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch_size, args.img_size, args.det_size, args.warmup = 1, 64, (64, 96), 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for setting in args.settings:
        if setting == 'cls':
            shape = (args.batch_size, 3, args.img_size, args.img_size)
        else:
            shape = (1, 3, *args.det_size)
        x = torch.randn(*shape)
        measured = {name: profile_model(_build(name, setting, args.img_size), x, args.warmup)
                    for name in MODELS}
        print(f'\n{setting}: input {list(shape)}, {args.threads} thread(s), self CPU time of one '
              f'forward (torch {torch.__version__})\n')
        print('| op group | ' + ' | '.join(MODELS) + ' |\n|---|' + '---|' * len(MODELS))
        for group in (*GROUPS, 'total'):
            cells = [f"{m[group]:.3f} s ({100 * m[group] / m['total']:.0f}%)" for m in measured.values()]
            print(f'| {group} | ' + ' | '.join(cells) + ' |')
        for name, m in measured.items():
            row = dict(benchmark='profile_maformer', setting=setting, model=name, input=list(shape),
                       threads=args.threads)
            for group, value in m.items():
                row[f'{group}_s'] = value
                if group != 'total':
                    row[f'{group}_share'] = value / m['total']
            rows.append(row)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == '__main__':
    sys.exit(0 if main() else 1)

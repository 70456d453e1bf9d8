#!/usr/bin/env python
"""Cost of FINE-FPN and ASFF-FPN against detectron2's FPN, in one run on this machine.

For Faster R-CNN R50 at 800x1333 (padded to 800x1344 as detectron2 does) this measures, for
``fpn`` (the baseline), ``fine`` (FINE-FPN, AATS as in the paper; ``fine_k4``: k = 4 instead of 8
at the stride-4 fusion; ``fine_extra``: FINE also on (P5, P6), as our R50 configs), ``fine_dense``
(FINE with token sampling off, r = k = 1: the "Vanilla" attention of the FINE paper's Table 3) and
``asff``:

* parameters of the whole model and of the neck (FPN without the ResNet);
* FLOPs with fvcore (one multiply-add = one flop, fvcore's convention), neck-only and whole
  detector. fvcore has no counter for ``scaled_dot_product_attention``; we add one
  (``B * heads * N_q * N_k * (d_qk + d_v)``) so that FINE's attention matmuls are counted;
* CPU inference latency (median of ``--repeats`` runs, variants interleaved so that load from
  other processes hits all of them alike), neck-only (bottom-up features computed once) and whole
  detector, as ratios to ``fpn`` measured in the same process;
* peak memory of one inference: the most bytes allocated and not yet freed during the forward
  pass (activations and temporaries, not the weights), replayed from the allocation events that
  torch's profiler records; exact and independent of the machine's load, unlike peak RSS.

Weights are random (``MODEL.WEIGHTS=""``): costs do not depend on them, except the ROI heads'
which see a fixed number of proposals (``POST_NMS_TOPK_TEST``) either way.

Usage::

    python benchmarks/necks.py                  # everything, ~10 min on 2 cores
    python benchmarks/necks.py --skip-dense     # without the (slow) dense attention
    python benchmarks/necks.py --variants fine asff --repeats 9
    python benchmarks/necks.py --json out.json   # rows as a JSON list of flat dicts

A progress bar (tqdm, on stderr) shows each build, FLOP count, timed run and memory replay with
an ETA.
"""
import argparse
import json
import math
import os
import statistics
import time
from typing import Dict, List

import torch
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(REPO, 'configs', 'COCO-Detection', 'faster_rcnn_R_50_fpn_1x.yaml')
VARIANTS = {
    'fpn': ['MODEL.FPN.FUSION', 'sum'],
    'fine': ['MODEL.FPN.FUSION', 'fine'],
    # the alternative for detectron2's extra stride-4 fusion: k = 4 (stride-32 tokens, as the
    # paper's two fusions) instead of our default k = 8
    'fine_k4': ['MODEL.FPN.FUSION', 'fine', 'MODEL.FINE.POOL_KERNELS', [4, 2, 1]],
    # FINE also on (P5, P6), as in configs/COCO-*/*_R_50_fine_fpn_1x.yaml: four modules
    'fine_extra': ['MODEL.FPN.FUSION', 'fine', 'MODEL.FINE.EXTRA_LEVELS', True],
    'fine_dense': ['MODEL.FPN.FUSION', 'fine', 'MODEL.FINE.RATIO', 1,
                   'MODEL.FINE.POOL_KERNELS', [1, 1, 1]],
    'asff': ['MODEL.FPN.FUSION', 'asff'],
}


def build(variant: str):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    import detectron2_ext

    cfg = get_cfg()
    detectron2_ext.add_maformer_zoo_config(cfg)
    cfg.merge_from_file(BASE_CONFIG)
    # one builder for all four, so 'fpn' runs the same code path with FINE/ASFF switched off
    cfg.merge_from_list(['MODEL.WEIGHTS', '', 'MODEL.DEVICE', 'cpu',
                         'MODEL.BACKBONE.NAME', 'build_resnet_fusion_fpn_backbone',
                         *VARIANTS[variant]])
    torch.manual_seed(0)
    return build_model(cfg).eval()


class Neck(torch.nn.Module):
    """The FPN of a FusionFPN without its bottom-up network: features dict -> pyramid list."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, *features: torch.Tensor) -> List[torch.Tensor]:
        backbone = self.backbone
        return backbone.pyramid(dict(zip(backbone.in_features, features)))


def image_input(height: int, width: int) -> List[Dict]:
    torch.manual_seed(1)
    return [{'image': torch.rand(3, height, width) * 255, 'height': height, 'width': width}]


def bottom_up_features(model, inputs) -> List[torch.Tensor]:
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        feats = model.backbone.bottom_up(images.tensor)
    return [feats[f] for f in model.backbone.in_features]


def _sdpa_flops(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def count_flops(model, inputs) -> Dict[str, float]:
    from detectron2.utils.analysis import FlopCountAnalysis
    from fvcore.nn import FlopCountAnalysis as PlainFlopCountAnalysis

    neck = Neck(model.backbone).eval()
    feats = tuple(bottom_up_features(model, inputs))
    result = {}
    for scope, analysis in [('neck', PlainFlopCountAnalysis(neck, feats)),
                            ('model', FlopCountAnalysis(model, inputs))]:
        analysis.set_op_handle('aten::scaled_dot_product_attention', _sdpa_flops)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        result[scope] = analysis.total() / 1e9
        # what fvcore (and mmcv's counter) report by default: attention matmuls not counted
        attention = analysis.by_operator().get('scaled_dot_product_attention', 0)
        result[scope + '_no_attn'] = result[scope] - attention / 1e9
    return result


def params(model) -> Dict[str, float]:
    total = sum(p.numel() for p in model.parameters())
    bottom_up = sum(p.numel() for p in model.backbone.bottom_up.parameters())
    return {'model': total / 1e6, 'neck': (total - bottom_up - sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith('backbone.'))) / 1e6}


def time_variants(models: Dict[str, torch.nn.Module], inputs, repeats: int,
                  slow: Dict[str, int], progress: tqdm) -> Dict[str, Dict[str, float]]:
    """Median and minimum seconds per forward, variants interleaved round-robin. On a shared
    machine the minimum is the least disturbed run, the median the typical one."""
    feats = {name: tuple(bottom_up_features(m, inputs)) for name, m in models.items()}
    necks = {name: Neck(m.backbone).eval() for name, m in models.items()}
    calls = {
        'neck': {n: (lambda n=n: necks[n](*feats[n])) for n in models},
        'model': {n: (lambda n=n: models[n](inputs)) for n in models},
    }
    times = {scope: {n: [] for n in models} for scope in calls}
    with torch.no_grad():
        for scope, fns in calls.items():
            for name, fn in fns.items():  # warm-up (not for the slow ones: one run is all we time)
                if name not in slow:
                    fn()
            for r in range(repeats):
                for name, fn in fns.items():
                    if r >= slow.get(name, repeats):
                        continue
                    start = time.perf_counter()
                    fn()
                    times[scope][name].append(time.perf_counter() - start)
                    progress.update()
    return {stat: {scope: {n: fn(t) for n, t in per.items()} for scope, per in times.items()}
            for stat, fn in (('median', statistics.median), ('min', min))}


def peak_memory_mb(fn) -> float:
    """Peak of the bytes allocated and not yet freed while ``fn`` runs (activations and
    temporaries; not the weights), from the allocation events of torch's profiler."""
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]'),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--height', type=int, default=800)
    parser.add_argument('--width', type=int, default=1333)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--dense-repeats', type=int, default=1,
                        help='timed runs of fine_dense (each costs tens of seconds)')
    parser.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=list(VARIANTS),
                        help='which necks to measure (fpn, the baseline, is always included)')
    parser.add_argument('--skip-dense', action='store_true', help='leave out fine_dense')
    parser.add_argument('--skip-memory', action='store_true')
    parser.add_argument('--skip-flops', action='store_true')
    parser.add_argument('--json', help='also write the results here')
    args = parser.parse_args()

    names = [n for n in VARIANTS if (n == 'fpn' or n in args.variants)
             and not (args.skip_dense and n == 'fine_dense')]
    slow = {'fine_dense': args.dense_repeats}
    timed_runs = 2 * sum(min(slow.get(n, args.repeats), args.repeats) for n in names)
    steps = len(names) * (1 + (not args.skip_flops) + (not args.skip_memory)) + timed_runs
    progress = tqdm(total=steps, desc='necks', unit='step')
    models = {}
    for n in names:
        progress.set_postfix_str(f'build {n}')
        models[n] = build(n)
        progress.update()
    inputs = image_input(args.height, args.width)
    results = {n: {'params': params(m)} for n, m in models.items()}
    for n, m in models.items():
        if not args.skip_flops:
            progress.set_postfix_str(f'FLOPs {n}')
            results[n]['gflops'] = count_flops(m, inputs)
            progress.update()
        tqdm.write(f'{n}: params {results[n]["params"]}, GFLOPs {results[n].get("gflops")}')
    progress.set_postfix_str('latency')
    latency = time_variants(models, inputs, args.repeats, slow, progress)
    for n in names:
        for stat, key in (('median', 'latency_s'), ('min', 'latency_min_s')):
            results[n][key] = {scope: latency[stat][scope][n] for scope in latency[stat]}
        if not args.skip_memory:
            model, feats = models[n], tuple(bottom_up_features(models[n], inputs))
            neck = Neck(model.backbone).eval()
            progress.set_postfix_str(f'memory {n}')
            results[n]['peak_mb'] = {'neck': peak_memory_mb(lambda: neck(*feats)),
                                     'model': peak_memory_mb(lambda: model(inputs))}
            progress.update()
    progress.close()

    base = results['fpn']
    print(f'\nFaster R-CNN R50, {args.height}x{args.width}, CPU, {torch.get_num_threads()} threads, '
          f'median of {args.repeats} (fine_dense: {args.dense_repeats}), ratios vs fpn\n')
    head = ('| neck | params (M) | neck params (M) | GFLOPs | neck GFLOPs | neck GFLOPs w/o attn '
            'matmuls | latency (s), median / min | neck latency (ms), median / min | peak mem (MB) | '
            'neck peak mem (MB) |')
    print(head)
    print('|' + '---|' * (head.count('|') - 1))
    for n in names:
        r = results[n]
        delta = lambda key, scope, fmt='{:+.2f}': (  # noqa: E731
            '' if n == 'fpn' else ' (' + fmt.format(r[key][scope] - base[key][scope]) + ')')
        ratio = lambda key, scope: (  # noqa: E731
            '' if n == 'fpn' else f' ({r[key][scope] / base[key][scope]:.3f}x)')
        mem = (f'{r["peak_mb"]["model"]:.0f}{delta("peak_mb", "model", "{:+.0f}")} | '
               f'{r["peak_mb"]["neck"]:.1f}{delta("peak_mb", "neck", "{:+.1f}")}'
               if 'peak_mb' in r else '- | -')
        flops = (f'{r["gflops"]["model"]:.1f}{delta("gflops", "model")}{ratio("gflops", "model")} | '
                 f'{r["gflops"]["neck"]:.2f}{delta("gflops", "neck")} | '
                 f'{r["gflops"]["neck_no_attn"]:.2f}{delta("gflops", "neck_no_attn")}'
                 if 'gflops' in r else '- | - | -')
        print(f'| {n} | {r["params"]["model"]:.3f}{delta("params", "model", "{:+.3f}")} | '
              f'{r["params"]["neck"]:.3f}{delta("params", "neck", "{:+.3f}")} | {flops} | '
              f'{r["latency_s"]["model"]:.2f}{ratio("latency_s", "model")} / '
              f'{r["latency_min_s"]["model"]:.2f}{ratio("latency_min_s", "model")} | '
              f'{1e3 * r["latency_s"]["neck"]:.0f}{ratio("latency_s", "neck")} / '
              f'{1e3 * r["latency_min_s"]["neck"]:.0f}{ratio("latency_min_s", "neck")} | {mem} |')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(json_rows(results, args), f, indent=2)


def json_rows(results: Dict[str, Dict], args) -> List[Dict]:
    """One flat dict per neck (the project's benchmark JSON contract): ``neck``, the run's
    settings, every measurement as ``<quantity>_<scope>`` and its ratio to ``fpn``."""
    base = results['fpn']
    rows = []
    for neck, measured in results.items():
        row = {'benchmark': 'necks', 'neck': neck, 'detector': 'faster_rcnn_R_50',
               'height': args.height, 'width': args.width, 'repeats': args.repeats,
               'threads': torch.get_num_threads()}
        for quantity, per_scope in measured.items():
            for scope, value in per_scope.items():
                row[f'{quantity}_{scope}'] = value
                reference = base.get(quantity, {}).get(scope)
                if reference:
                    row[f'{quantity}_{scope}_ratio'] = value / reference
        rows.append(row)
    return rows


if __name__ == '__main__':
    main()

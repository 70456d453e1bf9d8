#!/usr/bin/env python
"""Benchmark MAFormer-S/B/L: budgets against the paper, throughput against Swin-T, detection-size cost.

Four tables (markdown), each measured in this one run:

1. params and GFLOPs at 224x224 (fvcore, one multiply-add = one flop) against Table 1;
2. images/s at ``--batch-size`` (32) and 224x224 for every model and for the baseline
   (timm's ``swin_tiny_patch4_window7_224``, the same 4.5 GFLOPs class), timed round-robin so the
   models share the machine's state, and each model's ratio to the baseline;
3. images/s of a ``features_only`` forward (batch 1) at ``--det-size`` (800x1216), the detection
   backbone's work, against the same baseline (built with ``strict_img_size=False``), timed the same way;
4. peak memory of a ``features_only`` forward (batch 1, inference) at ``--det-size`` (800x1216), each
   model in a fresh subprocess (CUDA: ``max_memory_allocated``; CPU: growth of the process's peak
   resident set during the forward, via ``/proc/self/clear_refs``);
5. backbone GFLOPs at ``--flops-size`` (800x1280, the size of the paper's Table 5) against the
   linear extrapolation of the 224x224 count, and with ``--mask-rcnn`` the whole Mask R-CNN of
   ``configs/COCO-InstanceSegmentation/mask_rcnn_<model>_fpn_1x.yaml`` against Table 5.

Examples::

    python benchmarks/maformer.py                      # full run
    python benchmarks/maformer.py --iters 2 --warmup 1 # quick CPU run
    python benchmarks/maformer.py --device cuda --amp --iters 50 --warmup 10
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

TABLE1 = {'maformer_s': (23, 4.5), 'maformer_b': (53, 9.8), 'maformer_l': (104, 22.6)}
TABLE5_MASK_RCNN_GFLOPS = {'maformer_s': 256, 'maformer_b': 354, 'maformer_l': 609}


def _create(name: str, **kwargs) -> torch.nn.Module:
    import timm
    import maformer_zoo  # noqa: F401  (registers the models)
    return timm.create_model(name, **kwargs)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def throughput(names: List[str], device: torch.device, batch_size: int, size: Tuple[int, int], warmup: int,
               iters: int, amp: bool, features_only: bool = False) -> Dict[str, float]:
    """Median images/s over ``iters`` round-robin timings of one batch per model."""
    def build(name: str) -> torch.nn.Module:
        if not features_only:
            return _create(name)
        # timm's Swin fixes its input size unless told otherwise; the zoo's models take any size
        return _create(name, features_only=True, **(dict(strict_img_size=False) if name.startswith('swin') else {}))

    models = {n: build(n).eval().to(device) for n in names}
    x = torch.randn(batch_size, 3, *size, device=device)
    times: Dict[str, List[float]] = {n: [] for n in names}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    with torch.inference_mode(), autocast:
        for step in tqdm(range(warmup + iters), desc='throughput rounds', unit='round'):
            for name, model in models.items():
                _sync(device)
                start = time.perf_counter()
                model(x)
                _sync(device)
                if step >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {n: batch_size / statistics.median(t) for n, t in times.items()}


def _print_speed(ips: Dict[str, float], baseline: str, column: str) -> None:
    print(f'| model | {column} | ratio to {baseline} |')
    print('|---|---|---|')
    for n, v in ips.items():
        print(f'| {n} | {v:.3g} | {v / ips[baseline]:.2f} |')
    print()


def _read_status(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f'{field} not in /proc/self/status')


def _memory_child(name: str, size: List[int], device: torch.device, amp: bool) -> None:
    """Runs in a fresh process: print the peak extra memory of one features_only forward."""
    model = _create(name, features_only=True).eval().to(device)
    x = torch.randn(1, 3, *size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    with torch.inference_mode(), autocast:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            model(x)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            base = _read_status('VmRSS')
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # reset VmHWM (peak RSS) to the current RSS
            model(x)
            peak = _read_status('VmHWM') - base
    print(json.dumps({'name': name, 'peak_bytes': peak}))


def peak_memory(names: List[str], size: List[int], device: torch.device, amp: bool) -> Dict[str, float]:
    out = {}
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), '--_memory-child', name, '--device', str(device),
               '--det-size', str(size[0]), str(size[1])] + (['--amp'] if amp else [])
        # glibc: serve every allocation above 128 KiB by mmap and give it back on free, so the
        # resident set follows the live tensors and its peak is the forward's peak
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='131072')
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f'memory measurement of {name} failed:\n{proc.stderr}')
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])['peak_bytes'] / 2 ** 20
    return out


def flops_table(names: List[str], size: List[int]) -> Dict[str, dict]:
    from maformer_zoo.utils import count_flops, count_params
    rows = {}
    for name in names:
        model = _create(name)
        backbone = _create(name, features_only=True)
        base = count_flops(backbone, (224, 224))
        det = count_flops(backbone, tuple(size))
        rows[name] = dict(
            params=count_params(model), gflops=count_flops(model, (224, 224)), backbone_224=base,
            backbone_det=det, linear=base * size[0] * size[1] / 224 ** 2)
    return rows


def mask_rcnn_flops(name: str, size: List[int]) -> float:
    """GFLOPs of the project's Mask R-CNN 1x config on ``name`` at ``size`` (needs detectron2).

    Random weights with the score threshold at 0, so the box head sees the 1000 RPN proposals and
    the mask head the 100 detections kept per image, as in the usual detection FLOP counts.
    """
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.utils.analysis import FlopCountAnalysis
    from detectron2_ext.config import add_maformer_zoo_config
    from maformer_zoo.utils.flops import sdpa_flop_jit

    cfg = get_cfg()
    add_maformer_zoo_config(cfg)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg.merge_from_file(os.path.join(root, 'configs', 'COCO-InstanceSegmentation', f'mask_rcnn_{name}_fpn_1x.yaml'))
    cfg.MODEL.TIMM.PRETRAINED = False
    cfg.MODEL.DEVICE = 'cpu'
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.TEST.DETECTIONS_PER_IMAGE = 100
    model = build_model(cfg).eval()
    inputs = [{'image': torch.rand(3, *size) * 255, 'height': size[0], 'width': size[1]}]
    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle('aten::scaled_dot_product_attention', sdpa_flop_jit)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with torch.no_grad():
        return analysis.total() / 1e9


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=list(TABLE1))
    parser.add_argument('--baseline', default='swin_tiny_patch4_window7_224')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--warmup', type=int, default=2, help='untimed rounds before timing')
    parser.add_argument('--iters', type=int, default=10, help='timed rounds (one batch per model each)')
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    parser.add_argument('--det-size', type=int, nargs=2, default=[800, 1216], metavar=('H', 'W'))
    parser.add_argument('--flops-size', type=int, nargs=2, default=[800, 1280], metavar=('H', 'W'))
    parser.add_argument('--skip-throughput', action='store_true')
    parser.add_argument('--skip-det-speed', action='store_true', help='skip the --det-size speed table')
    parser.add_argument('--skip-memory', action='store_true')
    parser.add_argument('--skip-flops', action='store_true')
    parser.add_argument('--mask-rcnn', action='store_true',
                        help='also count the whole Mask R-CNN at --flops-size (needs detectron2)')
    parser.add_argument('--json', default=None, help='also write the results to this file')
    parser.add_argument('--_memory-child', dest='memory_child', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_child:
        _memory_child(args.memory_child, args.det_size, device, args.amp)
        return

    results = dict(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
                   batch_size=args.batch_size, warmup=args.warmup, iters=args.iters, amp=args.amp)
    print(f'# MAFormer benchmark ({device}, {torch.get_num_threads()} threads, torch {torch.__version__})\n')

    if not args.skip_flops:
        rows = flops_table(args.models, args.flops_size)
        results['flops'] = rows
        print('| model | params (M) | Table 1 | GFLOPs 224 | Table 1 | backbone GFLOPs '
              f'{args.flops_size[0]}x{args.flops_size[1]} | linear extrapolation | ratio | '
              'Table 5 Mask R-CNN GFLOPs |')
        print('|---|---|---|---|---|---|---|---|---|')
        for n, r in rows.items():
            p_ref, f_ref = TABLE1.get(n, (float('nan'), float('nan')))
            print(f"| {n} | {r['params']:.2f} ({r['params'] / p_ref - 1:+.1%}) | {p_ref} | "
                  f"{r['gflops']:.2f} ({r['gflops'] / f_ref - 1:+.1%}) | {f_ref} | "
                  f"{r['backbone_det']:.1f} | {r['linear']:.1f} | {r['backbone_det'] / r['linear']:.3f} | "
                  f"{TABLE5_MASK_RCNN_GFLOPS.get(n, '-')} |")
        print()

    if args.mask_rcnn:
        det = {n: mask_rcnn_flops(n, args.flops_size) for n in args.models}
        results['mask_rcnn_gflops'] = det
        print(f'| model | Mask R-CNN GFLOPs {args.flops_size[0]}x{args.flops_size[1]} | Table 5 | difference |')
        print('|---|---|---|---|')
        for n, v in det.items():
            ref = TABLE5_MASK_RCNN_GFLOPS.get(n, float('nan'))
            print(f'| {n} | {v:.1f} | {ref} | {v / ref - 1:+.1%} |')
        print()

    if not args.skip_throughput:
        names = list(dict.fromkeys(args.models + [args.baseline]))
        ips = throughput(names, device, args.batch_size, (args.img_size, args.img_size), args.warmup,
                         args.iters, args.amp)
        results['images_per_s'] = ips
        _print_speed(ips, args.baseline, f'images/s (batch {args.batch_size}, {args.img_size}x{args.img_size}, '
                     f'{args.iters} timed rounds)')

    if not args.skip_det_speed:
        names = list(dict.fromkeys(args.models + [args.baseline]))
        ips = throughput(names, device, 1, tuple(args.det_size), args.warmup, args.iters, args.amp,
                         features_only=True)
        results['det_images_per_s'] = ips
        _print_speed(ips, args.baseline, f'features_only images/s ({args.det_size[0]}x{args.det_size[1]}, '
                     f'batch 1, {args.iters} timed rounds)')

    if not args.skip_memory:
        mem = peak_memory(args.models, args.det_size, device, args.amp)
        results['peak_memory_mib'] = mem
        kind = 'peak allocated' if device.type == 'cuda' else 'peak RSS growth'
        print(f'| model | features_only forward {args.det_size[0]}x{args.det_size[1]}, batch 1: {kind} (MiB) |')
        print('|---|---|')
        for n, v in mem.items():
            print(f'| {n} | {v:.0f} |')
        print()

    if args.json:
        with open(args.json, 'w') as f:
            json.dump(_rows(results, args), f, indent=2)


def _rows(results: dict, args: argparse.Namespace) -> List[dict]:
    """One flat dict per model (the --json format every benchmark shares)."""
    meta = {k: results[k] for k in ('device', 'threads', 'torch', 'batch_size', 'warmup', 'iters', 'amp')}
    timed = not (args.skip_throughput and args.skip_det_speed)
    names = list(dict.fromkeys(args.models + ([args.baseline] if timed else [])))
    rows = []
    for n in names:
        row = dict(benchmark='maformer', model=n, **meta)
        for key, value in results.get('flops', {}).get(n, {}).items():
            row[key] = value
        if n in results.get('mask_rcnn_gflops', {}):
            row['mask_rcnn_gflops'] = results['mask_rcnn_gflops'][n]
        ips = results.get('images_per_s', {})
        if n in ips:
            row['images_per_s'] = ips[n]
            row[f'ratio_to_{args.baseline}'] = ips[n] / ips[args.baseline]
        det = results.get('det_images_per_s', {})
        if n in det:
            row['det_images_per_s'] = det[n]
            row[f'det_ratio_to_{args.baseline}'] = det[n] / det[args.baseline]
        if n in results.get('peak_memory_mib', {}):
            row['peak_memory_mib'] = results['peak_memory_mib'][n]
        rows.append(row)
    return rows


if __name__ == '__main__':
    main()

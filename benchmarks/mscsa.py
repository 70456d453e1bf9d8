#!/usr/bin/env python
"""Benchmark MSCSA-augmented backbones against their timm base models, in one run.

For every pair (timm base, ``<base>_mscsa``) it prints:

* parameters (M) of both classification models (heads included);
* GFLOPs at 224x224 (fvcore, one multiply-add = one flop; ``maformer_zoo.utils.count_flops``)
  next to the paper's Table 6 figures;
* images/s of the eval-mode classification forward at ``--batch-size`` (32) and ``--img-size``
  (224): base and augmented model are timed alternately, ``--iters`` rounds each after
  ``--warmup`` rounds, and the median round is used, so both see the same machine load. Two
  clocks: wall time, and the CPU time of the process (``time.process_time``). On a shared
  machine wall time mostly measures the other processes; with ``--threads 1`` (the default) CPU
  time measures the model's own work, so its ratio is the one to compare. The augmented/base
  ratios are printed next to the paper's A100 ratio (Table 6 FPS);
* peak memory of the ``features_only`` forward (batch 1, eval, ``torch.inference_mode``) at
  ``--det-size`` (800x1216) for the base (timm's own ``features_only`` model) and the augmented
  model (MSCSA dense variant).

Memory method: each measurement runs in a fresh child process. After the model and input are
built and one untimed forward has run (so one-time allocations are not counted), the child resets
the kernel's resident-set high-water mark (``echo 5 > /proc/self/clear_refs``), reads the current
RSS (``VmRSS``), runs the forward once more and reads the new high-water mark (``VmHWM``). The
difference is the peak memory the forward itself needed (activations and workspace). The child
runs with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_=65536``): every block of 64 KiB
or more goes back to the OS when freed, so RSS follows the live tensors. Linux only; where
``clear_refs`` cannot be written it falls back to ``ru_maxrss`` deltas.

Usage::

    python benchmarks/mscsa.py                      # all seven pairs
    python benchmarks/mscsa.py --models resnet50 pvt_v2_b0 --iters 3 --warmup 1
    python benchmarks/mscsa.py --tiny               # every code path in seconds (CI)
"""
import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

BASES = [
    'resnet18', 'resnet50', 'pvt_v2_b0', 'pvt_v2_b1', 'pvt_v2_b2',
    'swin_tiny_patch4_window7_224', 'convnext_tiny',
]
# Table 6 (App. A): (base GFLOPs, augmented GFLOPs, base FPS, augmented FPS) on an A100
PAPER_TABLE6: Dict[str, Tuple[float, float, int, int]] = {
    'resnet50': (4.1, 4.6, 2404, 2050),
    'pvt_v2_b0': (0.57, 0.65, 3797, 3479),
    'pvt_v2_b1': (2.1, 2.3, 2492, 2262),
    'swin_tiny_patch4_window7_224': (4.4, 5.0, 1578, 1414),
    'convnext_tiny': (4.5, 5.1, 1955, 1732),
}


def _build(name: str, **kwargs):
    import timm
    import maformer_zoo  # noqa: F401  (registers the *_mscsa models)
    return timm.create_model(name, **kwargs).eval()


def _read_status_kib(field: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_memory_child(name: str, det_size: Tuple[int, int], threads: int, queue) -> None:
    torch.set_num_threads(threads)
    kwargs = dict(features_only=True, out_indices=(-4, -3, -2, -1))  # the stride 4..32 stages
    if name.startswith('swin') and not name.endswith('_mscsa'):
        kwargs['strict_img_size'] = False  # timm's Swin takes other sizes only so (ours sets it itself)
    model = _build(name, **kwargs)
    x = torch.randn(1, 3, *det_size)
    with torch.inference_mode():
        model(x)  # one-time allocations (kernel caches, thread pools) are not the forward's peak
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # reset VmHWM to the current RSS
        before = _read_status_kib('VmRSS')
        method = 'VmHWM'
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = 'ru_maxrss'
    with torch.inference_mode():
        features = model(x)
    after = _read_status_kib('VmHWM') if method == 'VmHWM' else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shapes = [tuple(f.shape) for f in features]
    queue.put(dict(peak_mib=(after - before) / 1024, method=method, shapes=shapes))


def peak_forward_memory(name: str, det_size: Tuple[int, int], threads: int) -> dict:
    """Peak extra memory (MiB) of one features_only forward of ``name`` at ``det_size``."""
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_child, args=(name, det_size, threads, queue))
    # A fixed glibc mmap threshold: blocks >= 64 KiB are mapped and unmapped on free, so RSS
    # follows the live tensors (glibc otherwise raises the threshold after the first frees and
    # keeps freed blocks up to 32 MiB in the heap). The spawned interpreter reads it at start.
    previous = os.environ.get('MALLOC_MMAP_THRESHOLD_')
    os.environ['MALLOC_MMAP_THRESHOLD_'] = '65536'
    try:
        proc.start()
    finally:
        if previous is None:
            del os.environ['MALLOC_MMAP_THRESHOLD_']
        else:
            os.environ['MALLOC_MMAP_THRESHOLD_'] = previous
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Exception:  # noqa: BLE001 - queue.Empty: check the child is still alive
            if not proc.is_alive():
                raise RuntimeError(f'The memory measurement of {name} failed (exit code {proc.exitcode}).')
    proc.join()
    return result


def _time_forward(model, x) -> Tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one forward."""
    wall, cpu = time.perf_counter(), time.process_time()
    model(x)
    return time.perf_counter() - wall, time.process_time() - cpu


def throughput_pair(base, aug, batch_size: int, img_size: int, iters: int, warmup: int,
                    channels_last: bool) -> Dict[str, float]:
    """Images/s of base and aug, timed alternately; median over ``iters`` rounds.

    Returns wall-clock and CPU-time rates: ``ips_base``/``ips_aug`` (wall) and
    ``cpu_ips_base``/``cpu_ips_aug`` (images per CPU-second of the process).
    """
    x = torch.randn(batch_size, 3, img_size, img_size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        base = base.to(memory_format=torch.channels_last)
        aug = aug.to(memory_format=torch.channels_last)
    times: Dict[str, List[Tuple[float, float]]] = {'base': [], 'aug': []}
    with torch.inference_mode():
        for i in range(warmup + iters):
            for key, model in (('base', base), ('aug', aug)) if i % 2 == 0 else (('aug', aug), ('base', base)):
                t = _time_forward(model, x)
                if i >= warmup:
                    times[key].append(t)
    out = {}
    for key, runs in times.items():
        out[f'ips_{key}'] = batch_size / statistics.median(r[0] for r in runs)
        out[f'cpu_ips_{key}'] = batch_size / statistics.median(r[1] for r in runs)
    return out


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=BASES, help='timm base names (paired with <name>_mscsa)')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--iters', type=int, default=5, help='timed rounds per model')
    parser.add_argument('--warmup', type=int, default=1, help='untimed rounds per model')
    parser.add_argument('--threads', type=int, default=1,
                        help='intra-op threads (1: CPU time then measures the work, not the machine load)')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--det-size', type=int, nargs=2, default=(800, 1216), metavar=('H', 'W'))
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    parser.add_argument('--memory-only', action='store_true', help='only params, FLOPs and peak memory')
    parser.add_argument('--json', default='', help='also write the rows to this file')
    parser.add_argument('--tiny', action='store_true',
                        help='a seconds-long run of every code path (CI): resnet18 only, batch 1, '
                             '64x64, one round, a 64x96 memory input; the numbers mean nothing')
    args = parser.parse_args(argv)
    if args.tiny:
        args.models, args.batch_size, args.img_size = ['resnet18'], 1, 64
        args.iters, args.warmup, args.det_size = 1, 0, (64, 96)
    if args.memory_only and args.no_memory:
        parser.error('--memory-only and --no-memory exclude each other')

    from maformer_zoo.utils import count_flops, count_params

    torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, '
          f'{args.img_size}x{args.img_size}, {args.iters} timed rounds (+{args.warmup} warm-up), '
          f'channels_last={args.channels_last}', flush=True)
    rows = []
    from tqdm import tqdm
    for name in tqdm(args.models, desc='MSCSA pairs', unit='pair'):
        base, aug = _build(name), _build(f'{name}_mscsa')
        row = dict(benchmark='mscsa', model=name)
        row['params_base'], row['params_aug'] = count_params(base), count_params(aug)
        row['gflops_base'], row['gflops_aug'] = count_flops(base), count_flops(aug)
        if not args.memory_only:
            row.update(throughput_pair(
                base, aug, args.batch_size, args.img_size, args.iters, args.warmup, args.channels_last))
            row['ratio'] = row['ips_aug'] / row['ips_base']
            row['cpu_ratio'] = row['cpu_ips_aug'] / row['cpu_ips_base']
        paper = PAPER_TABLE6.get(name)
        row['paper_gflops_aug'] = paper[1] if paper else None
        row['paper_ratio'] = paper[3] / paper[2] if paper else None
        del base, aug
        if not args.no_memory:
            det = tuple(args.det_size)
            mem_base = peak_forward_memory(name, det, args.threads)
            mem_aug = peak_forward_memory(f'{name}_mscsa', det, args.threads)
            row['peak_mib_base'], row['peak_mib_aug'] = mem_base['peak_mib'], mem_aug['peak_mib']
            row['memory_method'] = mem_aug['method']
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    def fmt(v, spec):
        return '-' if v is None else format(v, spec)

    header = '| model | params base/aug (M) | GFLOPs base/aug | paper aug GFLOPs |'
    if not args.memory_only:
        header += (' img/s base/aug (wall) | ratio (wall) | img/CPU-s base/aug | ratio (CPU time) '
                   '| paper A100 ratio |')
    if not args.no_memory:
        header += f' peak MiB {args.det_size[0]}x{args.det_size[1]} base/aug |'
    print()
    print(header)
    print('|' + '---|' * (header.count('|') - 1))
    for r in rows:
        line = (f"| {r['model']} | {r['params_base']:.2f} / {r['params_aug']:.2f} "
                f"| {r['gflops_base']:.3f} / {r['gflops_aug']:.3f} | {fmt(r['paper_gflops_aug'], '.2f')} |")
        if not args.memory_only:
            line += (f" {r['ips_base']:.1f} / {r['ips_aug']:.1f} | {r['ratio']:.3f} "
                     f"| {r['cpu_ips_base']:.1f} / {r['cpu_ips_aug']:.1f} | {r['cpu_ratio']:.3f} "
                     f"| {fmt(r['paper_ratio'], '.3f')} |")
        if not args.no_memory:
            line += f" {r['peak_mib_base']:.0f} / {r['peak_mib_aug']:.0f} |"
        print(line)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == '__main__':
    sys.exit(0 if main() else 1)

#!/usr/bin/env python
"""Run the benchmark scripts (``make bench``): each prints its own tables, measured in one run.

    python benchmarks/run_all.py                 # mscsa, maformer and necks, default settings
    python benchmarks/run_all.py maformer -- --iters 2 --warmup 1

Benchmarks are scripts, not tests: they time on whatever machine runs them and report ratios
against a baseline measured in the same process (timm's base model, Swin-T, plain FPN).
"""
import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = {
    'mscsa': 'mscsa.py',        # MSCSA models vs their timm bases (issue: MSCSA)
    'maformer': 'maformer.py',  # MAFormer-S/B/L vs Swin-T
    'necks': 'necks.py',        # FPN vs FINE-FPN vs ASFF-FPN at 800x1333
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('which', nargs='*', help=f'benchmarks to run, of {sorted(BENCHMARKS)} (default: all)')
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index('--') if '--' in argv else len(argv)
    args = parser.parse_args(argv[:split])
    extra = argv[split + 1:]  # arguments after -- go to each script
    unknown = sorted(set(args.which) - set(BENCHMARKS))
    if unknown:
        parser.error(f'unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}')
    status = 0
    for name in args.which or list(BENCHMARKS):
        print(f'\n===== {name}: {BENCHMARKS[name]} {" ".join(extra)}', flush=True)
        status |= subprocess.call([sys.executable, os.path.join(HERE, BENCHMARKS[name]), *extra])
    return status


if __name__ == '__main__':
    sys.exit(main())

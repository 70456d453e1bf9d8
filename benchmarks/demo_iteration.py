#!/usr/bin/env python
"""Seconds per training iteration of `make demo`'s model: OpenMP wait settings, and an older tree.

Each run is its own process (OpenMP reads its environment when torch loads), the runs interleaved
round by round; the table gives the median wall-clock seconds per iteration and the ratio to the
first row. ``--baseline REV`` adds a first row that trains REV's demo (its code and its demo config,
extracted with ``git archive``) under ``--baseline-setting``: the tree of issue 23 is c9f6e0c, whose
demo waited passively. ``--neighbour`` runs a 2-thread torch matmul loop beside every run: how a
busy machine treats each setting. docs/demo.md records the numbers and the choices.

    python benchmarks/demo_iteration.py                          # ~6 min on 2 idle cores
    python benchmarks/demo_iteration.py --baseline c9f6e0c --settings spin-1k
    python benchmarks/demo_iteration.py --neighbour --rounds 1
    python benchmarks/demo_iteration.py --tiny                   # a 1-round smoke run
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# name -> environment; libgomp (torch's OpenMP on Linux) spins GOMP_SPINCOUNT times before it
# sleeps; PASSIVE means 0, unset means 300000, ACTIVE spins for ever
SETTINGS = {
    'passive': {'OMP_WAIT_POLICY': 'PASSIVE'},
    'spin-1k': {'GOMP_SPINCOUNT': '1000'},
    'spin-10k': {'GOMP_SPINCOUNT': '10000'},
    'spin-100k': {'GOMP_SPINCOUNT': '100000'},
    'default': {},
}


def _child(args) -> None:
    """Train the demo's model for warm-up + measured iterations; print per-iteration seconds."""
    import torch
    from detectron2.engine import HookBase
    from detectron2.utils.env import seed_all_rng

    from detectron2_ext.config_file import load_config
    from detectron2_ext.data import register_synthetic_dataset, write_synthetic_coco
    from detectron2_ext.engine import Trainer

    package = os.path.abspath(sys.modules['detectron2_ext'].__file__)
    if not package.startswith(os.path.join(os.path.abspath(args.tree), '')):  # the tree asked for is the one timed
        raise SystemExit(f'detectron2_ext came from {package}, not from {args.tree}')
    torch.set_num_threads(args.threads)
    config = os.path.join(args.tree, 'configs', 'demo', 'mask_rcnn_resnet18_mscsa_fine_fpn_demo.yaml')
    with tempfile.TemporaryDirectory() as tmp:
        total = args.warmup + args.iters
        cfg = load_config(config, ['OUTPUT_DIR', os.path.join(tmp, 'model'), 'SOLVER.MAX_ITER', total,
                                   'DATASETS.TEST', '()', 'DATASETS.TRAIN', '("bench_train",)'])
        write_synthetic_coco(tmp, num_images=96, image_size=(128, 160), seed=cfg.SEED, split='train')
        register_synthetic_dataset('bench_train', tmp, 'train')
        seed_all_rng(cfg.SEED)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        times = []

        class Clock(HookBase):
            def before_step(self):
                self.start = time.perf_counter()

            def after_step(self):
                times.append(time.perf_counter() - self.start)

        trainer.register_hooks([Clock()])
        trainer.train()
    print(json.dumps(times[args.warmup:]))


def _neighbour() -> subprocess.Popen:
    code = ('import torch\ntorch.set_num_threads(2)\nx = torch.randn(512, 512)\n'
            'while True:\n    x = torch.tanh(x @ x)\n')
    return subprocess.Popen([sys.executable, '-c', code])


def _rev_parse(rev: str) -> str:
    out = subprocess.run(['git', '-C', REPO, 'rev-parse', rev], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else f'{rev} (not in a git checkout)'


def _extract(rev: str, tmp: str) -> str:
    """REV's tracked files in a new folder under ``tmp`` (its Python and configs run from there)."""
    tree = os.path.join(tmp, 'baseline')
    os.makedirs(tree)
    archive = subprocess.run(['git', '-C', REPO, 'archive', '--format=tar', rev], check=True,
                             capture_output=True).stdout
    subprocess.run(['tar', '-x', '-C', tree], input=archive, check=True)
    return tree


def _measure(runs, args) -> dict:
    """Per-iteration seconds of every run, the runs' order reversed every other round."""
    per_run = {row: [] for row, _, _ in runs}
    for r in range(args.rounds):
        for row, tree, setting in (runs if r % 2 == 0 else runs[::-1]):
            env = {k: v for k, v in os.environ.items() if k not in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')}
            env.update(SETTINGS[setting])
            # the tree's own packages first (an editable install of this tree comes after PYTHONPATH)
            env['PYTHONPATH'] = os.pathsep.join([tree] + [p for p in [env.get('PYTHONPATH')] if p])
            neighbour = _neighbour() if args.neighbour else None
            try:
                out = subprocess.run([sys.executable, __file__, '--child', '--tree', tree, '--warmup',
                                      str(args.warmup), '--iters', str(args.iters), '--threads',
                                      str(args.threads)], env=env, check=True, capture_output=True,
                                     text=True).stdout
            finally:
                if neighbour is not None:
                    neighbour.kill()
                    neighbour.wait()
            per_run[row] += json.loads(out.strip().splitlines()[-1])
            print(f'round {r + 1} {row}: {statistics.median(per_run[row]):.3f} s/iteration', flush=True)
    return per_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--settings', nargs='+', default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument('--baseline', default=None, metavar='REV',
                        help="also time REV's demo (a git revision of this repository), as the first row")
    parser.add_argument('--baseline-setting', default='passive', choices=list(SETTINGS),
                        help="the baseline's OpenMP setting (default: passive, the demo's until 2026-12-02)")
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--neighbour', action='store_true', help='a 2-thread matmul loop beside each run')
    parser.add_argument('--tiny', action='store_true',
                        help='1 round, 2 runs (passive or the baseline; spin-1k), 1 + 2 iterations')
    parser.add_argument('--json', default=None, help='write the rows here')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--tree', default=REPO, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    if args.tiny:
        args.rounds, args.warmup, args.iters = 1, 1, 2
        args.settings = ['spin-1k'] if args.baseline else ['passive', 'spin-1k']
    runs = [(name, REPO, name) for name in args.settings]  # (row, tree, setting)
    commits = {REPO: _rev_parse('HEAD')}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            tree = _extract(args.baseline, tmp)
            commits[tree] = _rev_parse(args.baseline)
            runs.insert(0, (f'{args.baseline} {args.baseline_setting}', tree, args.baseline_setting))
        per_run = _measure(runs, args)
    base = statistics.median(per_run[runs[0][0]])
    rows = []
    for row, tree, setting in runs:
        median = statistics.median(per_run[row])
        rows.append(dict(setting=row, environment=SETTINGS[setting], neighbour=args.neighbour,
                         tree=commits[tree], seconds_per_iteration=round(median, 4),
                         speedup_vs_first=round(base / median, 3)))
    print(f'| run | s/iteration | speed-up vs {runs[0][0]} |')
    print('| --- | ---: | ---: |')
    for row in rows:
        print(f"| {row['setting']} | {row['seconds_per_iteration']:.3f} | {row['speedup_vs_first']:.2f}x |")
    if args.json:
        from maformer_zoo.utils.atomic import write_atomic
        write_atomic(args.json, json.dumps(rows, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())

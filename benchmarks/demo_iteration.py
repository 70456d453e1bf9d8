#!/usr/bin/env python
"""Seconds per training iteration of `make demo`'s model: OpenMP wait settings, an older tree, config variants.

Each run is its own process (OpenMP reads its environment when torch loads), the runs interleaved
round by round; the table gives the median wall-clock seconds per iteration and the ratio to the
first row. ``--baseline REV`` adds a first row that trains REV's demo (its code and its demo config,
extracted with ``git archive``) under ``--baseline-setting``: the tree of issue 23 is c9f6e0c, whose
demo waited passively. ``--neighbour`` runs a 2-thread torch matmul loop beside every run: how a
busy machine treats each setting. ``--variants`` instead times training steps (forward, backward,
optimizer; no data loading) of the demo's model under config overrides, the models side by side in
one process. docs/demo.md records the numbers and the choices.

    python benchmarks/demo_iteration.py                          # ~6 min on 2 idle cores
    python benchmarks/demo_iteration.py --baseline c9f6e0c --settings spin-1k
    python benchmarks/demo_iteration.py --neighbour --rounds 1
    python benchmarks/demo_iteration.py --tiny                   # a 1-round smoke run
    python benchmarks/demo_iteration.py --variants '' 'MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION 14'
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


def _demo_trainer(tree: str, tmp: str, max_iter: int, opts=(), name: str = 'model'):
    """The demo's Trainer (``tree``'s config and ``opts``) for ``max_iter`` iterations on 96
    generated scenes in ``tmp`` (written and registered once), seeded as the demo is."""
    from detectron2.data import DatasetCatalog
    from detectron2.utils.env import seed_all_rng

    from detectron2_ext.config_file import load_config
    from detectron2_ext.data import register_synthetic_dataset, write_synthetic_coco
    from detectron2_ext.engine import Trainer

    config = os.path.join(tree, 'configs', 'demo', 'mask_rcnn_resnet18_mscsa_fine_fpn_demo.yaml')
    cfg = load_config(config, ['OUTPUT_DIR', os.path.join(tmp, name), 'SOLVER.MAX_ITER', max_iter,
                               'DATASETS.TEST', '()', 'DATASETS.TRAIN', '("bench_train",)', *opts])
    if 'bench_train' not in DatasetCatalog.list():
        write_synthetic_coco(tmp, num_images=96, image_size=(128, 160), seed=cfg.SEED, split='train')
        register_synthetic_dataset('bench_train', tmp, 'train')
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def _child(args) -> None:
    """Train the demo's model for warm-up + measured iterations; print per-iteration seconds."""
    import detectron2_ext
    import torch
    from detectron2.engine import HookBase

    package = os.path.abspath(detectron2_ext.__file__)
    if not package.startswith(os.path.join(os.path.abspath(args.tree), '')):  # the tree asked for is the one timed
        raise SystemExit(f'detectron2_ext came from {package}, not from {args.tree}')
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _demo_trainer(args.tree, tmp, args.warmup + args.iters)
        times = []

        class Clock(HookBase):
            def before_step(self):
                self.start = time.perf_counter()

            def after_step(self):
                times.append(time.perf_counter() - self.start)

        trainer.register_hooks([Clock()])
        trainer.train()
    print(json.dumps(times[args.warmup:]))


def _measure_variants(args):
    """--variants: each variant's model trains --warmup iterations (its RoIs then look like
    mid-training ones), then training steps on --iters fixed batches per model are timed in this
    one process, the models' order reversed every other round. Returns the per-step seconds and
    the parameter count of each variant."""
    import torch
    from detectron2.utils.events import EventStorage

    torch.set_num_threads(args.threads)
    per_run, parameters, models = {}, {}, []
    with tempfile.TemporaryDirectory() as tmp, EventStorage(0):
        for i, variant in enumerate(args.variants):
            trainer = _demo_trainer(REPO, tmp, args.warmup, variant.split(), name=f'variant{i}')
            trainer.train()
            loader = iter(trainer.data_loader)
            models.append((variant, trainer.model, trainer.optimizer, [next(loader) for _ in range(args.iters)]))
            per_run[variant] = []
            parameters[variant] = sum(p.numel() for p in trainer.model.parameters())
        for r in range(args.rounds):
            for variant, model, optimizer, batches in (models if r % 2 == 0 else models[::-1]):
                for batch in batches:
                    start = time.perf_counter()
                    sum(model(batch).values()).backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    per_run[variant].append(time.perf_counter() - start)
                print(f'round {r + 1} {variant or "the config"}: {statistics.median(per_run[variant]):.3f} s/step',
                      flush=True)
    return per_run, parameters


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
    parser.add_argument('--variants', nargs='+', default=None, metavar='"KEY VALUE ..."',
                        help="instead, time training steps of the demo's model under these config overrides "
                             "('' is the config itself) in this one process")
    parser.add_argument('--tiny', action='store_true',
                        help='1 round, 1 + 2 iterations; 2 runs (passive or the baseline; spin-1k) '
                             'unless --variants')
    parser.add_argument('--json', default=None, help='write the rows here')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--tree', default=REPO, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    if args.tiny:
        args.rounds, args.warmup, args.iters = 1, 1, 2
    if args.variants:
        per_run, parameters = _measure_variants(args)
        rows = [dict(setting=variant or 'the config', opts=variant.split(), parameters=parameters[variant])
                for variant in args.variants]
        medians = [statistics.median(per_run[variant]) for variant in args.variants]
    else:
        if args.tiny:
            args.settings = ['spin-1k'] if args.baseline else ['passive', 'spin-1k']
        runs = [(name, REPO, name) for name in args.settings]  # (row, tree, setting)
        commits = {REPO: _rev_parse('HEAD')}
        with tempfile.TemporaryDirectory() as tmp:
            if args.baseline:
                tree = _extract(args.baseline, tmp)
                commits[tree] = _rev_parse(args.baseline)
                runs.insert(0, (f'{args.baseline} {args.baseline_setting}', tree, args.baseline_setting))
            per_run = _measure(runs, args)
        rows = [dict(setting=row, environment=SETTINGS[setting], neighbour=args.neighbour, tree=commits[tree])
                for row, tree, setting in runs]
        medians = [statistics.median(per_run[row]) for row, _, _ in runs]
    for row, median in zip(rows, medians):
        row.update(seconds_per_iteration=round(median, 4), speedup_vs_first=round(medians[0] / median, 3))
    print(f"| run | s/iteration | speed-up vs {rows[0]['setting']} |")
    print('| --- | ---: | ---: |')
    for row in rows:
        print(f"| {row['setting']} | {row['seconds_per_iteration']:.3f} | {row['speedup_vs_first']:.2f}x |")
    if args.json:
        from maformer_zoo.utils.atomic import write_atomic
        write_atomic(args.json, json.dumps(rows, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())

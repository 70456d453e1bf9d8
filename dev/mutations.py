#!/usr/bin/env python3
"""Break the code each claim's test guards, and report which tests catch it (issue 22).

Each mutation is one exact text replacement in one file. For every mutation the script copies
the tree (tracked and untracked files, not .git / .venv / output) into a temporary folder,
applies the replacement there, and runs the tests that should catch it with the copy first on
``PYTHONPATH`` (so the tests, and the scripts they start, run the copy's code). A test catches
the mutation when it fails. The table goes to stdout; ``--json`` also writes it as rows.

    python dev/mutations.py                       # every mutation
    python dev/mutations.py --only skip-weight-load nhwc-transposed-permute
    python dev/mutations.py --list                # names, files and tests, nothing run

A mutation whose text is no longer in its file is reported as ``stale`` (the code moved: update
its ``old`` text), never silently skipped. Each test's docstring names the mutation it catches.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D2 = 'tests/test_detectron2_integration.py'


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: Tuple[str, ...]  # pytest node ids (or `file -k expr` pairs, see _pytest_args)
    what: str


MUTATIONS: List[Mutation] = [
    Mutation('skip-weight-load', 'detectron2_ext/checkpoint.py',
             'incompatible = super()._load_model(checkpoint)',
             "incompatible = super()._load_model({**checkpoint, 'model': dict(self.model.state_dict())})",
             (f'{D2}::test_train_evaluate_resume_eval_only[mask_rcnn-fine_fpn]',),
             'the checkpointer loads no weights (eval-only evaluates the initialisation)'),
    Mutation('optimizer-lr-scaled', 'detectron2_ext/engine/trainer.py',
             'optimizer_class(groups, lr=cfg.SOLVER.BASE_LR, betas=', 'optimizer_class(groups, lr=10 * cfg.SOLVER.BASE_LR, betas=',
             (f'{D2}::test_train_evaluate_resume_eval_only[mask_rcnn-fine_fpn]',),
             'AdamW steps with 10x SOLVER.BASE_LR (the recorded values move)'),
    Mutation('nhwc-transposed-permute', 'detectron2_ext/modeling/timm_backbone.py',
             'feature = feature.permute(0, 3, 1, 2).contiguous()',
             'feature = feature.permute(0, 3, 2, 1).contiguous()',
             (f'{D2}::test_channels_last_models_are_permuted',),
             'NHWC features permuted to NCWH (height and width swapped)'),
    Mutation('mscsa-checkpoint-detached', 'maformer_zoo/layers/mscsa.py',
             'x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)',
             'x = torch.utils.checkpoint.checkpoint(block, x.detach(), use_reentrant=False)',
             (f'{D2}::test_drop_path_and_grad_checkpointing',
              'tests/test_models.py::test_grad_checkpointing_gives_the_same_output_and_gradients[resnet18_mscsa]'),
             'checkpointed MSCSA blocks cut the gradient to the backbone'),
    Mutation('config-fpn-channels-ignored', 'detectron2_ext/modeling/fpn_variants.py',
             'out_channels=cfg.MODEL.FPN.OUT_CHANNELS,', 'out_channels=cfg.MODEL.FPN.OUT_CHANNELS // 2,',
             (f'{D2}::test_every_config_builds[COCO-InstanceSegmentation/mask_rcnn_pvt_v2_b0_mscsa_asff_fpn_1x.yaml]',
              f'{D2}::test_retinanet_builders[fine]',
              'tests/test_claims_coverage.py::test_every_config_loads_and_each_kind_builds'),
             'the FPN builders halve MODEL.FPN.OUT_CHANNELS'),
    Mutation('fine-neck-output-detached', 'detectron2_ext/modeling/fpn_variants.py',
             'results = self.pyramid(self.bottom_up(x))',
             'results = [r.detach() for r in self.pyramid(self.bottom_up(x))]',
             ('tests/test_fpn_variants.py::test_two_training_iterations_and_inference[fine_fpn-mask_rcnn]',),
             'the pyramid outputs are detached (neck and backbone get no gradient)'),
    Mutation('bench-ratio-inverted', 'benchmarks/maformer.py',
             "row[f'det_ratio_to_{args.baseline}'] = det[n] / det[args.baseline]",
             "row[f'det_ratio_to_{args.baseline}'] = det[args.baseline] / det[n]",
             ('tests/test_maformer.py::test_benchmark_script_runs_every_speed_table',),
             'benchmarks/maformer.py reports baseline / model'),
    Mutation('necks-ratio-inverted', 'benchmarks/necks.py',
             "row[f'{quantity}_{scope}_ratio'] = value / reference",
             "row[f'{quantity}_{scope}_ratio'] = reference / value",
             ('tests/test_fpn_variants.py::test_neck_benchmark_writes_json_rows',),
             'benchmarks/necks.py reports fpn / neck'),
    Mutation('maformer-attn-dropout-in-eval', 'maformer_zoo/layers/maf.py',
             'attn_drop = self.attn_drop if self.training else 0.', 'attn_drop = self.attn_drop',
             ('tests/test_models.py::test_eval_is_deterministic_and_batch_independent[maformer_s]',),
             'MAFormer stripe attention keeps its dropout in eval mode'),
    Mutation('mscsa-attn-dropout-in-eval', 'maformer_zoo/layers/mscsa.py',
             'self.attn_drop if self.training else 0.)', 'self.attn_drop)',
             ('tests/test_models.py::test_eval_is_deterministic_and_batch_independent[pvt_v2_b0_mscsa]',),
             'MSCSA attention keeps its dropout in eval mode'),
    Mutation('maformer-float32-only', 'maformer_zoo/models/maformer.py',
             "check_input(x, self.in_chans, self.min_input_size, 'MAFormer', self.stem.conv1.weight.dtype)",
             "check_input(x, self.in_chans, self.min_input_size, 'MAFormer', torch.float32)",
             ('tests/test_maformer.py::test_bf16_matches_float32',),
             'MAFormer takes float32 input only (a bfloat16 model refuses its own dtype)'),
    Mutation('freeze-one-stage-too-many', 'detectron2_ext/modeling/timm_backbone.py',
             'for group in self._parameter_groups()[:freeze_at]:',
             'for group in self._parameter_groups()[:freeze_at + 1]:',
             ('tests/test_timm_adapter_sweep.py::test_family[resnet18_mscsa]',
              'tests/test_timm_adapter_sweep.py::test_family[efficientnet_b0]',
              'tests/test_timm_adapter_sweep.py::test_family_small[convnext_tiny]',
              'tests/test_timm_adapter_sweep.py::test_family_small[hrnet_w18_small]'),
             'FREEZE_AT freezes one stage more than it says (the rest does not all train)'),
    Mutation('ddp-gradient-sum', 'maformer_zoo/training/engine.py',
             '(loss / window).backward()', '(loss * ctx.world_size / window).backward()',
             ('tests/test_imagenet_scripts.py::test_two_process_torchrun_matches_one_process',),
             'gradients summed over processes instead of averaged'),
    Mutation('d2-sgd-lr-times-world-size', 'detectron2_ext/engine/trainer.py',
             'optimizer_class(groups, lr=cfg.SOLVER.BASE_LR, momentum=',
             'optimizer_class(groups, lr=cfg.SOLVER.BASE_LR * comm.get_world_size(), momentum=',
             ('tests/test_train_net.py::test_two_processes_equal_one_with_plain_sgd',),
             'SGD learning rate multiplied by the number of processes (2 processes step twice as far)'),
    Mutation('demo-threads-follow-load', 'scripts/demo.py',
             'torch.set_num_threads(args.threads)',
             'torch.set_num_threads(1 if _busy() else args.threads)',
             ('tests/test_demo.py::test_demo_gives_the_same_result_on_a_busy_machine',),
             'the demo picks its thread count from how busy the machine is'),
    Mutation('demo-no-gradient-clipping', 'configs/demo/mask_rcnn_resnet18_mscsa_fine_fpn_demo.yaml',
             'CLIP_GRADIENTS:\n    ENABLED: True', 'CLIP_GRADIENTS:\n    ENABLED: False',
             ('tests/test_demo.py::test_demo_runs_end_to_end',),
             'the demo trains without gradient clipping (the recorded values move)'),
    Mutation('benchmark-variants-ignore-overrides', 'benchmarks/demo_iteration.py',
             "_demo_trainer(REPO, tmp, args.warmup, variant.split(), name=f'variant{i}')",
             "_demo_trainer(REPO, tmp, args.warmup, (), name=f'variant{i}')",
             ('tests/test_demo.py::test_demo_iteration_benchmark_times_config_variants',),
             "the benchmark's --variants time the config itself, whatever the overrides"),
    Mutation('readme-params-stale', 'README.md',
             '| `maformer_b` | 54.58 |', '| `maformer_b` | 54.59 |',
             ('tests/test_claims_coverage.py::test_readme_model_table_matches_the_code',),
             "the README's model table disagrees with the code"),
    Mutation('hub-card-stale', 'hub_cards/resnet18_mscsa.md',
             '16.82', '16.83',
             ('tests/test_claims_coverage.py::test_model_cards_are_current',),
             'a committed model card is out of date'),
]

# Extra code some mutations need (added before the file's `if __name__ == '__main__':`).
SUPPORT: Dict[str, str] = {
    'demo-threads-follow-load': '''

def _busy() -> bool:
    """Mutation helper: True when other processes keep the CPUs busy (idle share < 50%)."""
    def sample():
        with open('/proc/stat') as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)
    idle0, total0 = sample()
    time.sleep(0.5)
    idle1, total1 = sample()
    return (idle1 - idle0) < 0.5 * max(total1 - total0, 1)
''',
}


def _copy_tree(dest: str) -> None:
    files = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split('\0')
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(src, target)
    venv = os.path.join(ROOT, '.venv')
    if os.path.exists(venv):
        os.symlink(os.path.realpath(venv), os.path.join(dest, '.venv'))


def _apply(mutation: Mutation, tree: str) -> Optional[str]:
    """Apply ``mutation`` in ``tree``; returns why it could not be applied, or None."""
    path = os.path.join(tree, mutation.path)
    if not os.path.isfile(path):
        return f'{mutation.path} is gone'
    with open(path, encoding='utf-8') as f:
        text = f.read()
    count = text.count(mutation.old)
    if count != 1:
        return f'{count} occurrences of the old text in {mutation.path} (expected 1)'
    text = text.replace(mutation.old, mutation.new)
    support = SUPPORT.get(mutation.name, '')
    if support:  # before the script's entry point, so that it exists when main() runs
        head, sep, tail = text.rpartition("\nif __name__ == '__main__':")
        text = head + support + sep + tail if sep else text + support
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)
    return None


def _run_tests(tree: str, tests: Tuple[str, ...], timeout: int) -> Dict[str, str]:
    """Run ``tests`` in ``tree`` with the tree's code; returns {node id: outcome}."""
    report = os.path.join(tree, '.mutation-junit.xml')
    env = dict(os.environ, PYTHONPATH=tree, PYTHONDONTWRITEBYTECODE='1')
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', f'--junitxml={report}',
           '-o', 'addopts=', *tests]
    try:
        subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {t: 'timeout' for t in tests}
    if not os.path.isfile(report):
        return {t: 'error' for t in tests}
    outcomes = {}
    for case in ET.parse(report).getroot().iter('testcase'):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        if case.find('failure') is not None or case.find('error') is not None:
            outcomes[name] = 'failed'
        elif case.find('skipped') is not None:
            outcomes[name] = 'skipped'
        else:
            outcomes[name] = 'passed'
    return outcomes or {t: 'error' for t in tests}


def _check_copy_is_used(tree: str) -> None:
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, '-c', 'import maformer_zoo, detectron2_ext; '
                          'print(maformer_zoo.__file__); print(detectron2_ext.__file__)'],
                         cwd=tree, env=env, capture_output=True, text=True, check=True).stdout.split()
    real = os.path.realpath(tree)
    for path in out:
        if not os.path.realpath(path).startswith(real + os.sep):
            raise SystemExit(f'the copy is not what Python imports ({path}); check PYTHONPATH and '
                             f'the editable install')


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--only', nargs='+', default=None, metavar='NAME', help='run only these mutations')
    parser.add_argument('--list', action='store_true', help='list the mutations and exit')
    parser.add_argument('--baseline', action='store_true',
                        help="also run each mutation's tests on the unmutated copy: a test that fails "
                             "there does not count as catching anything")
    parser.add_argument('--timeout', type=int, default=1800, help='seconds per mutation')
    parser.add_argument('--jobs', type=int, default=1, help='mutations tested at once (each in its own copy)')
    parser.add_argument('--json', default='', help='also write the rows to this file')
    args = parser.parse_args(argv)

    chosen = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        if unknown:
            parser.error(f"unknown mutations: {', '.join(unknown)}; see --list")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in chosen:
            print(f'{m.name}: {m.path}: {m.what}\n    ' + '\n    '.join(m.tests))
        return 0

    with tempfile.TemporaryDirectory(prefix='mutations-') as scratch:
        clean = os.path.join(scratch, 'clean')
        _copy_tree(clean)
        _check_copy_is_used(clean)
        baseline: Dict[str, str] = {}

        def run_baseline(tests: Tuple[str, ...]) -> None:
            outcomes = _run_tests(clean, tests, args.timeout)
            baseline.update(outcomes)
            print(f'unmutated: {outcomes}', flush=True)
        def one(m: Mutation) -> dict:
            tree = os.path.join(scratch, m.name)
            shutil.copytree(clean, tree, symlinks=True)
            start = time.perf_counter()
            problem = _apply(m, tree)
            if problem:
                row = dict(mutation=m.name, status='stale', detail=problem, caught_by=[], outcomes={})
            else:
                outcomes = _run_tests(tree, m.tests, args.timeout)
                caught = sorted(t for t, o in outcomes.items() if o in ('failed', 'timeout', 'error'))
                row = dict(mutation=m.name, status='caught' if caught else 'NOT CAUGHT',
                           detail=m.what, caught_by=caught, outcomes=outcomes)
            row['seconds'] = round(time.perf_counter() - start, 1)
            print(f"{row['mutation']}: {row['status']} ({row['seconds']} s) "
                  f"{', '.join(row['caught_by']) or row['detail']}", flush=True)
            shutil.rmtree(tree, ignore_errors=True)
            return row

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            groups = list(dict.fromkeys(m.tests for m in chosen)) if args.baseline else []
            base_jobs = [pool.submit(run_baseline, tests) for tests in groups]
            rows = list(pool.map(one, chosen))
            for job in base_jobs:
                job.result()

    if baseline:
        # a test that fails without the mutation proves nothing about it
        for row in rows:
            row['caught_by'] = [t for t in row['caught_by'] if baseline.get(t) != 'failed']
            if row['status'] == 'caught' and not row['caught_by']:
                row['status'] = 'NOT CAUGHT (its tests fail unmutated)'
        print('\nunmutated: ' + ', '.join(f'{t} {o}' for t, o in sorted(baseline.items())))
    print('\n| mutation | file | status | caught by |\n| --- | --- | --- | --- |')
    paths = {m.name: m.path for m in MUTATIONS}
    for row in rows:
        print(f"| {row['mutation']} | {paths[row['mutation']]} | {row['status']} | "
              f"{'<br>'.join(row['caught_by']) or row['detail']} |")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(rows=rows, baseline=baseline), f, indent=2)
    return 0 if all(r['status'] == 'caught' for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())

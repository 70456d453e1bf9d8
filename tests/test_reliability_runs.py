"""Issue 20, weights and runs, probed as an attacker and a careless user would.

* No weight file runs code, on any path, with or without ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
  (a marker-file pickle: the test asserts the marker was NOT created).
* Every write is atomic: real SIGKILLs at every checkpoint-write point (a test-only driver kills
  its own process with SIGKILL just before the n-th ``os.replace`` / ``os.fsync``), then resume.
* No command rewrites another run's folder (hash of every file before and after); a planted
  symlink is never followed; a resume under changed settings is refused or recorded.
"""
import hashlib
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import maformer_zoo  # noqa: F401  (registers the models)
from maformer_zoo.errors import CorruptCheckpointError, UnsafeCheckpointError
from maformer_zoo.training import TrainConfig, train
from maformer_zoo.training.run_folder import RunFolderError, check_run_folder, run_artifacts
from maformer_zoo.utils.atomic import atomic_write, write_atomic
from maformer_zoo.weights import load_checkpoint_file

from conftest import ROOT  # noqa: E402
FORCE = 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'

# Runs a script with SIGKILL at a chosen point: KILL_AT='replace:<file name>:<k>' kills just before
# the k-th os.replace onto that name (the temp file is complete, the rename not done);
# 'fsync::<k>' just before the k-th os.fsync (the temp file written, not flushed).
_DRIVER = r'''
import os, runpy, signal, sys
kind, name, k = os.environ.pop('KILL_AT').split(':')
real, seen = getattr(os, kind), [0]
def hook(*args, **kwargs):
    if kind == 'fsync' or os.path.basename(os.fspath(args[1])) == name:
        seen[0] += 1
        if seen[0] == int(k):
            os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(os, kind, hook)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def _run(args, env=None, kill_at=None, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', **(env or {}))
    cmd = [sys.executable, *map(str, args)]
    if kill_at:
        env['KILL_AT'] = kill_at
        cmd = [sys.executable, '-c', _DRIVER, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _digest(folder):
    folder = pathlib.Path(folder)
    def kind(p):
        return os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else 'dir'
    return {str(p.relative_to(folder)): kind(p) for p in sorted(folder.rglob('*'))}


class _RunsCode:
    """Unpickling this creates a file: stands for any code a malicious file would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _evil_files(folder):
    """Code-running pickles in every container and under many names (detectron2's `.pyth` included)."""
    marker = folder / 'code_ran'
    files = {}
    for name in ('evil.pyth', 'evil.pth', 'evil.bin', 'evil.safetensors'):
        torch.save({'model': {'w': torch.zeros(2)}, 'payload': _RunsCode(marker)}, folder / name)
        files[name] = folder / name
    torch.save({'state_dict': _RunsCode(marker)}, folder / 'legacy.pth', _use_new_zipfile_serialization=False)
    with open(folder / 'plain.pkl', 'wb') as f:
        pickle.dump({'model': {'w': np.zeros(2)}, '__author__': 'x', 'payload': _RunsCode(marker)}, f, protocol=2)
    files.update({'legacy.pth': folder / 'legacy.pth', 'plain.pkl': folder / 'plain.pkl'})
    return marker, files


# --------------------------------------------------------------------------- no file runs code


@pytest.mark.parametrize('force', ['0', '1'])
def test_every_library_route_refuses_code_by_content(tmp_path, monkeypatch, force):
    """Every in-process route, each evil file, with the variable off and on.

    Mutations caught: detectron2's ``_load_file`` reached for ``.pyth`` (marker created with force=1);
    ``weights_only`` left to torch's default (marker created with force=1); routing by extension
    (``evil.safetensors`` read as safetensors: corrupt, not refused).
    """
    monkeypatch.setenv(FORCE, force)
    import timm
    from detectron2_ext.checkpoint import SafeDetectionCheckpointer
    from maformer_zoo.weights import pretrained_overlay
    from maformer_zoo.training.checkpoint import load_training_checkpoint
    marker, files = _evil_files(tmp_path)
    routes = {
        'reader': load_checkpoint_file,
        'detectron2 checkpointer': lambda p: SafeDetectionCheckpointer(torch.nn.Linear(2, 2)).load(str(p)),
        'hub source': pretrained_overlay,
        'training resume': load_training_checkpoint,
        'MODEL.TIMM.CHECKPOINT': lambda p: pretrained_overlay(p, 'resnet18_mscsa'),
        'timm overlay (ours)': lambda p: timm.create_model('resnet18_mscsa', pretrained=True,
                                                           pretrained_cfg_overlay=dict(file=str(p))),
    }
    for route, load in routes.items():
        for name, path in files.items():
            with pytest.raises(UnsafeCheckpointError, match='needs') as info:
                load(path)
            assert '\n' not in str(info.value), (route, name)
    assert not marker.exists()


def test_timm_model_overlay_file_runs_no_code_with_the_variable(tmp_path, monkeypatch):
    """timm's own loader (a timm model's ``pretrained_cfg_overlay`` file) passes weights_only=True explicitly."""
    monkeypatch.setenv(FORCE, '1')
    import timm
    marker, files = _evil_files(tmp_path)
    with pytest.raises(Exception):
        timm.create_model('resnet10t', pretrained=True, pretrained_cfg_overlay=dict(file=str(files['evil.pth'])))
    assert not marker.exists()


def test_reader_decides_by_content_and_names_what_is_wrong(tmp_path):
    """A safetensors file called .pkl and a torch file called .safetensors load; garbage is 'not a weight file'.

    Mutation caught: choosing by extension (both loads fail).
    """
    import safetensors.torch
    safetensors.torch.save_file({'w': torch.ones(2)}, tmp_path / 'w.pkl')
    torch.save({'w': torch.full((2,), 2.0)}, tmp_path / 'w.safetensors')
    assert torch.equal(load_checkpoint_file(tmp_path / 'w.pkl')['w'], torch.ones(2))
    assert torch.equal(load_checkpoint_file(tmp_path / 'w.safetensors')['w'], torch.full((2,), 2.0))
    (tmp_path / 'junk.pth').write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CorruptCheckpointError, match='not a weight file'):
        load_checkpoint_file(tmp_path / 'junk.pth')


def _tiny_args(data, out, experiment, *extra):
    return ['--model', 'test_vit', '--data-dir', data, '--img-size', '32', '--batch-size', '4', '--epochs', '1',
            '--warmup-epochs', '0', '--num-workers', '0', '--output', out, '--experiment', experiment,
            '--no-progress', '--device', 'cpu', '--seed', '3', *extra]


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs compute as the OMP_NUM_THREADS=1 subprocesses do (bit-exact comparisons)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp('reliability_images')
    rng = np.random.default_rng(0)
    for split, count in (('train', 4), ('val', 2)):
        for c in range(2):
            (root / split / f'c{c}').mkdir(parents=True)
            for i in range(count):
                pixels = (rng.random((32, 32, 3)) * 80).astype(np.uint8)
                pixels[..., c] += 150
                Image.fromarray(pixels).save(root / split / f'c{c}' / f'{i}.png')
    return root


def _tiny(data, out, experiment, **overrides):
    values = dict(model='test_vit', data_dir=str(data), img_size=32, batch_size=4, epochs=1, warmup_epochs=0,
                  num_workers=0, output=str(out), experiment=experiment, progress=False, device='cpu', seed=3)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize('script', ['train_imagenet', 'validate', 'visualize'])
def test_cli_routes_refuse_code_with_the_variable_set(image_folder, tmp_path, script):
    """train_imagenet --resume, validate --checkpoint and visualize --weights: one line, no code, exit 2.
    Mutation caught: visualize's own ``torch.load`` (a plain pickle: 'use a .pth file', not refused by content)."""
    marker, files = _evil_files(tmp_path)
    evil = files['evil.pyth']
    args = {
        'train_imagenet': _tiny_args(image_folder, tmp_path / 'out', 'a', '--resume', evil),
        'validate': ['--model', 'test_vit', '--checkpoint', evil, '--data-dir', image_folder, '--split', 'val',
                     '--device', 'cpu', '--num-workers', '0'],
        'visualize': ['--model', 'test_vit', '--weights', files['plain.pkl'], '--input',
                      next(image_folder.rglob('*.png')), '--output', tmp_path / 'fig', '--no-erf'],
    }[script]
    proc = _run([ROOT / 'scripts' / f'{script}.py', *args], env={FORCE: '1'})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and 'needs' in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()
    assert not (tmp_path / 'out' / 'a').exists()  # nothing written before the refusal


def _coco(tmp_path):
    from detectron2_ext.data import write_synthetic_coco
    train_set = write_synthetic_coco(str(tmp_path / 'data'), num_images=2, image_size=(64, 80), seed=0, split='train')
    return ['--coco-dataset', 'tn_train', train_set['instances_json'], train_set['image_dir']]


def _small(out, max_iter=2, **extra):
    from test_train_net import small_run  # tests/ is on sys.path under pytest's rootdir import
    opts = small_run(out, max_iter=max_iter)
    opts[opts.index('DATASETS.TEST') + 1] = '()'  # no evaluation: these tests are about files
    for key, value in extra.items():
        opts += [key, str(value)]
    return opts


TRAIN_NET = ROOT / 'scripts' / 'train_net.py'
D2_CONFIG = ROOT / 'configs' / 'COCO-InstanceSegmentation' / 'mask_rcnn_resnet18_mscsa_fine_fpn_1x.yaml'


@pytest.mark.parametrize('force', [pytest.param('0', marks=pytest.mark.slow), '1'])
def test_train_net_eval_only_pyth_runs_no_code(tmp_path, force):
    """The issue's probe: ``--eval-only MODEL.WEIGHTS evil.pyth`` under the variable. Mutation caught:
    ``_load_file`` delegating ``.pyth`` to detectron2 (marker created, traceback)."""
    pytest.importorskip('detectron2')
    marker, files = _evil_files(tmp_path)
    proc = _run([TRAIN_NET, *_coco(tmp_path), '--config-file', D2_CONFIG, '--eval-only', *_small(tmp_path / 'ev'),
                 'MODEL.WEIGHTS', files['evil.pyth']], env={FORCE: force})
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith('error:')]
    assert proc.returncode == 2 and len(errors) == 1 and 'needs' in errors[0], proc.stderr[-2000:]
    assert not marker.exists()


@pytest.mark.slow
def test_demo_and_timm_checkpoint_routes_run_no_code(tmp_path):
    """demo.py MODEL.WEIGHTS and train_net MODEL.TIMM.CHECKPOINT with the variable set."""
    pytest.importorskip('detectron2')
    marker, files = _evil_files(tmp_path)
    env = {FORCE: '1'}
    proc = _run([ROOT / 'scripts' / 'demo.py', '--output-dir', tmp_path / 'demo', '--num-train', '2', '--num-val',
                 '1', '--image-size', '64', '--max-iter', '1', 'MODEL.WEIGHTS', files['evil.pyth']], env=env)
    assert proc.returncode == 2 and '[demo] error: Refused' in proc.stderr, proc.stderr[-2000:]
    proc = _run([TRAIN_NET, *_coco(tmp_path), '--config-file', D2_CONFIG, *_small(tmp_path / 'tc'),
                 'MODEL.TIMM.PRETRAINED', 'True', 'MODEL.TIMM.CHECKPOINT', files['legacy.pth']], env=env)
    assert proc.returncode == 2 and 'needs' in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()


# ------------------------------------------------------------------------------- atomic writes


def test_atomic_write_never_follows_a_planted_symlink(tmp_path):
    """Symlinks planted at the target and at every guessable temp name point at a victim; it stays intact.

    Mutation caught: ``open(path + '.tmp', 'w')`` (the victim is overwritten through the link).
    """
    from detectron2_ext.checkpoint import SafeDetectionCheckpointer
    from maformer_zoo.training.checkpoint import save_checkpoint
    victim = tmp_path / 'victim'
    victim.write_bytes(b'precious')
    run = tmp_path / 'run'
    run.mkdir()
    for name in ('last.pth', 'last_checkpoint', 'model_final.pth'):
        for planted in (f'{name}.tmp', f'.{name}.tmp', f'{name}.tmp.0'):
            (run / planted).symlink_to(victim)
    (run / 'last.pth').symlink_to(victim)
    save_checkpoint(str(run / 'last.pth'), {'epoch': 1})
    SafeDetectionCheckpointer(torch.nn.Linear(2, 2), save_dir=str(run)).save('model_final')
    assert victim.read_bytes() == b'precious'
    assert not (run / 'last.pth').is_symlink() and load_checkpoint_file(run / 'last.pth')['epoch'] == 1
    assert (run / 'last_checkpoint').read_text() == 'model_final.pth'


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    """Mutation caught: writing into the target itself (it holds the half-written text)."""
    target = tmp_path / 'metrics.json'
    write_atomic(target, 'old')
    with pytest.raises(ZeroDivisionError):
        with atomic_write(target, 'w') as f:
            f.write('new, half')
            1 / 0
    assert target.read_text() == 'old' and sorted(os.listdir(tmp_path)) == ['metrics.json']


_D2_SAVE = r'''
import sys, torch
from detectron2_ext.checkpoint import SafeDetectionCheckpointer
torch.manual_seed(int(sys.argv[2]))
SafeDetectionCheckpointer(torch.nn.Linear(64, 64), save_dir=sys.argv[1]).save(sys.argv[3])
'''


@pytest.mark.parametrize('kill_at', [pytest.param('fsync::1', marks=pytest.mark.slow), 'replace:model_final.pth:1',
                                     pytest.param('fsync::2', marks=pytest.mark.slow),
                                     pytest.param('replace:last_checkpoint:1', marks=pytest.mark.slow)])
def test_sigkill_in_detectron2_checkpoint_save_leaves_a_resumable_run(tmp_path, kill_at):
    """train_net's checkpointer killed (SIGKILL) at each of its write points while extending a run.

    Mutation caught: fvcore's in-place save (``model_final.pth`` truncated while ``last_checkpoint``
    names it) and a non-atomic ``last_checkpoint``.
    """
    pytest.importorskip('detectron2')
    from detectron2_ext.checkpoint import SafeDetectionCheckpointer
    script = tmp_path / 'save.py'
    script.write_text(_D2_SAVE)
    run = tmp_path / 'run'
    assert _run([script, run, 0, 'model_0000009']).returncode == 0
    first = (run / 'model_0000009.pth').read_bytes()
    proc = _run([script, run, 1, 'model_final'], kill_at=kill_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    named = run / (run / 'last_checkpoint').read_text()
    assert named.name in ('model_0000009.pth', 'model_final.pth')
    model = torch.nn.Linear(64, 64)
    SafeDetectionCheckpointer(model, save_dir=str(run)).resume_or_load('', resume=True)  # complete, loadable
    assert (run / 'model_0000009.pth').read_bytes() == first
    if (run / 'model_final.pth').exists():
        assert set(load_checkpoint_file(run / 'model_final.pth')['model']) == {'weight', 'bias'}


def _imagenet_kill_points():
    # per epoch: summary.csv, last.pth, checkpoint-1.pth, model_best.pth, model_best.safetensors (+ config.yaml,
    # summary.json)
    return [f'replace:{n}:1' for n in ('config.yaml', 'summary.csv', 'last.pth', 'checkpoint-1.pth', 'model_best.pth',
                                        'model_best.safetensors', 'summary.json')] + [f'fsync::{k}' for k in range(1, 7)]


@pytest.mark.parametrize('kill_at', [k if k == 'replace:last.pth:1' else pytest.param(k, marks=pytest.mark.slow)
                                     for k in _imagenet_kill_points()])
def test_sigkill_at_every_imagenet_write_point_then_resume_matches(image_folder, tmp_path, kill_at):
    """train_imagenet killed (SIGKILL) at each write of its first epoch, then ``--resume auto``: the
    result is bit for bit the uninterrupted run's. Mutation caught: ``torch.save`` onto ``last.pth``
    in place (resume fails on a truncated file); no re-link of a checkpoint-1.pth missing after a kill in
    ``RunSaver.resume`` (best_epoch None after resume at ``replace:checkpoint-1.pth:1``)."""
    reference = train(_tiny(image_folder, tmp_path / 'ref', 'run'))
    args = _tiny_args(image_folder, tmp_path / 'out', 'run')
    proc = _run([ROOT / 'scripts' / 'train_imagenet.py', *args], kill_at=kill_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / 'out' / 'run'
    if (run / 'last.pth').exists():
        assert load_checkpoint_file(run / 'last.pth')['epoch'] == 1  # complete or absent, never partial
    summary = train(_tiny(image_folder, tmp_path / 'out', 'run', resume='auto'))
    assert summary['epochs_done'] == 1 and summary['best_epoch'] == reference['best_epoch']
    a = load_checkpoint_file(tmp_path / 'ref' / 'run' / 'last.pth')['state_dict']
    b = load_checkpoint_file(run / 'last.pth')['state_dict']
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint_file(run / 'model_best.safetensors').keys() == a.keys()


# ------------------------------------------------------------------------ no run is rewritten


@pytest.mark.parametrize('names', [('config.yaml', 'metrics.json', 'log.txt'), ('checkpoint-3.pth',),
                                   ('model_best.safetensors',), ('last_checkpoint',), ('summary.csv',)])
def test_any_run_artifact_marks_a_run_folder(tmp_path, names):
    """The issue's folders that were 'not seen as a run'. Mutation caught: the old list of 6 names."""
    for name in names:
        (tmp_path / name).write_text('x')
    assert run_artifacts(str(tmp_path)) == sorted(names)
    with pytest.raises(RunFolderError, match='already holds a run'):
        check_run_folder(str(tmp_path), 'x')
    check_run_folder(str(tmp_path), 'x', resuming=True)


def test_file_and_dangling_symlink_are_not_folders(tmp_path):
    """The issue's `--output` that is a file and dangling-symlink experiment. Mutation caught: testing
    ``os.path.exists`` (a dangling link does not exist, so it was taken for a new folder)."""
    (tmp_path / 'file').write_text('x')
    (tmp_path / 'dangling').symlink_to(tmp_path / 'nowhere')
    for name in ('file', 'dangling'):
        with pytest.raises(RunFolderError, match='not a folder'):
            check_run_folder(str(tmp_path / name), name)


def test_resume_of_another_run_never_touches_the_target(image_folder, tmp_path):
    """The issue's probe: ``--experiment A --resume runs/B/last.pth`` rewrote A. Now refused, A and B
    byte-identical; into a new folder it starts a new run from B. Mutation caught: ``resuming`` from
    ``--resume`` being set rather than from the file being in the run folder."""
    train(_tiny(image_folder, tmp_path, 'A'))
    train(_tiny(image_folder, tmp_path, 'B'))
    before = _digest(tmp_path)
    with pytest.raises(RunFolderError, match='already holds a run'):
        train(_tiny(image_folder, tmp_path, 'A', resume=str(tmp_path / 'B' / 'last.pth'), epochs=2))
    assert _digest(tmp_path) == before
    summary = train(_tiny(image_folder, tmp_path, 'C', resume=str(tmp_path / 'B' / 'last.pth')))
    assert summary['epochs_done'] == 1 and _digest(tmp_path / 'B') == {k[2:]: v for k, v in before.items()
                                                                        if k.startswith('B/')}


def test_resume_with_changed_settings_is_refused_or_recorded(image_folder, tmp_path):
    """The issue's probe: ``--resume auto --lr 0.001 --smoothing 0.2`` continued silently and rewrote config.yaml.

    Mutation caught: no comparison (the run continues), or config.yaml rewritten with the new values.
    """
    train(_tiny(image_folder, tmp_path, 'run', epochs=2, stop_epoch=1))
    before = _digest(tmp_path / 'run')
    with pytest.raises(RunFolderError, match=r"lr: 0\.001 -> 0\.01; smoothing: 0\.1 -> 0\.2.*--allow-changes"):
        train(_tiny(image_folder, tmp_path, 'run', epochs=2, resume='auto', lr=0.01, smoothing=0.2))
    assert _digest(tmp_path / 'run') == before
    train(_tiny(image_folder, tmp_path, 'run', epochs=2, resume='auto', lr=0.01, smoothing=0.2, allow_changes=True))
    record = yaml.safe_load((tmp_path / 'run' / 'config_changes.yaml').read_text())
    assert record == [{'from': 'epoch 1', 'changed': {'lr': {'before': 0.001, 'after': 0.01},
                                                      'smoothing': {'before': 0.1, 'after': 0.2}}}]
    assert yaml.safe_load((tmp_path / 'run' / 'config.yaml').read_text())['lr'] == 0.001  # as the run started


def test_validate_results_file_is_never_replaced(image_folder, tmp_path):
    """Mutation caught: no existence check (the earlier file is replaced after the evaluation)."""
    from maformer_zoo.training import EvalConfig, validate
    (tmp_path / 'results.json').write_text('earlier')
    cfg = EvalConfig(model='test_vit', data_dir=str(image_folder), split='val',
                     results_file=str(tmp_path / 'results.json'), device='cpu', num_workers=0)
    with pytest.raises(RunFolderError, match='exists'):
        validate(cfg)
    assert (tmp_path / 'results.json').read_text() == 'earlier'


def test_train_net_resume_compares_the_saved_config(tmp_path):
    """``_check_resume`` of scripts/train_net.py against a saved run (no training needed). Mutation
    caught: no comparison (BASE_LR change accepted), or DATALOADER.NUM_WORKERS not in RESUME_MAY_CHANGE."""
    pytest.importorskip('detectron2')
    import importlib.util
    import argparse
    from detectron2_ext.config_file import load_config
    spec = importlib.util.spec_from_file_location('train_net_script', TRAIN_NET)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run = tmp_path / 'run'
    run.mkdir()
    cfg = load_config(str(D2_CONFIG), _small(run))
    (run / 'config.yaml').write_text(cfg.dump())
    (run / 'model_final.pth').write_bytes(b'x')
    (run / 'last_checkpoint').write_text('model_final.pth')
    before = _digest(run)
    changed = load_config(str(D2_CONFIG), _small(run, **{'SOLVER.BASE_LR': 0.1, 'DATALOADER.NUM_WORKERS': 1}))
    with pytest.raises(RunFolderError, match=r'SOLVER\.BASE_LR: 0\.0002 -> 0\.1'):
        script._check_resume(changed, argparse.Namespace(allow_changes=False), record=True)
    assert _digest(run) == before
    script._check_resume(cfg, argparse.Namespace(allow_changes=False), record=True)  # same settings: fine
    script._check_resume(changed, argparse.Namespace(allow_changes=True), record=True)
    record = yaml.safe_load((run / 'config_changes.yaml').read_text())
    assert record == [{'from': 'checkpoint model_final.pth', 'changed': {'SOLVER.BASE_LR': {'before': 0.0002,
                                                                                            'after': 0.1}}}]
    (run / 'last_checkpoint').write_text('')
    with pytest.raises(FileNotFoundError, match='not a checkpoint file'):
        script._check_resume(cfg, argparse.Namespace(allow_changes=False), record=False)


@pytest.mark.slow
def test_train_net_and_demo_leave_other_runs_byte_identical(tmp_path):
    """A run folder with config/metrics/log but no checkpoint, demo's OUTPUT_DIR override, and
    ``--eval-only`` (its own eval-N subfolder) leave the run's files as they were."""
    pytest.importorskip('detectron2')
    coco = _coco(tmp_path)
    run = tmp_path / 'run'
    assert _run([TRAIN_NET, *coco, '--config-file', D2_CONFIG, *_small(run, max_iter=1)]).returncode == 0
    before = _digest(run)
    proc = _run([TRAIN_NET, *coco, '--config-file', D2_CONFIG, '--eval-only', *_small(run), 'MODEL.WEIGHTS',
                 run / 'model_final.pth'])
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = _digest(run)
    assert {k: v for k, v in after.items() if not k.startswith('eval-1')} == before and 'eval-1/config.yaml' in after
    proc = _run([ROOT / 'scripts' / 'demo.py', '--output-dir', tmp_path / 'demo', '--num-train', '2', '--num-val', '1',
                 '--max-iter', '1', 'OUTPUT_DIR', run])
    assert proc.returncode == 2 and 'already holds a run' in proc.stderr
    partial = tmp_path / 'partial'
    partial.mkdir()
    for name in ('config.yaml', 'metrics.json', 'log.txt'):
        (partial / name).write_text('earlier')
    proc = _run([TRAIN_NET, *coco, '--config-file', D2_CONFIG, *_small(partial)])
    assert proc.returncode == 2 and 'already holds a run' in proc.stderr, proc.stderr[-2000:]
    proc = _run([TRAIN_NET, *coco, '--config-file', D2_CONFIG, '--resume', *_small(partial)])
    assert proc.returncode == 2 and "is not the run's config" in proc.stderr, proc.stderr[-2000:]
    assert all((partial / n).read_text() == 'earlier' for n in ('config.yaml', 'metrics.json', 'log.txt'))
    assert _digest(run) == after


@pytest.mark.slow
@pytest.mark.parametrize('kill_at', ['replace:model_0000000.pth:1', 'replace:last_checkpoint:1',
                                     'replace:model_final.pth:1', 'replace:last_checkpoint:2'])
def test_sigkill_at_every_train_net_checkpoint_write_then_resume(tmp_path, kill_at):
    """A real train_net run (2 iterations, a checkpoint after each) killed at each checkpoint write, then
    ``--resume``: the folder always names a complete checkpoint and the resumed run finishes."""
    pytest.importorskip('detectron2')
    coco = _coco(tmp_path)
    run = tmp_path / 'run'
    args = [TRAIN_NET, *coco, '--config-file', D2_CONFIG, *_small(run)]
    assert _run(args, kill_at=kill_at).returncode == -signal.SIGKILL
    if (run / 'last_checkpoint').exists():
        assert load_checkpoint_file(run / (run / 'last_checkpoint').read_text())['model']
    proc = _run([TRAIN_NET, *coco, '--config-file', D2_CONFIG, '--resume', *_small(run)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the last iteration's weights: model_final.pth, or model_0000001.pth when the kill hit model_final's
    # save (detectron2 then has no iteration left to run, so writes no model_final)
    assert load_checkpoint_file(run / (run / 'last_checkpoint').read_text())['iteration'] == 1


@pytest.mark.slow
def test_sigkill_on_resume_keeps_config_and_metrics_whole(tmp_path):
    """train_net killed at its final checkpoint, then a ``--resume`` killed as it writes config.yaml, then
    ``--resume`` to the end: config.yaml stays the complete earlier file, and metrics.json holds each
    iteration once (the row of iteration 19, written after checkpoint 14, is dropped and written again).

    Mutations caught: detectron2's ``default_setup`` (config.yaml written in place: no rename, so the
    second run is not killed there), no cut of metrics.json on resume (iteration 19 twice).
    """
    pytest.importorskip('detectron2')
    coco = _coco(tmp_path)
    run = tmp_path / 'run'
    opts = _small(run, max_iter=24, **{'SOLVER.CHECKPOINT_PERIOD': 15})
    assert _run([TRAIN_NET, *coco, '--config-file', D2_CONFIG, *opts],
                kill_at='replace:model_final.pth:1').returncode == -signal.SIGKILL
    assert (run / 'last_checkpoint').read_text() == 'model_0000014.pth'
    config = (run / 'config.yaml').read_bytes()
    # TEST.EVAL_PERIOD: a setting a resume may change, so the config.yaml it writes differs
    resume = [TRAIN_NET, *coco, '--config-file', D2_CONFIG, '--resume', *opts, 'TEST.EVAL_PERIOD', '100']
    assert _run(resume, kill_at='replace:config.yaml:1').returncode == -signal.SIGKILL
    assert (run / 'config.yaml').read_bytes() == config
    proc = _run(resume)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (run / 'metrics.json').read_text().splitlines()]
    assert [r['iteration'] for r in rows] == [19, 23]
    assert yaml.safe_load((run / 'config.yaml').read_text())['TEST']['EVAL_PERIOD'] == 100

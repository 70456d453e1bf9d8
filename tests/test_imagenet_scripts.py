"""Training / fine-tuning / validation scripts (issue 8) on a tiny generated image folder, on CPU.

The folder has 3 classes told apart by colour, 6 training and 3 validation images each (32x32),
so every run here takes seconds. Exactness checks (resume, gradient accumulation) compare bit for
bit; the 2-process run is compared within a tolerance explained in its test.
"""
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
import timm

import maformer_zoo  # noqa: F401
from maformer_zoo.training import ConfigError, DatasetError, TrainConfig, UnknownModelError, parse_config, train
from maformer_zoo.training.modeling import create_model_for_run

from conftest import ROOT, script_env
RECIPES = os.path.join(ROOT, 'configs', 'imagenet')


def _script(name, *args, check=True):
    """scripts/<name>.py in a subprocess, as a user runs it."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', f'{name}.py'), *map(str, args)],
                          capture_output=True, text=True, timeout=600,
                          env=script_env(OMP_NUM_THREADS='1'))
    assert not check or proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _write_folder(root, classes=3, train=6, val=3, size=32, seed=0):
    rng = np.random.default_rng(seed)
    for split, count in (('train', train), ('val', val)):
        for c in range(classes):
            folder = os.path.join(root, split, f'class_{c}')
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = (rng.random((size, size, 3)) * 80).astype(np.uint8)
                pixels[..., c % 3] += 150
                Image.fromarray(pixels).save(os.path.join(folder, f'{i}.png'))
    return root


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    return _write_folder(str(tmp_path_factory.mktemp('tiny_imagefolder')))


def _tiny(data_dir, out, experiment, **overrides):
    values = dict(model='test_vit', data_dir=data_dir, img_size=32, batch_size=4, epochs=2, warmup_epochs=0,
                  num_workers=0, output=str(out), experiment=experiment, progress=False, device='cpu', seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def _steps(run_dir):
    with open(os.path.join(run_dir, 'train_steps.csv')) as f:
        return list(csv.DictReader(f))


def _weights(path, key='state_dict'):
    return torch.load(path, map_location='cpu', weights_only=True)[key]


# ---------------------------------------------------------------------------------------------
# configuration


def test_yaml_base_inheritance_and_command_line_overrides(tmp_path):
    (tmp_path / 'parent.yaml').write_text('lr: 1e-3\nepochs: 10\nscale: [0.5, 1.0]\nmodel_kwargs: {a: 1}\n')
    (tmp_path / 'child.yaml').write_text('_BASE_: parent.yaml\nepochs: 20\nmodel: test_vit\n')
    cfg = parse_config(TrainConfig, ['-c', str(tmp_path / 'child.yaml'), '--epochs', '30', '--no-augment',
                                     '--scale', '0.2', '1.0', '--clip-grad', 'none', '--model-kwargs', '{b: 2}'])
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)  # YAML 1.1 reads '1e-3' as a string
    assert cfg.epochs == 30 and cfg.model == 'test_vit'  # command line > child > parent
    assert cfg.augment is False and cfg.scale == [0.2, 1.0] and cfg.clip_grad is None
    assert cfg.model_kwargs == {'b': 2}
    assert parse_config(TrainConfig, ['-c', str(tmp_path / 'child.yaml')]).epochs == 20
    with pytest.raises(ConfigError, match="did you mean warmup_epochs"):
        TrainConfig(warmup_epoch=3)
    with pytest.raises(ConfigError, match="'epochs'"):
        TrainConfig(epochs='many')


MSCSA_RECIPES = ['resnet18_mscsa', 'resnet50_mscsa', 'pvt_v2_b0_mscsa', 'pvt_v2_b1_mscsa', 'pvt_v2_b2_mscsa',
                 'swin_tiny_patch4_window7_224_mscsa', 'convnext_tiny_mscsa']


@pytest.mark.parametrize('name', MSCSA_RECIPES + ['maformer_s', 'maformer_b', 'maformer_l'])
def test_recipes_follow_the_papers(name):
    cfg = parse_config(TrainConfig, ['-c', os.path.join(RECIPES, f'{name}.yaml')])
    assert cfg.model == name and timm.is_model(name)
    # Both papers: AdamW, weight decay 0.05, batch 1024 (8 x 128), cosine, 300 epochs, 224 px.
    assert (cfg.opt, cfg.weight_decay, cfg.sched, cfg.epochs, cfg.img_size) == ('adamw', 0.05, 'cosine', 300, 224)
    assert cfg.batch_size * 8 == cfg.lr_base_batch_size == 1024
    assert cfg.smoothing == 0.1 and cfg.reprob > 0 and cfg.aa.startswith('rand-')
    if name.startswith('maformer'):  # MAFormer Sec. 4.2 / Table 1
        lr, drop_path = {'maformer_s': (1.6e-3, 0.1), 'maformer_b': (1.6e-3, 0.3), 'maformer_l': (1.2e-3, 0.4)}[name]
        assert (cfg.lr, cfg.drop_path_rate, cfg.warmup_epochs) == (lr, drop_path, 5)
        assert cfg.cutmix > 0 and cfg.model_ema
    else:  # MSCSA Appendix C.1
        warmup = 20 if name.startswith(('swin', 'convnext')) else 5
        assert (cfg.lr, cfg.warmup_epochs) == (1e-3, warmup)
        assert cfg.mixup > 0 and cfg.cutmix > 0 and cfg.aug_repeats == 3 and cfg.drop_path_rate > 0


# ---------------------------------------------------------------------------------------------
# training, validation, resume


def test_train_two_epochs_then_validate_script_agrees(image_folder, tmp_path):
    _script('train_imagenet', '--model', 'test_vit', '--data-dir', image_folder, '--img-size', '32',
            '--batch-size', '4', '--epochs', '2', '--warmup-epochs', '0', '--num-workers', '0',
            '--output', tmp_path, '--experiment', 'run', '--no-progress', '--device', 'cpu', '--lr', '3e-3')
    run = tmp_path / 'run'
    with open(run / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['epoch'] for r in rows] == ['1', '2'] and {'train_loss', 'eval_top1', 'eval_top5', 'lr'} <= set(rows[0])
    steps = _steps(run)
    assert len(steps) == 8  # 18 images // batch 4 = 4 steps per epoch
    assert float(rows[1]['train_loss']) < float(steps[0]['loss'])  # it learns
    best = json.loads((run / 'summary.json').read_text())['best_epoch']  # timm's CheckpointSaver keeps the best
    for name in ('last.pth', f'checkpoint-{best}.pth', 'model_best.pth', 'model_best.safetensors'):
        assert (run / name).is_file(), name
    assert torch.load(run / 'model_best.pth', weights_only=True)['epoch'] == best
    # validate.py on the last checkpoint = the training run's own evaluation of epoch 2
    results = json.loads(_script('validate', '--model', 'test_vit', '--checkpoint', run / 'last.pth', '--data-dir',
                                 image_folder, '--split', 'validation', '--num-workers', '0', '--no-progress',
                                 '--device', 'cpu').stdout)
    assert results['count'] == 9 and results['input_size'] == [3, 32, 32]
    assert results['top1'] == pytest.approx(float(rows[1]['eval_top1']), abs=1e-3)
    assert results['loss'] == pytest.approx(float(rows[1]['eval_loss']), abs=1e-4)
    # timm's data-config resolution: explicit options beat the checkpoint's stored preprocessing
    results = json.loads(_script('validate', '--model', 'test_vit', '--checkpoint', run / 'last.pth', '--data-dir',
                                 image_folder, '--img-size', '48', '--crop-pct', '0.5', '--interpolation',
                                 'bilinear', '--num-workers', '0', '--no-progress', '--device', 'cpu').stdout)
    assert (results['input_size'], results['crop_pct'], results['interpolation']) == ([3, 48, 48], 0.5, 'bilinear')


@pytest.mark.parametrize('num_workers', [0, 2])
def test_resume_after_epoch_one_matches_uninterrupted_run(image_folder, tmp_path, num_workers):
    # every source of randomness on: augmentation, random erasing, mixup/cutmix, drop path, EMA;
    # with worker processes the augmentation runs there, seeded from the checkpointed main RNG
    random_parts = dict(aa='rand-m9-mstd0.5-inc1', reprob=0.25, mixup=0.8, cutmix=1.0, drop_path_rate=0.1,
                        model_ema=True, model_ema_decay=0.9, warmup_epochs=1, num_workers=num_workers)
    full = train(_tiny(image_folder, tmp_path, 'full', **random_parts))
    first = train(_tiny(image_folder, tmp_path, 'split', stop_epoch=1, **random_parts))
    assert first['epochs_done'] == 1 and full['epochs_done'] == 2
    resumed = train(_tiny(image_folder, tmp_path, 'split', resume='auto', **random_parts))
    assert resumed['epochs_done'] == 2 and resumed['optimizer_steps'] == full['optimizer_steps']
    full_steps, split_steps = _steps(tmp_path / 'full'), _steps(tmp_path / 'split')
    assert full_steps == split_steps  # same loss and lr at every step, epoch 2 included
    for key in ('state_dict', 'state_dict_ema'):
        a, b = _weights(tmp_path / 'full' / 'last.pth', key), _weights(tmp_path / 'split' / 'last.pth', key)
        assert all(torch.equal(a[k], b[k]) for k in a), key


def test_gradient_accumulation_equals_the_larger_batch(image_folder, tmp_path):
    # SGD (Adam would hide a wrongly scaled gradient), constant lr (the two runs have different
    # steps per epoch) and no randomness in the data
    plain = dict(augment=False, smoothing=0.0, epochs=1, sched='step', decay_epochs=100, opt='sgd', lr=0.05)
    train(_tiny(image_folder, tmp_path, 'big', batch_size=4, **plain))
    train(_tiny(image_folder, tmp_path, 'accum', batch_size=2, grad_accum_steps=2, **plain))
    big, accum = _steps(tmp_path / 'big'), _steps(tmp_path / 'accum')
    # 9 micro-batches of 2 = 4 steps over the same 4 images as the big batches, then a 5th step on
    # the remaining micro-batch (the big-batch loader drops that incomplete batch)
    assert len(big) == 4 and len(accum) == 5
    # equal losses at steps 2..4 mean the accumulated updates equalled the big-batch updates
    for a, b in zip(big, accum):
        assert float(a['loss']) == pytest.approx(float(b['loss']), rel=1e-5)


def test_two_process_torchrun_matches_one_process(image_folder, tmp_path):
    """2 processes x batch 2 (gloo, CPU) vs 1 process x batch 4: same images per step, the same
    weights after 8 plain SGD steps (no momentum, no weight decay, constant lr), within round-off.

    test_vit has LayerNorm only (no BatchNorm statistics that depend on the per-process batch) and
    augmentation is off, so the runs differ only in the order of floating-point reductions (DDP
    averages two half-batch means). Plain SGD moves each weight by lr x gradient, so a gradient
    scaled by the number of processes (a sum where the mean belongs) doubles every step and shows
    as a difference the size of the training movement itself; round-off is ~1e-7 of it, and the
    bound, 1e-4 of the movement, sits between the two. (timm's ``sgd`` is Nesterov SGD, which
    refuses momentum 0; ``momentum`` is plain SGD.)

    Mutation caught (dev/mutations.py): ``ddp-gradient-sum`` (the loss, and so the all-reduced
    gradient, multiplied by the number of processes: a sum instead of a mean).
    """
    common = ['--model', 'test_vit', '--data-dir', image_folder, '--img-size', '32', '--epochs', '2',
              '--warmup-epochs', '0', '--num-workers', '0', '--output', str(tmp_path), '--no-progress',
              '--no-augment', '--device', 'cpu', '--dist-backend', 'gloo', '--seed', '5',
              '--opt', 'momentum', '--momentum', '0', '--weight-decay', '0', '--lr', '0.05',
              '--sched', 'step', '--decay-epochs', '100', '--smoothing', '0']
    torchrun = os.path.join(os.path.dirname(sys.executable), 'torchrun')
    env = script_env(OMP_NUM_THREADS='1')
    proc = subprocess.run([torchrun, '--standalone', '--nproc_per_node', '2',
                           os.path.join(ROOT, 'scripts', 'train_imagenet.py'), *common,
                           '--batch-size', '2', '--experiment', 'ddp'],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _script('train_imagenet', *common, '--batch-size', '4', '--experiment', 'single')
    ddp = torch.load(tmp_path / 'ddp' / 'last.pth', map_location='cpu', weights_only=True)
    single = _weights(tmp_path / 'single' / 'last.pth')
    assert ddp['num_updates'] == 8 and len(ddp['rng']) == 2  # both processes' RNG states are saved
    torch.manual_seed(5)
    init = timm.create_model('test_vit', num_classes=3).state_dict()
    moved = max((single[k] - init[k]).abs().max().item() for k in single)
    diff = max((single[k] - ddp['state_dict'][k]).abs().max().item() for k in single)
    assert moved > 1e-3
    assert diff < 1e-4 * moved, (diff, moved)


def test_finetune_from_file_with_new_num_classes(image_folder, tmp_path):
    train(_tiny(image_folder, tmp_path, 'source', epochs=1))
    weights = str(tmp_path / 'source' / 'model_best.safetensors')
    # a 2-class folder: the head is re-initialised, everything else comes from the file
    two = _write_folder(str(tmp_path / 'two_classes'), classes=2, train=4, val=2, seed=1)
    model = create_model_for_run('test_vit', num_classes=2, weights_file=weights)
    source = _weights(tmp_path / 'source' / 'last.pth')
    own = model.state_dict()
    assert own['head.weight'].shape == (2, source['head.weight'].shape[1])
    assert all(torch.equal(own[k], v) for k, v in source.items() if not k.startswith('head.'))
    summary = train(_tiny(two, tmp_path, 'finetune', pretrained_file=weights, epochs=1, batch_size=2,
                          amp=True, amp_dtype='bfloat16'))
    assert summary['num_classes'] == 2
    assert _weights(tmp_path / 'finetune' / 'last.pth')['head.weight'].shape[0] == 2


def test_resnet18_mscsa_trains_at_64px(image_folder, tmp_path):
    summary = train(_tiny(image_folder, tmp_path, 'mscsa', model='resnet18_mscsa', img_size=64, epochs=1,
                          batch_size=6, grad_checkpointing=True))
    assert summary['optimizer_steps'] == 3 and summary['eval']['count'] == 9
    assert np.isfinite(summary['train']['loss'])
    assert _weights(tmp_path / 'mscsa' / 'last.pth')  # a loadable checkpoint with weights


# ---------------------------------------------------------------------------------------------
# clear errors


def test_missing_data_folder_is_a_clear_error(tmp_path):
    proc = _script('train_imagenet', '--model', 'test_vit', '--data-dir', tmp_path / 'nope', '--output', tmp_path,
                   '--device', 'cpu', check=False)
    assert proc.returncode == 2 and 'does not exist' in proc.stderr and '/train/<class name>/' in proc.stderr


def test_missing_split_folder_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / 'data' / 'training_images' / 'a')
    with pytest.raises(DatasetError, match="No 'train' folder"):
        train(_tiny(str(tmp_path / 'data'), tmp_path, 'x'))


def test_empty_class_folder_is_a_clear_error(image_folder, tmp_path):
    data = str(tmp_path / 'data')
    shutil.copytree(image_folder, data)
    os.makedirs(os.path.join(data, 'train', 'class_9_empty'))
    with pytest.raises(DatasetError, match='class_9_empty') as info:
        train(_tiny(data, tmp_path, 'x'))
    assert 'without images' in str(info.value)


def test_unknown_model_suggests_close_names(image_folder, tmp_path):
    with pytest.raises(UnknownModelError, match='resnet18_mscsa'):
        train(_tiny(image_folder, tmp_path, 'x', model='resnet18_mscs'))
    proc = _script('validate', '--model', 'maformer_z', '--data-dir', image_folder, check=False)
    assert proc.returncode == 2 and "Did you mean: maformer_" in proc.stderr


def test_resume_refuses_a_weights_only_file(image_folder, tmp_path):
    train(_tiny(image_folder, tmp_path, 'w', epochs=1))
    from maformer_zoo.errors import CorruptCheckpointError
    with pytest.raises(CorruptCheckpointError, match='not a training checkpoint'):
        train(_tiny(image_folder, tmp_path, 'w2', resume=str(tmp_path / 'w' / 'model_best.safetensors')))


def test_nesterov_sgd_without_momentum_is_one_line(image_folder, tmp_path):
    """timm's ``sgd`` is Nesterov SGD, which torch refuses with momentum 0 (a traceback after the data scan);
    decided from timm's optimizer registry before anything runs. ``momentum`` 0 is plain SGD and trains.
    Mutation: no check in _check_options -> torch's ValueError traceback, exit 1."""
    args = ['--model', 'test_vit', '--data-dir', image_folder, '--img-size', '32', '--batch-size', '4',
            '--num-workers', '0', '--output', tmp_path, '--device', 'cpu', '--opt', 'sgd', '--momentum', '0']
    proc = _script('train_imagenet', *args, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert '--opt momentum' in proc.stderr and not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------
# no run is lost


def _tree_digest(folder):
    return {os.path.relpath(os.path.join(d, n), folder): hashlib.sha256(open(os.path.join(d, n), 'rb').read()).hexdigest()
            for d, _, names in os.walk(folder) for n in names}


def test_rerun_without_resume_refuses_and_leaves_the_run_untouched(image_folder, tmp_path):
    train(_tiny(image_folder, tmp_path, 'run', epochs=1))
    before = _tree_digest(tmp_path / 'run')
    args = ['--model', 'test_vit', '--data-dir', image_folder, '--img-size', '32', '--batch-size', '4', '--epochs',
            '1', '--num-workers', '0', '--output', tmp_path, '--experiment', 'run', '--no-progress', '--device', 'cpu']
    proc = _script('train_imagenet', *args, check=False)
    assert proc.returncode == 2 and 'already holds a run' in proc.stderr and '--resume auto' in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert _tree_digest(tmp_path / 'run') == before


def test_resume_auto_continues_the_plain_command_without_experiment(image_folder, tmp_path):
    first = train(_tiny(image_folder, tmp_path, '', stop_epoch=1))
    again = train(_tiny(image_folder, tmp_path, '', resume='auto'))
    assert again['run_dir'] == first['run_dir'] and again['epochs_done'] == 2
    with open(os.path.join(again['run_dir'], 'summary.csv')) as f:
        assert [r['epoch'] for r in csv.DictReader(f)] == ['1', '2']
    assert [int(r['step']) for r in _steps(again['run_dir'])] == list(range(1, 9))  # no duplicate rows


def test_kill_mid_save_leaves_best_and_summary_consistent(image_folder, tmp_path):
    """Kills are simulated by putting the files back in the state a kill between two writes leaves."""
    from maformer_zoo.training.checkpoint import best_weights_epoch
    run = tmp_path / 'run'
    train(_tiny(image_folder, tmp_path, 'run', epochs=2, stop_epoch=1, eval_metric='loss'))
    saved = {n: (run / n).read_bytes() for n in ('last.pth', 'model_best.pth', 'model_best.safetensors')}
    train(_tiny(image_folder, tmp_path, 'run', epochs=2, resume='auto', eval_metric='loss', checkpoint_hist=2))
    reference = json.loads((run / 'summary.json').read_text())
    # 1) killed after model_best of epoch 2, before last.pth: last.pth is still epoch 1's
    (run / 'last.pth').write_bytes(saved['last.pth'])
    summary = train(_tiny(image_folder, tmp_path, 'run', epochs=2, resume='auto', eval_metric='loss',
                          checkpoint_hist=2))
    # 2) model_best lagging the record (what the old write order left): recovered on resume
    (run / 'model_best.pth').write_bytes(saved['model_best.pth'])
    (run / 'model_best.safetensors').write_bytes(saved['model_best.safetensors'])
    summary = train(_tiny(image_folder, tmp_path, 'run', epochs=2, resume='auto', eval_metric='loss',
                          checkpoint_hist=2))
    recorded = json.loads((run / 'summary.json').read_text())
    assert recorded['best_epoch'] == summary['best_epoch'] == reference['best_epoch']
    assert set(best_weights_epoch(str(run)).values()) == {recorded['best_epoch']}
    assert [r['epoch'] for r in csv.DictReader(open(run / 'summary.csv'))] == ['1', '2']


def test_help_prints(tmp_path):
    proc = _script('train_imagenet', '--help')
    assert '30% slower' in proc.stdout and '{' not in proc.stdout.split('--grad-checkpointing')[1].split('--')[0]


def test_validate_refuses_labels_it_cannot_map(image_folder, tmp_path):
    from safetensors.torch import load_file, save_file
    train(_tiny(image_folder, tmp_path, 'run', epochs=1))
    best = tmp_path / 'run' / 'model_best.safetensors'
    save_file(load_file(str(best)), str(tmp_path / 'bare.safetensors'))  # the weights without the class map
    common = ['--model', 'test_vit', '--data-dir', image_folder, '--num-workers', '0', '--no-progress', '--device', 'cpu']
    proc = _script('validate', '--checkpoint', tmp_path / 'bare.safetensors', *common, check=False)
    assert proc.returncode == 2 and '--class-map' in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert json.loads(_script('validate', '--checkpoint', best, *common).stdout)['count'] == 9  # recorded map
    (tmp_path / 'empty.pth').touch()
    proc = _script('validate', '--checkpoint', tmp_path / 'empty.pth', *common, check=False)
    assert proc.returncode == 2 and 'empty' in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

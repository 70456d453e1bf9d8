"""scripts/train_net.py, run as a user runs it: safe configs and weights, no run lost, the 2-process path.

Every script run is a subprocess on a tiny generated COCO dataset (``write_synthetic_coco``),
registered through the script's own ``--coco-dataset`` flag.
"""
import json
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.detectron2
pytest.importorskip('detectron2')

from detectron2_ext.config_file import UnknownConfigKeyError, UnsafeConfigError, load_config  # noqa: E402
from maformer_zoo.errors import UnsafeCheckpointError  # noqa: E402

from conftest import ROOT  # noqa: E402
SCRIPT = ROOT / 'scripts' / 'train_net.py'
CONFIG = ROOT / 'configs' / 'COCO-InstanceSegmentation' / 'mask_rcnn_resnet18_mscsa_fine_fpn_1x.yaml'


def small_run(output_dir, max_iter=2, ims_per_batch=2, seed=0):
    """KEY VALUE overrides for a CPU run of a grid config on the generated data (3 classes)."""
    opts = {
        'DATASETS.TRAIN': '("tn_train",)', 'DATASETS.TEST': '("tn_val",)', 'MODEL.ROI_HEADS.NUM_CLASSES': 3,
        'MODEL.DEVICE': 'cpu', 'MODEL.TIMM.PRETRAINED': False, 'MODEL.TIMM.NORM': 'BN', 'MODEL.TIMM.FREEZE_AT': 0,
        'MODEL.FPN.OUT_CHANNELS': 32, 'MODEL.ROI_BOX_HEAD.FC_DIM': 64, 'MODEL.ROI_MASK_HEAD.CONV_DIM': 32,
        'MODEL.RPN.PRE_NMS_TOPK_TRAIN': 128, 'MODEL.RPN.POST_NMS_TOPK_TRAIN': 64, 'MODEL.RPN.PRE_NMS_TOPK_TEST': 128,
        'MODEL.RPN.POST_NMS_TOPK_TEST': 32, 'MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE': 32,
        'INPUT.MIN_SIZE_TRAIN': '(64,)', 'INPUT.MAX_SIZE_TRAIN': 256, 'INPUT.MIN_SIZE_TEST': 64,
        'INPUT.MAX_SIZE_TEST': 256, 'INPUT.MASK_FORMAT': 'bitmask', 'INPUT.RANDOM_FLIP': 'none',
        'SOLVER.IMS_PER_BATCH': ims_per_batch, 'SOLVER.BASE_LR': 2e-4, 'SOLVER.MAX_ITER': max_iter,
        'SOLVER.STEPS': '()', 'SOLVER.WARMUP_ITERS': 1, 'SOLVER.CHECKPOINT_PERIOD': 1,
        'SOLVER.AMP.ENABLED': False, 'TEST.EVAL_PERIOD': 0, 'DATALOADER.NUM_WORKERS': 0, 'VIS_PERIOD': 0,
        'SEED': seed, 'OUTPUT_DIR': str(output_dir),
    }
    return [str(x) for kv in opts.items() for x in kv]


def train_net(coco, *args, check=True, timeout=900):
    datasets = ['--coco-dataset', 'tn_train', coco['train']['instances_json'], coco['train']['image_dir'],
                '--coco-dataset', 'tn_val', coco['val']['instances_json'], coco['val']['image_dir']]
    proc = subprocess.run([sys.executable, str(SCRIPT), *datasets, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1'))
    assert not check or proc.returncode == 0, proc.stderr[-3000:]
    return proc


def one_line_error(proc):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith('error: ')]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


class _RunsCode:
    """Unpickling this creates a file: stands for any code a malicious file would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _iterations(output_dir):
    rows = [json.loads(line) for line in open(os.path.join(output_dir, 'metrics.json')) if line.strip()]
    return [r for r in rows if 'total_loss' in r]


# ----------------------------------------------------------------------------- nothing runs code


def test_yaml_python_tag_refused_through_script(coco, tmp_path):
    marker = tmp_path / 'code_ran'
    evil = tmp_path / 'evil.yaml'
    evil.write_text(f'_BASE_: "{CONFIG}"\nSEED: !!python/object/apply:os.system ["touch {marker}"]\n')
    line = one_line_error(train_net(coco, '--config-file', evil, *small_run(tmp_path / 'out'), check=False))
    assert "!!python/object/apply:os.system" in line and str(evil) in line
    assert not marker.exists() and not (tmp_path / 'out').exists()
    with pytest.raises(UnsafeConfigError):  # the library call behind it
        load_config(str(evil))
    assert not marker.exists()


def test_pickled_code_refused_and_numpy_pkl_loads(coco, tmp_path):
    marker = tmp_path / 'code_ran'
    with open(tmp_path / 'evil.pkl', 'wb') as f:
        pickle.dump({'model': {'w': np.zeros(2)}, '__author__': 'x', 'payload': _RunsCode(marker)}, f, protocol=2)
    torch.save({'model': {}, 'payload': _RunsCode(marker)}, tmp_path / 'evil.pth')
    from detectron2_ext.checkpoint import SafeDetectionCheckpointer
    for name in ('evil.pkl', 'evil.pth'):
        with pytest.raises(UnsafeCheckpointError, match='needs'):
            SafeDetectionCheckpointer(torch.nn.Linear(2, 2)).load(str(tmp_path / name))
    assert not marker.exists()

    # Detectron-format numpy weights (as detectron2's ImageNet R-50 .pkl) for the whole detector,
    # from a 1-iteration run, then loaded by --eval-only; an evil .pkl the same way is refused
    trained = train_net(coco, '--config-file', CONFIG, *small_run(tmp_path / 'run', max_iter=1))
    state = torch.load(tmp_path / 'run' / 'model_final.pth', map_location='cpu', weights_only=True)['model']
    with open(tmp_path / 'numpy.pkl', 'wb') as f:
        pickle.dump({'model': {k: v.numpy() for k, v in state.items()}, '__author__': 'test'}, f, protocol=2)
    from_pkl = train_net(coco, '--config-file', CONFIG, '--eval-only', *small_run(tmp_path / 'e2'), 'MODEL.WEIGHTS',
                         tmp_path / 'numpy.pkl')

    def ap_lines(proc):
        return [line.split('copypaste:')[1] for line in (proc.stdout + proc.stderr).splitlines() if 'copypaste:' in line]

    assert ap_lines(from_pkl) and ap_lines(from_pkl) == ap_lines(trained)  # the run's own final evaluation
    refused = train_net(coco, '--config-file', CONFIG, '--eval-only', *small_run(tmp_path / 'e3'), 'MODEL.WEIGHTS',
                        tmp_path / 'evil.pkl', check=False)
    assert 'needs' in one_line_error(refused) and 'evil.pkl' in refused.stderr
    assert not marker.exists()


def test_caffe2_numpy_pkl_goes_through_matching_heuristics(tmp_path):
    from detectron2_ext.checkpoint import SafeDetectionCheckpointer
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    with open(tmp_path / 'c2.pkl', 'wb') as f:
        pickle.dump({'blobs': {'0.weight': np.ones((3, 2), np.float32), '0.bias': np.ones(3, np.float32),
                               '0.weight_momentum': np.zeros((3, 2), np.float32)}}, f, protocol=2)
    SafeDetectionCheckpointer(model).load(str(tmp_path / 'c2.pkl'))
    assert torch.equal(model[0].weight, torch.ones(3, 2))


def test_pycls_checkpoint_loads_without_its_batch_counters(tmp_path):
    """A pycls ``.pyth`` (``model_state``) loads with matching heuristics and without BatchNorm's
    ``num_batches_tracked`` counters, as detectron2's checkpointer reads it (FrozenBN has none)."""
    from detectron2_ext.checkpoint import SafeDetectionCheckpointer
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    weights = {'0.weight': torch.full((3, 2), 2.0), '0.bias': torch.ones(3)}
    torch.save({'model_state': {**weights, 'bn.num_batches_tracked': torch.tensor(5)}, 'epoch': 9},
               tmp_path / 'pycls.pyth')
    checkpointer = SafeDetectionCheckpointer(model)
    loaded = checkpointer._load_file(str(tmp_path / 'pycls.pyth'))
    assert {k: v for k, v in loaded.items() if k != 'model'} == {'__author__': 'pycls', 'matching_heuristics': True}
    assert loaded['model'].keys() == weights.keys()
    checkpointer.load(str(tmp_path / 'pycls.pyth'))
    assert torch.equal(model[0].weight, weights['0.weight']) and torch.equal(model[0].bias, weights['0.bias'])


# ------------------------------------------------------------------------------- config errors


def test_unknown_keys_get_close_names(tmp_path):
    with pytest.raises(UnknownConfigKeyError, match=r"MODEL\.TIMM\.NAM' in the command line.*MODEL\.TIMM\.NAME"):
        load_config(str(CONFIG), ['MODEL.TIMM.NAM', 'resnet18'])
    typo = tmp_path / 'typo.yaml'
    typo.write_text(f'_BASE_: "{CONFIG}"\nMODEL:\n  TIMM:\n    FREEZE_ATT: 1\n')
    with pytest.raises(UnknownConfigKeyError, match='FREEZE_ATT.*FREEZE_AT'):
        load_config(str(typo))
    cfg = load_config(str(CONFIG), ['SEED', '7'])
    assert cfg.SEED == 7 and cfg.MODEL.TIMM.NAME == 'resnet18_mscsa'  # _BASE_ chain applied


def test_cuda_requested_without_cuda_is_an_error(coco, tmp_path):
    assert 'MODEL.DEVICE cpu' in one_line_error(
        train_net(coco, '--config-file', CONFIG, *small_run(tmp_path / 'out'), 'MODEL.DEVICE', 'cuda', check=False))
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_clear_one_line_errors(coco, tmp_path):
    run = small_run(tmp_path / 'out')
    assert "'tn_trian' is not registered (did you mean tn_train" in one_line_error(
        train_net(coco, '--config-file', CONFIG, *run, 'DATASETS.TRAIN', '("tn_trian",)', check=False))
    assert 'MODEL.ROI_HEADS.NUM_CLASSES 3' in one_line_error(
        train_net(coco, '--config-file', CONFIG, *run, 'MODEL.ROI_HEADS.NUM_CLASSES', '80', check=False))
    assert 'MODEL.TIMM.NAME' in one_line_error(
        train_net(coco, '--config-file', CONFIG, *run, 'MODEL.TIMM.NAM', 'x', check=False))
    assert not (tmp_path / 'out').exists()


# ------------------------------------------------------------------------- train, resume, eval


def test_rerun_into_a_run_folder_refused(coco, tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'last_checkpoint').write_text('model_final.pth')
    (out / 'model_final.pth').write_bytes(b'an earlier run')
    line = one_line_error(train_net(coco, '--config-file', CONFIG, *small_run(out), check=False))
    assert 'already holds a run' in line and '--resume' in line
    assert sorted(p.name for p in out.iterdir()) == ['last_checkpoint', 'model_final.pth']
    assert (out / 'model_final.pth').read_bytes() == b'an earlier run'


def test_train_then_resume(coco, tmp_path):  # fast: CI runs train_net's --resume once (issue 22)
    out = tmp_path / 'run'
    proc = train_net(coco, '--config-file', CONFIG, *small_run(out, max_iter=1))
    assert 'copypaste: Task: bbox' in proc.stdout + proc.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    one_line_error(train_net(coco, '--config-file', CONFIG, *small_run(out, max_iter=2), check=False))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # untouched
    train_net(coco, '--config-file', CONFIG, '--resume', '--allow-changes', *small_run(out, max_iter=2))
    assert [r['iteration'] for r in _iterations(out)] == [0, 1]  # only the new iteration ran
    assert 'SOLVER.MAX_ITER' in (out / 'config_changes.yaml').read_text()  # the extension is on record
    assert 'Starting training from iteration 1' in (out / 'log.txt').read_text()


@pytest.mark.slow
def test_two_processes_match_one_and_resume(coco, tmp_path):
    """--num-gpus 2 on the CPU (detectron2's launch, gloo), 1 image per process, against 1 process with batch 2.

    Same images per iteration (detectron2's sampler splits the shuffled order by rank), BatchNorm
    in the backbone normalises per process though (detectron2 does not sync it by default), so the
    losses agree within a tolerance, not exactly: 5% relative.
    """
    one, two = tmp_path / 'one', tmp_path / 'two'
    train_net(coco, '--config-file', CONFIG, *small_run(one, max_iter=3, ims_per_batch=2))
    train_net(coco, '--config-file', CONFIG, '--num-gpus', '2', *small_run(two, max_iter=3, ims_per_batch=2))
    # detectron2 writes metrics every 20 iterations and at the end: the median loss of the 3 iterations
    (loss_one,), (loss_two,) = ([r['total_loss'] for r in _iterations(d)] for d in (one, two))
    assert loss_two == pytest.approx(loss_one, rel=0.05)
    # kill after iteration 2's checkpoint: keep model_0000001.pth as the last one, then resume with 2 processes
    (two / 'model_final.pth').unlink()
    (two / 'last_checkpoint').write_text('model_0000001.pth')
    train_net(coco, '--config-file', CONFIG, '--num-gpus', '2', '--resume', *small_run(two, max_iter=3, ims_per_batch=2))
    assert 'Starting training from iteration 2' in (two / 'log.txt').read_text()
    assert (two / 'model_final.pth').is_file()


def test_two_processes_equal_one_with_plain_sgd(coco, tmp_path):
    """--num-gpus 2 on the CPU (detectron2's launch, gloo, 1 image per process) against 1 process
    with the same 2 images per iteration: the same weights after 2 plain SGD steps (no momentum,
    no weight decay, no clipping, no warm-up), within round-off.

    Everything that depends on how a batch is split is taken out, so only the order of
    floating-point sums differs: FrozenBN (no per-process statistics), Faster R-CNN (the mask loss
    averages over a process's positives), every anchor and proposal sampled (no per-rank random
    sampling), NMS off and a fixed 32 proposals per image, no ground truth appended (each image
    then weighs the same in the per-process means that DDP averages). Plain SGD moves each weight
    by lr x gradient, so a gradient scaled by the number of processes shows as a difference the
    size of a step; round-off is far below the bound of 1e-3 of a step. The slow
    ``test_two_processes_match_one_and_resume`` runs the grid config as it is, and resumes.

    Mutation caught (dev/mutations.py): ``d2-sgd-lr-times-world-size`` (the learning rate
    multiplied by the number of processes).
    """
    exact = ['MODEL.MASK_ON', False, 'MODEL.TIMM.NORM', 'FrozenBN', 'SOLVER.OPTIMIZER', 'SGD',
             'SOLVER.MOMENTUM', 0.0, 'SOLVER.NESTEROV', False, 'SOLVER.WEIGHT_DECAY', 0.0,
             'SOLVER.WEIGHT_DECAY_NORM', 0.0, 'SOLVER.BASE_LR', 0.01, 'SOLVER.WARMUP_ITERS', 0,
             'SOLVER.CLIP_GRADIENTS.ENABLED', False, 'MODEL.RPN.BATCH_SIZE_PER_IMAGE', 10 ** 6,
             'MODEL.RPN.NMS_THRESH', 1.0, 'MODEL.RPN.POST_NMS_TOPK_TRAIN', 32,
             'MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE', 10 ** 6, 'MODEL.ROI_HEADS.PROPOSAL_APPEND_GT', False,
             'DATASETS.TEST', '()']
    one, two = tmp_path / 'one', tmp_path / 'two'
    train_net(coco, '--config-file', CONFIG, *small_run(one, max_iter=2, ims_per_batch=2), *exact)
    train_net(coco, '--config-file', CONFIG, '--num-gpus', '2', *small_run(two, max_iter=2, ims_per_batch=2),
              *exact)

    def weights(run, name):
        return torch.load(run / name, map_location='cpu', weights_only=True)['model']

    first, final = weights(one, 'model_0000000.pth'), weights(one, 'model_final.pth')
    step = max((final[k].float() - first[k].float()).abs().max().item() for k in final)
    assert step > 1e-4, step  # the second SGD step moved the weights
    for name in ('model_0000000.pth', 'model_final.pth'):
        single, ddp = weights(one, name), weights(two, name)
        assert single.keys() == ddp.keys()
        diff = max((single[k].float() - ddp[k].float()).abs().max().item() for k in single)
        assert diff < 1e-3 * step, (name, diff, step)


# ------------------------------------------------------------------------- trainer parts


def test_param_groups_follow_detectron2_and_keep_the_model_order():
    """detectron2's groups (norms, biases, ``overrides`` by parameter name), detectron2's ``LN`` as a
    norm, timm's ``no_weight_decay()`` by full name; groups and parameters in the model's order, the
    layout of the optimizer state in checkpoints written before detectron2's groups were used.

    Mutations caught: the re-sort dropped (the declared parameter moves to the end of its group),
    detectron2's LN left out (its weight decays), ``no_weight_decay()`` fed to ``overrides`` by its
    last name component (every ``weight`` exempt).
    """
    from detectron2.layers.batch_norm import LayerNorm
    from detectron2_ext.engine import optimizer_param_groups

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Linear(4, 4)
            self.ln = LayerNorm(4)
            self.proj = torch.nn.Linear(4, 4)

        def no_weight_decay(self):
            return {'mix.weight'}

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Block(), torch.nn.BatchNorm2d(4))
    model[0].bias.requires_grad_(False)
    groups = optimizer_param_groups(model, 0.05, 0.0, 0.0, ['pos_embed'])
    assert [(g['weight_decay'], g['names']) for g in groups] == [
        (0.05, ['0.weight', '1.proj.weight']),
        (0.0, ['1.mix.weight', '1.mix.bias', '1.ln.weight', '1.ln.bias', '1.proj.bias', '2.weight', '2.bias'])]
    named = dict(model.named_parameters())
    assert all(p is named[n] for g in groups for p, n in zip(g['params'], g['names']))


def test_cut_metrics_keeps_the_rows_before_the_checkpoint(tmp_path):
    """A killed run's metrics.json: complete rows, rows past the checkpoint that ``--resume`` loads, a
    partial last row. The cut keeps the bytes of the rows before the checkpoint, and detectron2's
    ``JSONWriter``, opened before it (as the trainer's hooks are), appends right after them.

    Mutations caught: no cut (iterations that run again appear twice, the partial row glues onto the
    next), a cut that writes a new file and renames it (the open writer appends to the replaced file).
    """
    from detectron2.utils.events import EventStorage, JSONWriter
    from detectron2_ext.engine.trainer import cut_metrics
    path = tmp_path / 'metrics.json'
    rows = [json.dumps({'iteration': i, 'loss': 1.0 / (i + 1)}) + '\n' for i in (19, 39, 59)]
    path.write_text(''.join(rows) + '{"iteration": 79, "lo')
    writer = JSONWriter(str(path))
    cut_metrics(str(path), start_iter=40)
    assert path.read_text() == ''.join(rows[:2])
    with EventStorage(40) as storage:
        storage.put_scalar('loss', 0.25, smoothing_hint=False)
        writer.write()
    writer.close()
    assert [json.loads(line)['iteration'] for line in path.read_text().splitlines()] == [19, 39, 40]
    cut_metrics(str(path), start_iter=0)  # killed before the first checkpoint: it starts again
    assert path.read_text() == ''

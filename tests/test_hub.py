"""Hub ids, export (scripts/push_to_hub.py), model cards and every offline loading path.

No network: a temporary Hugging Face cache is laid out exactly as huggingface_hub writes it
(``models--<org>--<name>/snapshots/<commit>/...`` + ``refs/main``) and ``HF_HUB_OFFLINE`` is on.
huggingface_hub reads ``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE`` into ``huggingface_hub.constants`` at
import time, so in-process tests patch those constants; one subprocess test uses the real
environment variables, as a user would.
"""
import argparse
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import timm

import maformer_zoo
from maformer_zoo import cards, weights
from maformer_zoo.errors import (
    CheckpointMismatchError, CorruptCheckpointError, PretrainedWeightsNotFoundError, UnsafeCheckpointError)
from maformer_zoo.utils.flops import measure_model_stats, sdpa_flop_jit

from conftest import ROOT  # noqa: E402
SCRIPTS = ROOT / 'scripts'


def push_to_hub(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """scripts/push_to_hub.py in a subprocess, as a user runs it."""
    out = subprocess.run([sys.executable, str(SCRIPTS / 'push_to_hub.py'), *map(str, args)], capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1'))
    assert not check or out.returncode == 0, out.stderr[-3000:]
    return out


def export(name, checkpoint, out):
    """push_to_hub.py --dry-run --no-measure, in process."""
    spec = importlib.util.spec_from_file_location('_push_to_hub', SCRIPTS / 'push_to_hub.py')
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main(['--model', name, '--checkpoint', str(checkpoint), '--out', str(out), '--dry-run', '--no-measure'])

MODELS = maformer_zoo.list_models()
SMALL = 'resnet18_mscsa'  # the smallest real architecture for the path tests
COMMIT = '0123456789abcdef0123456789abcdef01234567'
# Round trips of models above this size write 160+ MB each; they run in `make test-all`.
SLOW_PARAMS = 40e6
OTHER_REPO = 'someone/resnet18_mscsa.in1k'  # a repo not of our organisation: loads like a published one


def _param_count(name: str) -> int:
    with torch.device('meta'):
        return sum(p.numel() for p in timm.create_model(name).parameters())


def _round_trip_params():
    return [pytest.param(n, marks=[pytest.mark.slow] if _param_count(n) > SLOW_PARAMS else [])
            for n in MODELS]


def place_in_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Lay out ``folder`` as huggingface_hub's cache holds a downloaded repo snapshot.

    ``models--<org>--<name>/blobs/<hash>`` holds the data, ``snapshots/<commit>/<file>`` are
    relative symlinks to the blobs, ``refs/main`` names the commit.
    """
    import hashlib
    repo_dir = cache / ('models--' + repo_id.replace('/', '--'))
    snapshot = repo_dir / 'snapshots' / COMMIT
    for sub in (snapshot, repo_dir / 'blobs', repo_dir / 'refs'):
        sub.mkdir(parents=True, exist_ok=True)
    (repo_dir / 'refs' / 'main').write_text(COMMIT)
    for f in folder.iterdir():
        digest = hashlib.sha256()
        with open(f, 'rb') as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b''):
                digest.update(chunk)
        blob = repo_dir / 'blobs' / digest.hexdigest()
        try:
            os.link(f, blob)  # same data without a copy (hundreds of MB for the big models)
        except OSError:
            shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline (constants patched, env set for subprocesses)."""
    import huggingface_hub.constants as constants
    cache = tmp_path / 'hf_cache'
    cache.mkdir()
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    return cache


def _train_checkpoint(model: torch.nn.Module) -> dict:
    """A timm train.py-style checkpoint: EMA = ``model``'s weights, raw weights perturbed."""
    ema = {f'module.{k}': v.clone() for k, v in model.state_dict().items()}
    raw = {k: (v + 1.0 if v.is_floating_point() else v.clone()) for k, v in model.state_dict().items()}
    return dict(
        epoch=7, arch=model.pretrained_cfg['architecture'], state_dict=raw, state_dict_ema=ema,
        optimizer={'state': {0: {'momentum_buffer': torch.ones(3)}}, 'param_groups': [{'lr': 0.1}]},
        args=argparse.Namespace(model='x', lr=0.1), metric=0.5, version=2)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """``SMALL`` with random weights (1000 classes), exported once by push_to_hub --dry-run."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp('export')
    model = timm.create_model(SMALL).eval()
    torch.save(_train_checkpoint(model), tmp / 'checkpoint.pth.tar')
    push_to_hub('--model', SMALL, '--checkpoint', tmp / 'checkpoint.pth.tar', '--out', tmp / 'out', '--dry-run',
                '--no-measure')
    folder = tmp / 'out'
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
    return dict(model=model, folder=folder, x=x, reference=reference, tmp=tmp)


def _same_outputs(model: torch.nn.Module, exported: dict) -> bool:
    with torch.no_grad():
        return torch.equal(model.eval()(exported['x']), exported['reference'])


# ---------------------------------------------------------------------------------------------
# ids

@pytest.mark.parametrize('name', MODELS)
def test_no_weights_claimed_while_unpublished(name):
    """timm's convention for models without weights: no source in the cfg, so not listed as pretrained."""
    cfg = timm.models.get_pretrained_cfg(f'{name}.in1k')
    assert cfg is not None, f"'{name}' has no '.in1k' pretrained cfg"
    assert cards.hub_id(name) == f'maformer-zoo/{name}.in1k'
    assert not cfg.has_weights and cfg.hf_hub_id is None
    assert not any(m.split('.')[0] == name for m in timm.list_models(pretrained=True))


def test_pretrained_true_fails_fast_without_network(monkeypatch):
    import socket
    import time

    def no_network(*args, **kwargs):
        raise AssertionError('network access attempted')

    monkeypatch.setattr(socket.socket, 'connect', no_network)
    monkeypatch.setattr(socket, 'create_connection', no_network)
    for name in ('maformer_s', SMALL):
        start = time.perf_counter()
        with pytest.raises(PretrainedWeightsNotFoundError) as info:
            timm.create_model(name, pretrained=True)
        assert time.perf_counter() - start < 5
        message = str(info.value)
        for needle in ('none are published', 'pretrained_cfg_overlay=dict(file=', 'local-dir:', cards.hub_id(name)):
            assert needle in message, (needle, message)


def test_timm_not_patched():
    from timm.models import _factory, _hub
    assert _factory.load_model_config_from_hf is _hub.load_model_config_from_hf


# ---------------------------------------------------------------------------------------------
# checkpoint cleaning

def test_unwrap_state_dict_picks_weights_and_strips_training_state():
    w = torch.ones(2)
    ckpt = dict(state_dict={'module.a': w}, state_dict_ema={'_orig_mod.module.a': w * 2},
                optimizer={'state': {}}, epoch=3, args=argparse.Namespace(x=1))
    sd, key = weights.unwrap_state_dict(ckpt)
    assert key == 'state_dict_ema' and list(sd) == ['a'] and torch.equal(sd['a'], w * 2)
    sd, key = weights.unwrap_state_dict(ckpt, weights='model')
    assert key == 'state_dict' and torch.equal(sd['a'], w)
    sd, key = weights.unwrap_state_dict({'model': {'module.b': w}, 'model_ema': {'b': w * 3}})
    assert key == 'model_ema' and torch.equal(sd['b'], w * 3)
    sd, key = weights.unwrap_state_dict({'module.c': w, 'note': 'text'})  # plain state dict
    assert key == '' and list(sd) == ['c']
    with pytest.raises(ValueError, match="no EMA weights"):
        weights.unwrap_state_dict({'state_dict': {'a': w}}, weights='ema')
    with pytest.raises(CorruptCheckpointError, match='No tensors'):
        weights.unwrap_state_dict({'epoch': 1})


# ---------------------------------------------------------------------------------------------
# round trip: random weights -> push_to_hub --dry-run -> HF cache -> create_model offline

@pytest.mark.parametrize('name', _round_trip_params())
def test_round_trip_through_offline_hf_cache(name, tmp_path, offline_cache):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    torch.save(_train_checkpoint(model), tmp_path / 'checkpoint.pth.tar')
    folder = export(name, tmp_path / 'checkpoint.pth.tar', tmp_path / 'out')
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == name and config['num_classes'] == 10
    assert config['num_features'] == model.num_features
    assert {'global_pool', 'model_args', 'pretrained_cfg'} <= set(config)
    assert 'optimizer' not in (folder / 'config.json').read_text()

    place_in_cache(offline_cache, f'someone/{name}', folder)  # a repo of ours loads once published
    loaded = timm.create_model(f'hf-hub:someone/{name}', pretrained=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))  # the EMA weights, bit for bit


# ---------------------------------------------------------------------------------------------
# the other loading paths

def test_pretrained_sources_with_env_offline_cache(exported, tmp_path):
    """What a user does: HF_HUB_OFFLINE=1 + a cache, then the plain timm calls (fresh process)."""
    cache = tmp_path / 'hf_cache'
    place_in_cache(cache, OTHER_REPO, exported['folder'])
    torch.save(exported['x'], tmp_path / 'x.pt')
    torch.save(exported['reference'], tmp_path / 'ref.pt')
    code = (
        "import sys, torch, timm, maformer_zoo\n"
        "x, ref = torch.load(sys.argv[1]), torch.load(sys.argv[2])\n"
        f"for name in ('hf-hub:{OTHER_REPO}', 'local-dir:{exported['folder']}'):\n"
        "    m = timm.create_model(name, pretrained=True).eval()\n"
        "    with torch.no_grad():\n"
        "        assert torch.equal(m(x), ref), name\n"
        "print('ok')\n")
    # Same intra-op thread count as this process, so the reference is reproduced bit for bit.
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    env.pop('HF_HOME', None)
    out = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'x.pt'), str(tmp_path / 'ref.pt')],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith('ok'), out.stderr[-3000:]


def test_local_dir_file_overlay_and_helpers(exported, offline_cache):
    folder = exported['folder']
    assert _same_outputs(timm.create_model(f'local-dir:{folder}', pretrained=True), exported)
    file_overlay = dict(file=str(folder / 'model.safetensors'))
    assert _same_outputs(timm.create_model(SMALL, pretrained=True, pretrained_cfg_overlay=file_overlay), exported)
    gray = timm.create_model(SMALL, pretrained=True, in_chans=1, pretrained_cfg_overlay=file_overlay)
    stem = exported['model'].state_dict()['base.conv1.weight']  # timm folds RGB into one channel
    assert torch.allclose(gray.state_dict()['base.conv1.weight'], stem.sum(dim=1, keepdim=True))
    # a timm training checkpoint works as a file too (EMA weights, like timm's loader)
    ckpt = dict(pretrained_cfg_overlay=dict(file=str(exported['tmp'] / 'checkpoint.pth.tar')))
    assert _same_outputs(timm.create_model(SMALL, pretrained=True, **ckpt), exported)

    # the helpers the detectron2 backbone uses (MODEL.TIMM.CHECKPOINT): every source kind
    place_in_cache(offline_cache, OTHER_REPO, folder)
    expected = {k: v for k, v in exported['model'].state_dict().items()}
    for source in (f'hf-hub:{OTHER_REPO}', f'local-dir:{folder}', folder, folder / 'model.safetensors'):
        state_dict = weights.pretrained_overlay(source, SMALL)['state_dict']
        assert state_dict.keys() == expected.keys()
        assert all(torch.equal(state_dict[k], expected[k]) for k in expected)
    features = timm.create_model(
        SMALL, pretrained=True, features_only=True,
        pretrained_cfg_overlay=weights.pretrained_overlay(f'hf-hub:{OTHER_REPO}', SMALL))
    # FeatureGetterNet keeps the model as `.model`; everything but the new dense-fusion layers loaded
    loaded = {k[len('model.'):]: v for k, v in features.state_dict().items()}
    shared = [k for k in loaded if k in expected]
    assert sum(k.startswith('base.') for k in shared) > 50 and any(k.startswith('mscsa.') for k in shared)
    assert all(torch.equal(loaded[k], expected[k]) for k in shared)


# ---------------------------------------------------------------------------------------------
# errors

def test_unpublished_and_uncached_repos(offline_cache):
    from huggingface_hub.errors import LocalEntryNotFoundError
    with pytest.raises(PretrainedWeightsNotFoundError, match='none are published'):
        weights.resolve_weight_file(f'hf-hub:{cards.hub_id(SMALL)}', SMALL)  # decided without a lookup
    with pytest.raises(PretrainedWeightsNotFoundError, match=f"'{OTHER_REPO}'.*hf download") as info:
        weights.resolve_weight_file(f'hf-hub:{OTHER_REPO}', SMALL)  # offline, not cached
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)
    with pytest.raises(LocalEntryNotFoundError):  # timm's own error for timm's own factory path
        timm.create_model('hf-hub:timm/resnet18.a1_in1k', pretrained=True)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(PretrainedWeightsNotFoundError, match='not found'):
        timm.create_model(SMALL, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'no.safetensors')))
    (tmp_path / 'empty.pth').touch()
    with pytest.raises(CorruptCheckpointError, match='empty'):
        timm.create_model(SMALL, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'empty.pth')))
    with pytest.raises(PretrainedWeightsNotFoundError, match='not a folder'):
        weights.resolve_weight_file(f'local-dir:{tmp_path / "nothing"}', SMALL)
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(PretrainedWeightsNotFoundError, match='No weight file'):
        weights.resolve_weight_file(empty)


class _RunsCode:
    """Unpickling this creates a file: stands for any code a malicious checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_pickle_carrying_code_is_refused(exported, tmp_path):
    marker = tmp_path / 'code_ran'
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': exported['model'].state_dict(), 'payload': _RunsCode(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match='pickle that needs code'):
        timm.create_model(SMALL, pretrained=True, pretrained_cfg_overlay=dict(file=str(evil)))
    with pytest.raises(UnsafeCheckpointError, match='pickle that needs code'):
        export(SMALL, evil, tmp_path / 'out')
    with pytest.raises(UnsafeCheckpointError):
        weights.pretrained_overlay(evil)
    assert not marker.exists() and not (tmp_path / 'out').exists()
    # the command line: a one-line error and exit status 2, still nothing run
    out = push_to_hub('--model', SMALL, '--checkpoint', evil, '--out', tmp_path / 'out', '--dry-run', '--no-measure',
                      check=False)
    assert out.returncode == 2 and 'error: Refused' in out.stderr, out.stderr[-2000:]
    assert not marker.exists() and not (tmp_path / 'out').exists()



def test_refused_local_dir_file_says_what_is_wrong(exported, tmp_path):
    """Issue 20: a refused ``local-dir:`` file on the training / validation route said "Offline? Download
    them". It now names the file, what is wrong and what to do. Mutation caught: create_model_for_run
    wrapping every RuntimeError in the download hint (PretrainedWeightsNotFoundError, 'Offline?')."""
    from maformer_zoo.training.modeling import create_model_for_run
    folder = tmp_path / 'export'
    shutil.copytree(exported['folder'], folder)
    marker = tmp_path / 'code_ran'
    torch.save({'state_dict': exported['model'].state_dict(), 'payload': _RunsCode(marker)}, folder / 'model.safetensors')
    with pytest.raises(UnsafeCheckpointError) as info:
        create_model_for_run(f'local-dir:{folder}', pretrained=True)
    message = str(info.value)
    assert message.startswith(f"Refused '{folder / 'model.safetensors'}': it is a pickle that needs code")
    assert 'save model.state_dict() with safetensors' in message and 'Offline' not in message and '\n' not in message
    (folder / 'model.safetensors').write_bytes(b'\x00' * 64)  # damaged: says so, and to export it again
    with pytest.raises(CorruptCheckpointError, match="model.safetensors' is not a weight file") as info:
        create_model_for_run(f'local-dir:{folder}', pretrained=True)
    assert 'Offline' not in str(info.value) and 'save or download it again' in str(info.value)
    assert not marker.exists()

def test_corrupted_safetensors(exported, tmp_path, offline_cache):
    folder = tmp_path / 'corrupt'
    shutil.copytree(exported['folder'], folder)
    data = (folder / 'model.safetensors').read_bytes()
    (folder / 'model.safetensors').write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CorruptCheckpointError, match='not a readable safetensors'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    with pytest.raises(CorruptCheckpointError, match='not a readable safetensors'):
        timm.create_model(SMALL, pretrained=True, pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors')))
    with pytest.raises(CorruptCheckpointError, match='not a readable safetensors'):
        export(SMALL, folder / 'model.safetensors', tmp_path / 'out')
    (folder / 'model.safetensors').write_bytes(b'not a checkpoint at all')
    with pytest.raises(CorruptCheckpointError):
        weights.pretrained_overlay(folder)


def test_wrong_architecture_in_config(exported, tmp_path):
    folder = tmp_path / 'wrong_arch'
    shutil.copytree(exported['folder'], folder)
    config = json.loads((folder / 'config.json').read_text())
    config['architecture'] = 'pvt_v2_b0_mscsa'
    (folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="do not fit 'pvt_v2_b0_mscsa'") as info:
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert re.search(r'\(\d+ of its \d+ parameters matched, \d+ missing, \d+ keys of the file unused, [1-9]\d* mis-shaped; ',
                     str(info.value)), str(info.value)
    # an exported file loaded into another architecture: the error says what its config.json names
    with pytest.raises(CheckpointMismatchError, match=f"holds weights of '{SMALL}'"):
        timm.create_model('pvt_v2_b0_mscsa', pretrained=True, features_only=True,
                          pretrained_cfg_overlay=dict(file=str(exported['folder'] / 'model.safetensors')))
    with pytest.raises(CheckpointMismatchError, match="holds weights of 'pvt_v2_b0_mscsa'"):
        weights.resolve_weight_file(f'local-dir:{folder}', SMALL)
    config['architecture'] = 'no_such_model'
    (folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match='no_such_model'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)


def test_missing_keys_refused(exported, tmp_path):
    state_dict = dict(exported['model'].state_dict())
    dropped = 'mscsa.norm.weight' if 'mscsa.norm.weight' in state_dict else sorted(
        k for k in state_dict if k.startswith('mscsa.'))[0]
    del state_dict[dropped]
    path = tmp_path / 'partial.pth'
    torch.save(state_dict, path)
    with pytest.raises(CheckpointMismatchError, match=re.escape(dropped)):
        export(SMALL, path, tmp_path / 'out')
    assert not (tmp_path / 'out').exists()
    for kwargs in (dict(), dict(features_only=True), dict(num_classes=3)):  # timm loads non-strictly here
        with pytest.raises(CheckpointMismatchError, match=re.escape(dropped)):
            timm.create_model(SMALL, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    # a new head is a legitimate partial load, not a mismatch
    model = timm.create_model(SMALL, pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(exported['folder'] / 'model.safetensors')))
    assert model.num_classes == 3


# ---------------------------------------------------------------------------------------------
# model cards

def _card(name: str) -> str:
    path = ROOT / 'hub_cards' / f'{name}.md'
    assert path.is_file(), f'no card for {name}: run dev/make_hub_cards.py'
    return path.read_text(encoding='utf-8')


def _stat(card: str, label: str) -> float:
    match = re.search(rf'- {re.escape(label)}: ([0-9.]+)', card)
    assert match, f'{label} missing from card'
    return float(match.group(1))


@pytest.mark.parametrize('name', MODELS)
def test_card_for_every_model(name):
    card = _card(name)
    front = card.split('---')[1]
    for field in ('library_name: timm', 'license:', 'tags:', 'datasets:', 'pipeline_tag: image-classification'):
        assert field in front
    for section in ('## Model Details', '## Model Usage', '### Image Classification', '### Feature Map Extraction',
                    '### Image Embeddings', '## Citation'):
        assert section in card
    code_blocks = re.findall(r'```python\n(.*?)```', card, flags=re.S)
    assert len(code_blocks) == 4 and all('import maformer_zoo' in block for block in code_blocks)
    assert 'no trained weights are published' in card and timm.models.get_pretrained_cfg(f'{name}.in1k').hf_hub_id is None
    assert f'`{cards.hub_id(name)}`' in card
    assert _stat(card, 'Params (M)') == round(_param_count(name) / 1e6, 2)  # card matches the model
    stats = json.loads((ROOT / 'hub_cards' / 'stats.json').read_text())[name]
    assert _stat(card, 'GMACs') == stats['gmacs'] > 0 and _stat(card, 'Activations (M)') == stats['macts'] > 0


def test_card_numbers_are_measured():
    card = _card(SMALL)
    stats = measure_model_stats(timm.create_model(SMALL))
    assert (_stat(card, 'GMACs'), _stat(card, 'Activations (M)')) == (stats['gmacs'], stats['macts'])


@pytest.mark.slow
def test_all_cards_up_to_date():
    out = subprocess.run([sys.executable, str(ROOT / 'dev' / 'make_hub_cards.py'), '--check'], capture_output=True,
                         text=True, timeout=3600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-3000:]


def test_fvcore_counts_like_timm():
    """timm's resnet18 card says 1.8 GMACs / 2.5 M activations; fused attention counts as unfused."""
    stats = measure_model_stats(timm.create_model('resnet18'))
    assert (stats['params_m'], stats['gmacs'], stats['macts']) == (11.69, 1.82, 2.48)
    from timm.layers import Attention
    torch.manual_seed(0)
    fused, unfused = Attention(64, num_heads=4), Attention(64, num_heads=4)
    fused.fused_attn, unfused.fused_attn = True, False
    tokens, dim = 50, 64
    counts = [measure_model_stats(m, input_size=(tokens, dim)) for m in (fused, unfused)]
    assert counts[0]['gmacs'] == counts[1]['gmacs']
    assert counts[0]['macts'] == counts[1]['macts']
    linear = tokens * dim * 3 * dim + tokens * dim * dim
    attention = 2 * tokens * tokens * dim  # q @ k^T and attn @ v over all heads
    from fvcore.nn import FlopCountAnalysis
    exact = FlopCountAnalysis(fused, torch.ones(1, tokens, dim)).set_op_handle(
        'aten::scaled_dot_product_attention', sdpa_flop_jit).unsupported_ops_warnings(False).total()
    assert exact == linear + attention


def test_card_usage_code_runs(exported, offline_cache, tmp_path, monkeypatch):
    from PIL import Image
    monkeypatch.chdir(tmp_path)
    Image.new('RGB', (80, 60), (120, 30, 200)).save('image.jpg')
    card = (exported['folder'] / 'README.md').read_text()
    blocks = re.findall(r'```python\n(.*?)```', card, flags=re.S)
    for block in blocks[:3]:  # classification, feature maps, embeddings (the 4th shows placeholder paths)
        block = block.replace(f"'hf-hub:{cards.hub_id(SMALL)}', pretrained=True",
                              f"'local-dir:{exported['folder']}', pretrained=True")
        namespace = {}
        exec(compile(block, 'card', 'exec'), namespace)  # noqa: S102 - our own generated card
    assert namespace['embedding'].shape == (1, exported['model'].num_features)


def test_card_states_weight_status(monkeypatch):
    """Published or not follows timm's convention (an ``hf_hub_id`` in the pretrained cfg) unless told.
    Mutation caught: a card that ignores the cfg's hf_hub_id (still 'no trained weights' when published)."""
    stats = dict(params_m=1.0, gmacs=0.5, macts=1.5, img_size=(224, 224))
    unpublished = cards.render_model_card(SMALL, stats)
    assert 'no trained weights are published' in unpublished and 'published in' not in unpublished
    told = cards.render_model_card(SMALL, stats, published=True)
    assert 'no trained weights' not in told and f'published in `{cards.hub_id(SMALL)}`' in told
    cfg = timm.models.get_pretrained_cfg(f'{SMALL}.in1k')
    cfg.hf_hub_id = cards.hub_id(SMALL)
    monkeypatch.setattr(cards, 'get_pretrained_cfg', lambda name: cfg)  # as if its weights were published
    assert cards.render_model_card(SMALL, stats) == told


def test_export_card_describes_checkpoint(exported):
    card = (exported['folder'] / 'README.md').read_text()
    assert 'entry `state_dict_ema` (EMA weights)' in card and 'epoch 7' in card
    assert 'no trained weights are published' in card  # a dry run publishes nothing


def test_card_provenance_of_a_timm_train_py_checkpoint():
    """timm's train.py records one ``metric`` and no per-model metrics: the card names that number."""
    record = {'epoch': 3, 'metric': 71.23456, 'state_dict': {}, 'state_dict_ema': {}}
    assert cards.describe_checkpoint('run/model_best.pth.tar', record, 'state_dict_ema') == (
        "exported from `run/model_best.pth.tar`; entry `state_dict_ema` (EMA weights); saved after epoch 3; "
        "training script's eval metric 71.23.")


def test_export_from_our_training_checkpoint(tmp_path):
    """maformer_zoo.training's checkpoint: no EMA (None), metrics, rng, config, class map."""
    from maformer_zoo.training.checkpoint import capture_rng_state, save_checkpoint
    torch.manual_seed(0)
    model = timm.create_model(SMALL, num_classes=10).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = {
        'arch': SMALL, 'epoch': 2, 'num_updates': 20, 'state_dict': model.state_dict(), 'state_dict_ema': None,
        'optimizer': optimizer.state_dict(), 'rng': capture_rng_state(), 'config': {'model': SMALL, 'lr': 0.1},
        'num_classes': 10, 'class_to_idx': {f'c{i}': i for i in range(10)},
        'metrics': {'train': {'loss': 2.0}, 'eval': {'top1': 12.5, 'top5': 50.0, 'loss': 2.2}, 'ema': None},
    }
    save_checkpoint(str(tmp_path / 'last.pth'), state)
    folder = export(SMALL, tmp_path / 'last.pth', tmp_path / 'out')
    assert json.loads((folder / 'config.json').read_text())['label_names'] == [f'c{i}' for i in range(10)]
    card = (folder / 'README.md').read_text()
    assert 'entry `state_dict`' in card and 'EMA' not in card.split('## Model Details')[0]
    assert "validation of these weights: top1 12.50, top5 50.00" in card and 'epoch 2' in card
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(CheckpointMismatchError, match="trained as 'resnet18_mscsa'"):
        export('pvt_v2_b0_mscsa', tmp_path / 'last.pth', tmp_path / 'out2')


def test_upload_uses_create_repo_and_upload_folder(exported, tmp_path):
    """Without --dry-run: timm's push_to_hf_hub creates the repo and uploads the folder with our card (a
    recording HfApi installed by sitecustomize in the script's process; no network)."""
    (tmp_path / 'fake').mkdir()
    (tmp_path / 'fake' / 'sitecustomize.py').write_text(f"""
import json, pathlib, huggingface_hub
LOG = pathlib.Path({str(tmp_path / 'calls.json')!r})
class RecordingApi:
    def __init__(self, **kwargs):
        pass
    def create_repo(self, repo_id, private=False, exist_ok=False):
        LOG.write_text(json.dumps([['create_repo', repo_id, private, exist_ok]]))
        return huggingface_hub.RepoUrl('https://huggingface.co/' + repo_id)
    def file_exists(self, repo_id, filename, revision=None):
        return False
    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        card = (pathlib.Path(folder_path) / 'README.md').read_text()
        calls = json.loads(LOG.read_text()) + [['upload_folder', repo_id, sorted(p.name for p in pathlib.Path(folder_path).iterdir()),
                                               'published in `maformer-zoo/' in card and 'ImageNet-1k top-1 (%):** 80.5' in card]]
        LOG.write_text(json.dumps(calls))
huggingface_hub.HfApi = RecordingApi
""")
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / 'push_to_hub.py'), '--model', SMALL, '--checkpoint',
         str(exported['tmp'] / 'checkpoint.pth.tar'), '--out', str(tmp_path / 'out'), '--no-measure', '--top1', '80.5'],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=f"{tmp_path / 'fake'}{os.pathsep}{ROOT}", OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / 'calls.json').read_text()) == [
        ['create_repo', cards.hub_id(SMALL), False, True],
        ['upload_folder', cards.hub_id(SMALL), ['README.md', 'config.json', 'model.safetensors'], True]]


def test_model_args_unknown_key(exported, tmp_path):
    out = push_to_hub('--model', SMALL, '--checkpoint', exported['tmp'] / 'checkpoint.pth.tar', '--out', tmp_path,
                      '--dry-run', '--no-measure', '--model-args', '{"drop_pat_rate": 0.1}', check=False)
    assert out.returncode != 0 and "'drop_pat_rate'" in out.stderr and 'drop_path_rate' in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_head_kept_when_class_counts_match(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = timm.create_model(SMALL, num_classes=10)
    save_file(model.state_dict(), str(tmp_path / 'ten.safetensors'))
    for kwargs in (dict(num_classes=10), dict()):
        loaded = timm.create_model(SMALL, pretrained=True, pretrained_cfg_overlay=dict(
            file=str(tmp_path / 'ten.safetensors')), **kwargs)
        assert loaded.num_classes == 10 and torch.equal(loaded.head.fc.weight, model.head.fc.weight)
    other = timm.create_model(SMALL, pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'ten.safetensors')))
    assert other.num_classes == 3 and torch.equal(other.base.conv1.weight, model.base.conv1.weight)


@pytest.mark.parametrize('name', ['maformer_s', SMALL])
def test_clear_input_errors(name):
    """Bad batches get one line saying what to do (names the expected type first)."""
    model = timm.create_model(name).eval()
    cases = [(torch.zeros(0, 3, 64, 64), ValueError, 'empty batch'),
             (torch.zeros(1, 64, 64, 3), ValueError, r'permute\(0, 3, 1, 2\)'),
             (torch.zeros(1, 3, 64, 64, dtype=torch.float64), TypeError, 'expects input of torch.float32 .* got torch.float64'),
             (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, 'expects input of torch.float32 .* got torch.uint8')]
    for x, error, message in cases:
        with pytest.raises(error, match=message) as info:
            model(x)
        assert 'in_chans=64' not in str(info.value) and '\n' not in str(info.value)

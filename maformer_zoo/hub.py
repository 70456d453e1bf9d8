"""Hugging Face Hub support: ids, safe checkpoint reading, export, model cards, loading helpers.

Every registered model has the Hub id ``maformer-zoo/<name>.in1k`` in its pretrained cfg, so
with ``import maformer_zoo`` these all load weights the timm way::

    timm.create_model('maformer_s', pretrained=True)                        # HF cache / Hub
    timm.create_model('hf-hub:maformer-zoo/maformer_s.in1k', pretrained=True)
    timm.create_model('local-dir:/path/to/exported_folder', pretrained=True)
    timm.create_model('maformer_s', pretrained=True, pretrained_cfg_overlay=dict(file='/path/model.safetensors'))

This module holds what sits around timm's own machinery:

* reading a checkpoint safely (``load_checkpoint_file``: safetensors, or ``torch.load`` with
  ``weights_only=True``) and cleaning it into a model state dict (``extract_state_dict``: EMA
  choice, optimizer/training state dropped, ``module.``/``_orig_mod.`` prefixes stripped);
* the export a Hub repo needs (``export_hub_folder``: strict-load check, ``model.safetensors``,
  timm's ``config.json``, ``README.md``), used by ``scripts/push_to_hub.py``;
* model cards generated from data (``measure_model_stats`` with fvcore as timm's benchmark
  counts, ``model_card_info``, ``render_model_card``), used by ``dev/make_hub_cards.py``;
* one loader for every weight source (``resolve_weight_file``, ``load_weights``,
  ``pretrained_overlay``): a file, a ``local-dir:`` folder, or an ``hf-hub:`` id, used by the
  detectron2 backbone (``MODEL.TIMM.CHECKPOINT``).

Which repos really hold trained weights is recorded in ``PUBLISHED_HUB_IDS``; it is empty: no
trained weights are published yet, and cards and error messages say so.
"""
import argparse
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .models._builder import (
    HUB_ORG,
    CheckpointMismatchError,
    CorruptCheckpointError,
    PretrainedWeightsNotFoundError,
    UnsafeCheckpointError,
    format_mismatch,
    hub_weights_error,
    state_dict_mismatch,
)

__all__ = [
    'HUB_ORG', 'DEFAULT_TAG', 'PUBLISHED_HUB_IDS', 'hub_id', 'weights_published',
    'load_checkpoint_file', 'extract_state_dict', 'read_state_dict', 'check_state_dict',
    'export_hub_folder', 'resolve_weight_file', 'load_weights', 'pretrained_overlay',
    'measure_model_stats', 'model_card_info', 'render_model_card', 'WeightsInfo',
    'CheckpointMismatchError', 'CorruptCheckpointError', 'PretrainedWeightsNotFoundError',
    'UnsafeCheckpointError',
]

DEFAULT_TAG = 'in1k'
SAFE_WEIGHTS_NAME = 'model.safetensors'
# Repos that really hold trained weights. Nothing is published yet; add an id here only once its
# upload (scripts/push_to_hub.py) of a trained checkpoint has happened. Cards, the README table
# and the offline error message read this.
PUBLISHED_HUB_IDS: frozenset = frozenset()

PathLike = Union[str, os.PathLike]


def hub_id(model_name: str, tag: str = DEFAULT_TAG) -> str:
    """The Hub repo id of a model's weights: ``maformer-zoo/<name>.<tag>``."""
    return f'{HUB_ORG}/{model_name}.{tag}'


def weights_published(repo_or_model: str) -> bool:
    """Whether trained weights have been uploaded for a repo id (or a model name's default id)."""
    repo = repo_or_model if '/' in repo_or_model else hub_id(repo_or_model)
    return repo.split('@')[0] in PUBLISHED_HUB_IDS


# ---------------------------------------------------------------------------------------------
# Reading checkpoints safely

# Entries of a training checkpoint that hold model weights, in the order 'auto' prefers them
# (EMA first, as timm's own loader does: EMA weights are the ones evaluated and published).
_EMA_KEYS = ('state_dict_ema', 'model_ema')
_MODEL_KEYS = ('state_dict', 'model')
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # DDP/DataParallel and torch.compile wrappers


def load_checkpoint_file(path: PathLike) -> Any:
    """Read a weight file without running code from it.

    ``.safetensors`` is read with safetensors; anything else with ``torch.load(weights_only=True)``,
    allowing only ``argparse.Namespace`` beyond tensors and plain containers (timm's train.py
    stores its arguments in checkpoints that way). A pickle that needs any other code is refused.

    Raises:
        PretrainedWeightsNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: a pickle that needs code to load.
        CorruptCheckpointError: the file is damaged or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsNotFoundError(f"Checkpoint file not found: '{path}'.")
    if path.suffix == '.safetensors':
        import safetensors.torch
        try:
            return safetensors.torch.load_file(str(path), device='cpu')
        except Exception as err:  # SafetensorError is not importable by a stable name
            raise CorruptCheckpointError(
                f"'{path}' is not a readable safetensors file ({err}). It is truncated or damaged: "
                f"export or download it again.") from err
    import pickle
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = ''
        try:
            unsafe = ', '.join(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # noqa: BLE001 - only used to make the message more precise
            pass
        raise UnsafeCheckpointError(
            f"Refused to load '{path}': it is a pickle that needs code to load"
            f"{f' ({unsafe})' if unsafe else ''}. maformer-zoo reads weights only from safetensors "
            f"or torch.load(weights_only=True). If you trust the file, convert it yourself: load it "
            f"with your own code and save model.state_dict() with safetensors.torch.save_file.") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CorruptCheckpointError(
            f"'{path}' is not a readable PyTorch checkpoint ({type(err).__name__}: {err}).") from err


def _strip_wrapper_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def extract_state_dict(checkpoint: Any, weights: str = 'auto') -> Tuple[Dict[str, torch.Tensor], str]:
    """The model weights inside a checkpoint, cleaned for export.

    Args:
        checkpoint: a plain state dict, or a training checkpoint (timm's train.py: ``state_dict``,
            ``state_dict_ema``, ``optimizer``, ``args``...; others: ``model``, ``model_ema``).
        weights: 'auto' (EMA weights if the checkpoint has them, else the model's), 'ema'
            (EMA required), or 'model' (the raw, non-EMA weights).

    Returns:
        (state dict with wrapper prefixes stripped and only tensors kept, name of the entry used;
        '' for a plain state dict). Optimizer, scheduler, epoch, args etc. are dropped by taking
        only the weights entry.
    """
    if weights not in ('auto', 'ema', 'model'):
        raise ValueError(f"weights must be 'auto', 'ema' or 'model', got {weights!r}.")
    if not isinstance(checkpoint, dict):
        raise CorruptCheckpointError(
            f"Expected a state dict or a training checkpoint dict, got {type(checkpoint).__name__}.")

    def present(keys: Sequence[str]) -> Optional[str]:
        return next((k for k in keys if isinstance(checkpoint.get(k), dict)), None)

    ema_key, model_key = present(_EMA_KEYS), present(_MODEL_KEYS)
    if weights == 'ema':
        if ema_key is None:
            raise ValueError(
                f"weights='ema' but the checkpoint has no EMA weights (entries: {sorted(checkpoint)[:10]}). "
                f"Use weights='model' (or 'auto').")
        key = ema_key
    elif weights == 'model':
        key = model_key or ''
    else:
        key = ema_key or model_key or ''
    raw = checkpoint[key] if key else checkpoint
    state_dict = {
        _strip_wrapper_prefixes(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise CorruptCheckpointError(
            f"No tensors found in the checkpoint{f' entry {key!r}' if key else ''} "
            f"(top-level entries: {sorted(checkpoint)[:10]}).")
    return state_dict, key


def read_state_dict(path: PathLike, weights: str = 'auto') -> Tuple[Dict[str, torch.Tensor], str]:
    """``extract_state_dict(load_checkpoint_file(path), weights)``."""
    return extract_state_dict(load_checkpoint_file(path), weights)


def check_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], what: str = 'the checkpoint') -> None:
    """Load ``state_dict`` strictly into ``model``, or raise ``CheckpointMismatchError`` listing why not."""
    problems = state_dict_mismatch(model, state_dict)
    if any(problems.values()):
        name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture', type(model).__name__)
        raise CheckpointMismatchError(
            f"{what} does not fit '{name}':\n{format_mismatch(problems)}\n"
            f"Export refused: pick the architecture (and num_classes / model args) the checkpoint "
            f"was trained with.")
    model.load_state_dict(state_dict, strict=True)


# ---------------------------------------------------------------------------------------------
# Export

def _classifier_classes(model_name: str, state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    """num_classes implied by the checkpoint's classifier (per the model's pretrained cfg)."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(model_name)
    classifiers = (cfg.classifier if cfg else None) or ()
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    for name in classifiers:
        weight = state_dict.get(f'{name}.weight')
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return None


@dataclasses.dataclass
class WeightsInfo:
    """What a card says about the weights in its repo.

    Attributes:
        published: trained weights are in the repo.
        description: one line on where the weights come from (checkpoint, epochs, EMA...).
        results: measured evaluation numbers to list, e.g. {'ImageNet-1k top-1 (%)': 79.1}.
    """
    published: bool = False
    description: str = ''
    results: Dict[str, Any] = dataclasses.field(default_factory=dict)


def _describe_checkpoint(source: str, checkpoint: Any, key: str) -> str:
    """One line on where exported weights come from, from what the checkpoint itself records."""
    parts = [f"exported from `{source}`"]
    if key:
        parts.append(f"entry `{key}`" + (' (EMA weights)' if key in _EMA_KEYS else ''))
    if isinstance(checkpoint, dict):
        if isinstance(checkpoint.get('epoch'), int):
            parts.append(f"saved after epoch {checkpoint['epoch']}")
        metrics = checkpoint.get('metrics')  # maformer_zoo.training: {'eval': {...}, 'ema': {...}}
        if isinstance(metrics, dict):
            chosen = metrics.get('ema' if key in _EMA_KEYS else 'eval')
            if isinstance(chosen, dict):
                numbers = [f"{name} {chosen[name]:.2f}" for name in ('top1', 'top5')
                           if isinstance(chosen.get(name), (int, float))]
                if numbers:
                    parts.append("the training run's validation of these weights: " + ', '.join(numbers))
        elif isinstance(checkpoint.get('metric'), (int, float)):  # timm train.py
            parts.append(f"training script's eval metric {checkpoint['metric']:.4g}")
    return '; '.join(parts) + '.'


def _check_recorded_architecture(checkpoint: Any, model_name: str) -> None:
    """Refuse a training checkpoint whose recorded ``arch`` is another model (clearer than keys)."""
    arch = checkpoint.get('arch') if isinstance(checkpoint, dict) else None
    if isinstance(arch, str) and ':' not in arch and arch.split('.')[0] != model_name.split('.')[0]:
        raise CheckpointMismatchError(
            f"The checkpoint was trained as '{arch}' (its 'arch' entry), not '{model_name}'. "
            f"Export it with --model {arch.split('.')[0]}.")


def export_hub_folder(
        model_name: str,
        checkpoint: Union[PathLike, Dict[str, Any]],
        out_dir: PathLike,
        weights: str = 'auto',
        num_classes: Optional[int] = None,
        model_args: Optional[Dict[str, Any]] = None,
        tag: str = DEFAULT_TAG,
        repo_id: Optional[str] = None,
        published: Optional[bool] = None,
        results: Optional[Dict[str, Any]] = None,
        stats: Optional[Dict[str, Any]] = None,
        measure: bool = True,
) -> Dict[str, Any]:
    """Write a Hub-ready folder for ``model_name`` from a checkpoint file or (checkpoint) dict.

    The weights are cleaned (``extract_state_dict``), loaded strictly into a freshly built
    ``model_name`` (a mismatch raises ``CheckpointMismatchError`` and nothing is written), then
    written as ``model.safetensors`` with timm's ``config.json`` (``save_for_hf``) and a
    ``README.md`` model card.

    Args:
        model_name: a registered architecture, e.g. 'maformer_s'.
        checkpoint: path of a checkpoint (safetensors, or a weights-only-loadable .pth/.bin/.pth.tar)
            or an already loaded checkpoint dict.
        out_dir: folder to write (created; existing files of the same names are replaced).
        weights: 'auto' | 'ema' | 'model', see ``extract_state_dict``.
        num_classes: classes of the checkpoint's head; default: read from its classifier weight.
        model_args: other constructor arguments the checkpoint was trained with (JSON-serializable).
        tag: pretrained tag of the repo id (``<name>.<tag>``).
        repo_id: the repo the folder is for (default ``maformer-zoo/<name>.<tag>``).
        published: whether the card presents the weights as published (True when uploading);
            default: only if the repo id is in ``PUBLISHED_HUB_IDS``. The card always describes
            where the weights come from (checkpoint file, entry, epoch) from the checkpoint itself.
        results: measured evaluation numbers for the card, e.g. {'ImageNet-1k top-1 (%)': 81.2}.
        stats: card numbers if already known; else measured (``measure=True``) or params only.
        measure: measure GMACs/activations with fvcore for the card (takes seconds to minutes).

    Returns:
        dict(folder=Path, model=the loaded model, state_dict_key=entry used, repo_id=str, stats=dict).
    """
    import timm
    from timm.models import save_for_hf

    if not timm.is_model(model_name):
        raise ValueError(f"Unknown model '{model_name}'. Registered maformer-zoo models: "
                         f"{', '.join(_zoo_models()) or '(none)'}; any timm model name also works.")
    source = str(checkpoint) if not isinstance(checkpoint, dict) else 'a state dict'
    loaded = load_checkpoint_file(checkpoint) if not isinstance(checkpoint, dict) else checkpoint
    _check_recorded_architecture(loaded, model_name)
    state_dict, key = extract_state_dict(loaded, weights)
    kwargs = dict(model_args or {})
    classes = num_classes if num_classes is not None else _classifier_classes(model_name, state_dict)
    if classes is not None:
        kwargs['num_classes'] = classes
    repo_id = repo_id or hub_id(model_name, tag)
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    check_state_dict(model, state_dict, what=f'The checkpoint ({source})')
    model.eval()

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(folder), safe_serialization=True)  # model.safetensors + config.json

    if stats is None:
        stats = measure_model_stats(model) if measure else dict(params_m=_params_m(model))
    weights_info = WeightsInfo(
        published=weights_published(repo_id) if published is None else published,
        description=_describe_checkpoint(source, loaded, key),
        results=dict(results or {}))
    card = render_model_card(
        model_name, stats, weights_info, tag=tag, num_classes=model.num_classes, repo_id=repo_id)
    (folder / 'README.md').write_text(card, encoding='utf-8')
    return dict(folder=folder, model=model, state_dict_key=key, repo_id=repo_id, stats=stats)


# ---------------------------------------------------------------------------------------------
# Loading from any source

_SOURCE_RE = re.compile(r'^(hf-hub|hf_hub|local-dir):(.+)$')
_FOLDER_WEIGHT_NAMES = (SAFE_WEIGHTS_NAME, 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')


def _folder_weight_file(folder: Path) -> Path:
    for name in _FOLDER_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    for pattern in ('*.safetensors', '*.pth', '*.pth.tar', '*.bin'):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    raise PretrainedWeightsNotFoundError(
        f"No weight file in '{folder}' (looked for {', '.join(_FOLDER_WEIGHT_NAMES)}, *.safetensors, "
        f"*.pth, *.bin). Export one with scripts/push_to_hub.py --dry-run.")


def _check_architecture(config_file: Path, model_name: Optional[str], where: str) -> None:
    if model_name is None or not config_file.is_file():
        return
    try:
        architecture = json.loads(config_file.read_text(encoding='utf-8')).get('architecture')
    except (ValueError, AttributeError) as err:
        raise CorruptCheckpointError(f"'{config_file}' is not a valid timm config.json ({err}).") from err
    if architecture and architecture != model_name.split('.')[0]:  # a name may carry a tag
        raise CheckpointMismatchError(
            f"{where} holds weights of '{architecture}' (config.json), not '{model_name}'. Use the "
            f"matching model name, or a source exported for '{model_name}'.")


def resolve_weight_file(
        source: PathLike,
        model_name: Optional[str] = None,
        cache_dir: Optional[PathLike] = None,
) -> Path:
    """A local weight file for ``source``; nothing is loaded.

    Args:
        source: ``hf-hub:<org>/<repo>[@revision]`` (the Hugging Face cache, or the Hub when online),
            ``local-dir:<folder>`` or a folder path (its ``model.safetensors``, else a .pth/.bin),
            or a weight file path.
        model_name: if given, a ``config.json`` next to the weights must name this architecture.
        cache_dir: Hugging Face cache to use instead of the default (``HF_HUB_CACHE``).

    Raises:
        PretrainedWeightsNotFoundError: no such file / folder / repo, or offline without it cached;
            the message lists the ways to provide it.
        CheckpointMismatchError: ``config.json`` names another architecture.
    """
    text = str(source)
    match = _SOURCE_RE.match(text)
    kind, location = (match.group(1).replace('_', '-'), match.group(2)) if match else ('path', text)
    if kind == 'hf-hub':
        from huggingface_hub import hf_hub_download
        repo, _, revision = location.partition('@')
        variant = model_name or repo.split('/')[-1].split('.')[0]
        files = {}
        for name in ('config.json', SAFE_WEIGHTS_NAME):
            try:
                files[name] = hf_hub_download(repo, name, revision=revision or None, cache_dir=cache_dir)
            except Exception as err:  # noqa: BLE001 - re-raised with the ways to provide the file
                if name == 'config.json' and type(err).__name__ in ('EntryNotFoundError', 'RemoteEntryNotFoundError'):
                    continue  # a repo without config.json is still usable with an explicit model_name
                from .models._builder import _is_hub_unavailable
                if _is_hub_unavailable(err):
                    raise hub_weights_error(err, variant, repo, what=name, cache_dir=cache_dir) from err
                raise
        if 'config.json' in files:
            _check_architecture(Path(files['config.json']), model_name, f"Hugging Face repo '{repo}'")
        return Path(files[SAFE_WEIGHTS_NAME])
    path = Path(location).expanduser()
    if path.is_dir():
        _check_architecture(path / 'config.json', model_name, f"Folder '{path}'")
        return _folder_weight_file(path)
    if kind == 'local-dir' or not path.is_file():
        help_text = ''
        if model_name:
            from .models._builder import weight_sources_help
            help_text = '\n' + weight_sources_help(model_name)
        raise PretrainedWeightsNotFoundError(
            f"Weights not found: '{path}' is not {'a folder' if kind == 'local-dir' else 'a file or folder'}."
            + help_text)
    if path.name == SAFE_WEIGHTS_NAME:  # an exported folder's file: its config.json describes it
        _check_architecture(path.parent / 'config.json', model_name, f"Folder '{path.parent}'")
    return path


def load_weights(
        source: PathLike,
        model_name: Optional[str] = None,
        cache_dir: Optional[PathLike] = None,
        weights: str = 'auto',
) -> Dict[str, torch.Tensor]:
    """The cleaned state dict of any source ``resolve_weight_file`` accepts (read safely)."""
    state_dict, _ = read_state_dict(resolve_weight_file(source, model_name, cache_dir), weights)
    return state_dict


def pretrained_overlay(
        source: PathLike,
        model_name: Optional[str] = None,
        cache_dir: Optional[PathLike] = None,
) -> Dict[str, Any]:
    """``pretrained_cfg_overlay`` that makes ``timm.create_model(..., pretrained=True)`` load ``source``.

    Works with ``features_only=True`` and a new ``num_classes`` (timm's own head handling), and goes
    through the same checks as any pretrained load (key check, clear errors)::

        timm.create_model('maformer_s', pretrained=True, features_only=True,
                          pretrained_cfg_overlay=pretrained_overlay('hf-hub:maformer-zoo/maformer_s.in1k'))
    """
    overlay: Dict[str, Any] = dict(file=str(resolve_weight_file(source, model_name, cache_dir)))
    config_file = Path(overlay['file']).parent / 'config.json'
    if config_file.is_file():
        # the head size of the weights, so timm keeps the classifier when num_classes matches
        num_classes = json.loads(config_file.read_text(encoding='utf-8')).get('num_classes')
        if isinstance(num_classes, int):
            overlay['num_classes'] = num_classes
    return overlay


# ---------------------------------------------------------------------------------------------
# Model cards

def _zoo_models() -> List[str]:
    from . import list_models
    return list_models()


def _params_m(model: nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def _sdpa_shapes(inputs: List[Any]) -> Tuple[List[int], List[int], List[int]]:
    from fvcore.nn.jit_handles import get_shape
    return get_shape(inputs[0]), get_shape(inputs[1]), get_shape(inputs[2])


def _sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """MACs of ``F.scaled_dot_product_attention``: the two matmuls of unfused attention.

    fvcore has no handle for the fused op and would count 0. Unfused attention
    (``q @ k^T`` then ``attn @ v``) is what timm's published numbers count, via aten::matmul.
    """
    q, k, v = _sdpa_shapes(inputs)
    batch = 1
    for d in q[:-2]:
        batch *= d
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _sdpa_activation_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Activations of ``F.scaled_dot_product_attention`` as fvcore counts unfused attention:
    the attention matrix (output of ``q @ k^T``) plus the output (of ``attn @ v``)."""
    q, k, v = _sdpa_shapes(inputs)
    batch = 1
    for d in q[:-2]:
        batch *= d
    return batch * q[-2] * (k[-2] + v[-1])


def measure_model_stats(
        model: nn.Module, input_size: Optional[Sequence[int]] = None,
) -> Dict[str, Any]:
    """Params (M), GMACs and activations (M) the way timm's benchmark.py reports them.

    timm profiles with fvcore on a batch of one ``torch.ones`` image at the model's default input
    size: ``FlopCountAnalysis(...).total()`` (fvcore counts one multiply-add as one flop, i.e.
    MACs) and ``ActivationCountAnalysis(...).total()``, reported as ``round(x / 1e9, 2)`` and
    ``round(x / 1e6, 2)``; params as ``round(sum(numel) / 1e6, 2)``. fvcore's default op handles
    are kept (they include norm layers); the one addition is a handle for
    ``F.scaled_dot_product_attention``, counted as the unfused attention fvcore would see, so
    fused and unfused attention give the same numbers.

    Returns:
        dict(params_m, gmacs, macts, img_size=(H, W), uncounted_ops={op: calls}) where
        ``uncounted_ops`` lists ops fvcore has no handle for (not in the totals).
    """
    from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis

    if input_size is None:
        input_size = tuple((getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224)))
    example = torch.ones((1, *input_size))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            flops = FlopCountAnalysis(model, example).set_op_handle(
                'aten::scaled_dot_product_attention', _sdpa_flop_jit)
            flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings('none')
            acts = ActivationCountAnalysis(model, example).set_op_handle(
                'aten::scaled_dot_product_attention', _sdpa_activation_jit)
            acts.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings('none')
            macs, activations = flops.total(), acts.total()
            uncounted = dict(sorted(flops.unsupported_ops().items()))
    finally:
        model.train(was_training)
    return dict(
        params_m=_params_m(model),
        gmacs=round(macs / 1e9, 2),
        macts=round(activations / 1e6, 2),
        img_size=tuple(int(s) for s in input_size[-2:]),
        uncounted_ops=uncounted,
    )


# Papers. The texts in shared/papers state no arXiv ids; the ids and the MAFormer author list
# (its shared text is the double-blind submission) are those of the public arXiv records.
_PAPERS: Dict[str, Dict[str, str]] = {
    'maformer': dict(
        title='MAFormer: A Transformer Network with Multi-scale Attention Fusion for Visual Recognition',
        where='arXiv:2209.01620, 2022',
        bibtex=(
            '@article{wang2022maformer,\n'
            '  title={MAFormer: A Transformer Network with Multi-scale Attention Fusion for Visual Recognition},\n'
            '  author={Wang, Yunhao and Sun, Huixin and Wang, Xiaodi and Zhang, Bin and Li, Chao and '
            'Xin, Ying and Zhang, Baochang and Ding, Errui and Han, Shumin},\n'
            '  journal={arXiv preprint arXiv:2209.01620},\n'
            '  year={2022}\n'
            '}'),
    ),
    'mscsa': dict(
        title='Vision Backbone Enhancement via Multi-Stage Cross-Scale Attention',
        where='arXiv:2308.05872, 2023',
        bibtex=(
            '@article{shang2023mscsa,\n'
            '  title={Vision Backbone Enhancement via Multi-Stage Cross-Scale Attention},\n'
            '  author={Shang, Liang and Liu, Yanli and Lou, Zhengyang and Quan, Shuxue and '
            'Adluru, Nagesh and Guan, Bochen and Sethares, William A.},\n'
            '  journal={arXiv preprint arXiv:2308.05872},\n'
            '  year={2023}\n'
            '}'),
    ),
    # base architectures of the MSCSA models, as the MSCSA paper's references give them
    'resnet': dict(title='Deep Residual Learning for Image Recognition', where='CVPR 2016'),
    'pvt_v2': dict(title='PVT v2: Improved Baselines with Pyramid Vision Transformer',
                   where='Computational Visual Media 8(3), 2022'),
    'swin': dict(title='Swin Transformer: Hierarchical Vision Transformer using Shifted Windows',
                 where='ICCV 2021'),
    'convnext': dict(title='A ConvNet for the 2020s', where='CVPR 2022'),
}
# Official code of the base architectures, as footnoted in the MSCSA paper (none for ResNet).
_BASE_CODE = {
    'pvt_v2': 'https://github.com/whai362/PVT',
    'swin': 'https://github.com/microsoft/Swin-Transformer',
    'convnext': 'https://github.com/facebookresearch/ConvNeXt',
}
_DESCRIPTIONS = {
    'maformer': (
        "A MAFormer image classification model and multi-scale feature backbone: a dual-stream "
        "transformer with local window attention and Global Learning with Down-sampling (GLD), "
        "fused by Multi-scale Attention Fusion (MAF)."),
    'mscsa': (
        "timm's `{base}` with the Multi-Stage Cross-Scale Attention (MSCSA) add-on module, which "
        "attends across the feature maps of all stages, as an image classification model and "
        "multi-scale feature backbone."),
    'timm': "timm's `{model}`, exported with the maformer-zoo Hub tools.",
}


def model_card_info(model_name: str) -> Dict[str, Any]:
    """Family, base architecture, papers and original code of a registered model (card data)."""
    if model_name.startswith('maformer'):
        family, base, papers = 'maformer', None, ['maformer']
    elif model_name.endswith('_mscsa'):
        family, base = 'mscsa', model_name[:-len('_mscsa')]
        base_key = next((k for k in ('pvt_v2', 'swin', 'convnext', 'resnet') if base.startswith(k)), None)
        papers = ['mscsa'] + ([base_key] if base_key else [])
    else:
        family, base, papers = 'timm', None, []
    base_key = papers[1] if len(papers) > 1 else None
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(model_name)
    paper_list = [_PAPERS[p] for p in papers]
    if family == 'timm' and cfg is not None and (cfg.paper_name or cfg.paper_ids):
        # any other timm model exported with this machinery: what its pretrained cfg says
        paper_list = [dict(title=cfg.paper_name or str(cfg.paper_ids), where=str(cfg.paper_ids or ''))]
    return dict(
        family=family,
        base=base,
        papers=paper_list,
        citations=[_PAPERS[p]['bibtex'] for p in papers if 'bibtex' in _PAPERS[p]],
        original=None if family != 'timm' else (cfg.origin_url if cfg else None),
        base_code=_BASE_CODE.get(base_key),
        description=_DESCRIPTIONS[family].format(base=base, model=model_name),
        license=(cfg.license if cfg and cfg.license else 'apache-2.0'),
    )


_USAGE = '''### Image Classification
```python
from PIL import Image
import timm
import torch
import maformer_zoo  # registers the maformer-zoo models with timm

model = timm.create_model('{load_name}', pretrained=True)
model = model.eval()

data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)

img = Image.open('image.jpg').convert('RGB')
with torch.no_grad():
    output = model(transforms(img).unsqueeze(0))  # (1, {num_classes}) logits
top5_probabilities, top5_class_indices = torch.topk(output.softmax(dim=1) * 100, k=5)
```

### Feature Map Extraction
```python
from PIL import Image
import timm
import torch
import maformer_zoo

model = timm.create_model('{load_name}', pretrained=True, features_only=True)
model = model.eval()

data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)

img = Image.open('image.jpg').convert('RGB')
with torch.no_grad():
    feature_maps = model(transforms(img).unsqueeze(0))
for reduction, o in zip(model.feature_info.reduction(), feature_maps):
    print(reduction, o.shape)  # strides 4, 8, 16, 32
```

### Image Embeddings
```python
from PIL import Image
import timm
import torch
import maformer_zoo

model = timm.create_model('{load_name}', pretrained=True, num_classes=0)  # remove the classifier
model = model.eval()

data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)

img = Image.open('image.jpg').convert('RGB')
with torch.no_grad():
    embedding = model(transforms(img).unsqueeze(0))  # (1, num_features) pooled embedding
    # or, without pooling:
    feature_map = model.forward_features(transforms(img).unsqueeze(0))
    embedding = model.forward_head(feature_map, pre_logits=True)
```

### Loading from a local folder or file (offline)
```python
import timm
import maformer_zoo

# a folder written by scripts/push_to_hub.py (model.safetensors + config.json)
model = timm.create_model('local-dir:/path/to/{model}.{tag}', pretrained=True)
# or a weight file
model = timm.create_model('{model}', pretrained=True,
                          pretrained_cfg_overlay=dict(file='/path/to/model.safetensors'))
```
'''


def _weights_section(repo_id: str, weights: WeightsInfo) -> str:
    if not weights.published:
        text = (
            f"**Weights:** no trained weights are published for `{repo_id}` yet. The architecture is "
            f"complete and can be trained from scratch (`pretrained=False`); with "
            f"`pretrained=True` it loads weights you provide (an `hf-hub:` cache, a `local-dir:` "
            f"folder or a file, see Model Usage) and otherwise fails with an error that lists these "
            f"ways.")
        if weights.description:
            text += f" The weights in this folder were {weights.description}"
        return text + '\n'
    text = f"**Weights:** published in `{repo_id}`"
    text += f"; {weights.description}\n" if weights.description else '.\n'
    return text


def render_model_card(
        model_name: str,
        stats: Dict[str, Any],
        weights: Optional[WeightsInfo] = None,
        tag: str = DEFAULT_TAG,
        num_classes: int = 1000,
        repo_id: Optional[str] = None,
) -> str:
    """A timm-style model card (``README.md``) for ``model_name``, from data.

    Args:
        model_name: a registered maformer-zoo model.
        stats: ``measure_model_stats`` output (``params_m`` required; GMACs/activations optional).
        weights: what the card says about the weights (default: nothing published).
        tag: pretrained tag of the repo id.
        num_classes: classes of the head the card's repo holds.
        repo_id: the repo the card is for (default ``maformer-zoo/<name>.<tag>``).
    """
    info = model_card_info(model_name)
    weights = weights or WeightsInfo()
    repo_id = repo_id or hub_id(model_name, tag)
    lines = [
        '---',
        'tags:',
        '- image-classification',
        '- timm',
        '- maformer-zoo',
    ] + ([f'- {info["family"]}'] if info['family'] != 'timm' else []) + [
        'library_name: timm',
        f'license: {info["license"]}',
        'datasets:',
        '- imagenet-1k',
        'pipeline_tag: image-classification',
        '---',
        f'# Model card for {model_name}.{tag}',
        '',
        info['description'],
        '',
        _weights_section(repo_id, weights),
        '## Model Details',
        '- **Model Type:** Image classification / feature backbone',
        '- **Model Stats:**',
        f'  - Params (M): {stats["params_m"]:.2f}',
    ]
    if stats.get('gmacs') is not None:
        lines.append(f'  - GMACs: {stats["gmacs"]:.2f}')
    if stats.get('macts') is not None:
        lines.append(f'  - Activations (M): {stats["macts"]:.2f}')
    if stats.get('gmacs') is None:
        lines.append('  - GMACs / Activations (M): not measured for this export (see hub_cards/)')
    if stats.get('img_size'):
        height, width = stats['img_size']
        lines.append(f'  - Image size: {height} x {width}')
    lines.append('  - Counted with fvcore as timm does (batch of 1, MACs; fused attention counted as unfused)')
    lines.append('- **Papers:**')
    lines += [f'  - {p["title"]} ({p["where"]})' for p in info['papers']]
    if info['original']:
        lines.append(f'- **Original:** {info["original"]}')
    else:
        lines.append('- **Original:** none; the paper links no official code. Implementation: maformer-zoo')
    if info['base_code']:
        lines.append(f'- **Base architecture code:** {info["base_code"]}')
    lines.append('- **Dataset:** ImageNet-1k' + ('' if weights.published else ' (intended; no weights yet)'))
    lines.append(f'- **Classes:** {num_classes}')
    lines.append(f'- **Hub id:** `{repo_id}`')
    for name, value in weights.results.items():
        lines.append(f'- **{name}:** {value}')
    # the registry name loads the default repo with the default head; any other repo by its id
    from timm.models import get_pretrained_cfg
    default_cfg = get_pretrained_cfg(f'{model_name}.{tag}')
    by_name = repo_id == hub_id(model_name, tag) and default_cfg is not None and \
        default_cfg.num_classes == num_classes
    load_name = f'{model_name}.{tag}' if by_name else f'hf-hub:{repo_id}'
    lines += ['', '## Model Usage', _USAGE.format(
        model=model_name, load_name=load_name, tag=tag, num_classes=num_classes)]
    lines.append('## Citation')
    for bibtex in info['citations']:
        lines += ['```bibtex', bibtex, '```']
    return '\n'.join(lines) + '\n'

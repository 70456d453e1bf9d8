"""Model construction shared by every maformer-zoo family.

``build_zoo_model`` is timm's ``build_model_with_cfg`` with two things added:

* ``features_only`` defaults to timm's *getter* feature class (our models are not sequential
  chains, so the feature wrapper calls ``forward_intermediates``), at strides 4/8/16/32;
* pretrained-weight failures become errors that say what went wrong and what to do, instead of a
  bare hub or ``load_state_dict`` traceback: the weights are missing (offline without a cached
  file, a wrong path), unsafe (a pickle that needs code to load), corrupt, or do not fit the model.
  The key check runs even where timm loads non-strictly (``features_only``, a new ``num_classes``),
  so a checkpoint of the wrong architecture never half-loads silently.

Weights are loaded by timm's ``load_pretrained``, which reads safetensors or
``torch.load(weights_only=True)`` only, so a pickle carrying code is refused.

``timm.create_model('hf-hub:maformer-zoo/...')`` fetches the repo's ``config.json`` inside timm,
before any of our code runs, and an offline miss there is a bare ``LocalEntryNotFoundError``
that names neither the repo nor a remedy. timm has no hook for this, so importing this module
wraps the one function timm's factory calls for it (``timm.models._factory.
load_model_config_from_hf``); see ``_install_hub_config_errors`` for how narrow that wrap is.
"""
import functools
import inspect
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Type

import torch
from torch import nn
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from timm.layers import register_notrace_function

HUB_ORG = 'maformer-zoo'


class PretrainedWeightsNotFoundError(RuntimeError):
    """No usable pretrained weight file for a model (offline without a cache, missing file...).

    Raised for a Hugging Face Hub failure, the instance is also of the hub error's own type (e.g.
    ``huggingface_hub.errors.LocalEntryNotFoundError``), so code catching that keeps working.
    """


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not fit the model it is loaded into."""


class UnsafeCheckpointError(RuntimeError):
    """A pickled checkpoint that needs code to load; refused (only tensors may be loaded)."""


class CorruptCheckpointError(RuntimeError):
    """A weight file that cannot be read (truncated or damaged safetensors, not a checkpoint)."""


def weight_sources_help(variant: str, hf_hub_id: Optional[str] = None) -> str:
    """The ways to provide pretrained weights for ``variant``, as shown in error messages."""
    repo = (hf_hub_id or f'{HUB_ORG}/{variant}.in1k').split('@')[0]
    text = (
        f"Ways to provide the weights of '{variant}':\n"
        f"  * download them into the Hugging Face cache on a machine with internet\n"
        f"      hf download {repo}\n"
        f"    and copy the cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub) here; with the file\n"
        f"    cached, HF_HUB_OFFLINE=1 works;\n"
        f"  * load a local Hub folder (model.safetensors + config.json, as written by\n"
        f"    scripts/push_to_hub.py --dry-run):\n"
        f"      timm.create_model('local-dir:/path/to/folder', pretrained=True)\n"
        f"  * load a local file:\n"
        f"      timm.create_model('{variant}', pretrained=True,\n"
        f"                        pretrained_cfg_overlay=dict(file='/path/model.safetensors'))\n"
        f"  * or use pretrained=False for random initialisation."
    )
    if repo.startswith(HUB_ORG + '/'):
        from ..hub import weights_published  # lazy: hub imports this module
        if not weights_published(repo):
            text += (f"\nNote: no trained weights are published for '{repo}' yet "
                     f"(see hub_cards/ and the README's model table).")
    return text


def _hub_error_types() -> Tuple[type, ...]:
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - very old huggingface_hub
        return ()
    return tuple(
        getattr(hf_errors, name) for name in (
            'LocalEntryNotFoundError', 'OfflineModeIsEnabled', 'RepositoryNotFoundError',
            'EntryNotFoundError', 'RevisionNotFoundError', 'GatedRepoError',
        ) if hasattr(hf_errors, name))


def _is_hub_unavailable(err: BaseException) -> bool:
    """True for a Hugging Face Hub failure: offline miss, unknown repo/file, no connection."""
    if isinstance(err, _hub_error_types()):
        return True
    return isinstance(err, (ConnectionError, TimeoutError)) or isinstance(err, OSError) and (
        'huggingface' in str(err).lower() or 'offline' in str(err).lower())


@functools.lru_cache(maxsize=None)
def _error_like(base: Type[Exception], original: Type[BaseException]) -> Type[Exception]:
    """``base`` that is also an instance of ``original`` (falls back to ``base`` if impossible)."""
    if issubclass(original, base) or not issubclass(original, Exception):
        return base
    try:
        return type(base.__name__, (base, original), {'__module__': base.__module__})
    except TypeError:  # incompatible layouts; keep our type and chain the original
        return base


def _hub_cache_dir(cache_dir: Any = None) -> str:
    if cache_dir:
        return str(cache_dir)
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def hub_weights_error(
        err: BaseException, variant: str, repo: str, what: str = 'model.safetensors',
        cache_dir: Any = None,
) -> PretrainedWeightsNotFoundError:
    """The error for weights (or ``config.json``) a Hugging Face repo could not provide."""
    from huggingface_hub import constants
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ''
    offline = constants.HF_HUB_OFFLINE
    reason = (
        f"HF_HUB_OFFLINE=1 and '{what}' of '{repo}' is not in the cache ({_hub_cache_dir(cache_dir)})"
        if offline else
        f"the Hub did not provide '{what}' of '{repo}' ({type(err).__name__}: {first_line})")
    cls = _error_like(PretrainedWeightsNotFoundError, type(err))
    return cls(
        f"Could not get pretrained weights for '{variant}' from Hugging Face repo '{repo}': "
        f"{reason}.\n" + weight_sources_help(variant, repo))


def _weight_source(cfg: Dict[str, Any]) -> Tuple[str, Any]:
    """Where timm's ``load_pretrained`` will read from: (kind, location), as timm resolves it."""
    if cfg.get('source') == 'hf-hub':
        return 'hf-hub', cfg.get('hf_hub_id')
    if cfg.get('source') == 'local-dir':
        return 'local-dir', cfg.get('file')
    if cfg.get('state_dict') is not None:
        return 'state_dict', None
    if cfg.get('file'):
        return 'file', cfg['file']
    if cfg.get('hf_hub_id'):
        return 'hf-hub', cfg['hf_hub_id']
    if cfg.get('url'):
        return 'url', cfg['url']
    return '', None


def _explain_pretrained_error(
        err: BaseException, variant: str, cfg: Dict[str, Any], cache_dir: Any,
) -> Optional[Exception]:
    """A clear error for a failed pretrained load, or None to let ``err`` through unchanged."""
    kind, location = _weight_source(cfg)
    where = f"{kind} '{location}'" if location else 'the pretrained config'
    message = str(err)
    if isinstance(err, (CheckpointMismatchError, PretrainedWeightsNotFoundError)):
        return None  # already explained (by the key check below)
    if kind == 'hf-hub' and _is_hub_unavailable(err):
        return hub_weights_error(err, variant, location, cache_dir=cache_dir)
    if isinstance(err, FileNotFoundError) or 'No suitable checkpoints found' in message:
        return _error_like(PretrainedWeightsNotFoundError, type(err))(
            f"Pretrained weights for '{variant}' not found: {where} does not exist or holds no "
            f"weight file (model.safetensors, *.pth, *.bin).\n" + weight_sources_help(variant, None))
    if 'weights_only' in message and ('blocked' in message or 'Unpickl' in message):
        return UnsafeCheckpointError(
            f"Refused to load the pretrained weights of '{variant}' from {where}: it is a pickle "
            f"that needs code to load ({message.strip().splitlines()[0]}). maformer-zoo reads "
            f"weights only from safetensors or torch.load(weights_only=True). If you trust the "
            f"file, convert it yourself to safetensors (safetensors.torch.save_file) and load that.")
    if type(err).__name__ == 'SafetensorError' or 'deserializ' in message.lower():
        return CorruptCheckpointError(
            f"The pretrained weight file of '{variant}' ({where}) is not a readable safetensors "
            f"file ({message.strip()}). It is truncated or damaged: download or export it again.")
    if isinstance(err, RuntimeError) and 'Error(s) in loading state_dict' in message:
        return CheckpointMismatchError(
            f"The checkpoint ({where}) does not fit '{variant}': {message}\n" + _MISMATCH_ADVICE)
    return None


_MISMATCH_ADVICE = (
    "Check that it was saved from the same architecture (and variant) and that num_classes / "
    "in_chans match, or load it with pretrained=False and model.load_state_dict(..., "
    "strict=False) if a partial load is intended.")


def state_dict_mismatch(
        model: nn.Module,
        state_dict: Dict[str, Any],
        ignore: Sequence[str] = (),
        ignore_shape: Sequence[str] = (),
) -> Dict[str, list]:
    """Keys missing from / unexpected in ``state_dict`` and shape mismatches, against ``model``.

    Args:
        model: the module the weights are for.
        state_dict: the weights (after any checkpoint filter).
        ignore: key prefixes left out of every check (a classifier timm replaces).
        ignore_shape: key names whose shape may differ (an input conv timm adapts to in_chans).
    """
    expected = model.state_dict()

    def kept(key: str) -> bool:
        return not any(key == p or key.startswith(p + '.') for p in ignore)

    missing = sorted(k for k in expected if k not in state_dict and kept(k))
    unexpected = sorted(k for k in state_dict if k not in expected and kept(k))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and kept(k) and k not in ignore_shape
        and hasattr(state_dict[k], 'shape') and tuple(state_dict[k].shape) != tuple(expected[k].shape))
    return dict(missing=missing, unexpected=unexpected, shape_mismatch=shapes)


def format_mismatch(problems: Dict[str, list], limit: int = 8) -> str:
    """Human-readable summary of ``state_dict_mismatch`` output (first ``limit`` of each)."""
    lines = []
    for name, items in problems.items():
        if items:
            more = f' ... and {len(items) - limit} more' if len(items) > limit else ''
            lines.append(f"  {name.replace('_', ' ')} ({len(items)}): {', '.join(items[:limit])}{more}")
    return '\n'.join(lines)


def _as_names(value: Any) -> Tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _saved_architecture_note(kind: str, location: Any, variant: str) -> str:
    """' (its config.json says ...)' when an exported folder's config names another architecture."""
    if kind not in ('file', 'local-dir') or not location:
        return ''
    import json
    from pathlib import Path
    path = Path(location)
    config_file = (path if path.is_dir() else path.parent) / 'config.json'
    try:
        architecture = json.loads(config_file.read_text(encoding='utf-8')).get('architecture')
    except (OSError, ValueError, AttributeError):
        return ''
    if architecture and architecture != variant:
        return f" (its config.json says they are weights of '{architecture}')"
    return ''


def _checked_filter(
        filter_fn: Optional[Callable], variant: str, cfg: Dict[str, Any],
) -> Callable[[Dict[str, Any], nn.Module], Dict[str, Any]]:
    """Wrap a checkpoint filter so the filtered weights are checked against the model's keys.

    timm drops the classifier and loads non-strictly when ``num_classes`` differs or for
    ``features_only``; without this check a checkpoint of another architecture would then load
    partially with only a log line. The classifier is left to timm (it replaces it on purpose),
    and the input conv may differ in shape (timm adapts it to ``in_chans``).
    """
    takes_model = filter_fn is not None and len(inspect.signature(filter_fn).parameters) >= 2

    def filter_and_check(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
        if filter_fn is not None:
            state_dict = filter_fn(state_dict, model) if takes_model else filter_fn(state_dict)
        problems = state_dict_mismatch(
            model, state_dict,
            ignore=_as_names(cfg.get('classifier')),
            ignore_shape=tuple(f'{c}.weight' for c in _as_names(cfg.get('first_conv'))))
        if any(problems.values()):
            kind, location = _weight_source(cfg)
            raise CheckpointMismatchError(
                f"The pretrained weights ({kind} '{location}') do not fit '{variant}'"
                f"{_saved_architecture_note(kind, location, variant)}:\n"
                f"{format_mismatch(problems)}\n" + _MISMATCH_ADVICE)
        return state_dict

    return filter_and_check


def build_zoo_model(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool = False,
        pretrained_filter_fn: Optional[Callable] = None,
        default_out_indices: Sequence[int] = (0, 1, 2, 3),
        **kwargs: Any,
) -> nn.Module:
    """Build ``model_cls`` for timm entrypoint ``variant`` (see the module docstring)."""
    out_indices = kwargs.pop('out_indices', tuple(default_out_indices))
    feature_cfg = dict(flatten_sequential=True, out_indices=out_indices, feature_cls='getter')
    cfg: Dict[str, Any] = {}
    if pretrained:
        cfg = resolve_pretrained_cfg(
            variant,
            pretrained_cfg=kwargs.get('pretrained_cfg'),
            pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'),
        ).to_dict()
        pretrained_filter_fn = _checked_filter(pretrained_filter_fn, variant, cfg)
    try:
        return build_model_with_cfg(
            model_cls,
            variant,
            pretrained,
            pretrained_filter_fn=pretrained_filter_fn,
            feature_cfg=feature_cfg,
            **kwargs,
        )
    except Exception as err:  # noqa: BLE001 - re-raised with context below
        clear = _explain_pretrained_error(err, variant, cfg, kwargs.get('cache_dir')) if pretrained else None
        if clear is None:
            raise
        raise clear from err


def _install_hub_config_errors() -> None:
    """Make ``create_model('hf-hub:maformer-zoo/...')`` fail offline with a useful message.

    timm's factory reads ``config.json`` through ``timm.models._factory.load_model_config_from_hf``
    before it knows the architecture, so no model entrypoint of ours can catch that failure.
    The wrap is deliberately narrow:

    * it only re-raises; results and every other error pass through untouched;
    * only for repos of our Hub organisation (``maformer-zoo/``); other repos keep timm's error;
    * the raised error is also an instance of the original hub error type, so existing
      ``except LocalEntryNotFoundError`` code behaves the same;
    * it is installed once (idempotent) and skipped if a future timm renames the function.
    """
    try:
        from timm.models import _factory
    except ImportError:  # pragma: no cover
        return
    original = getattr(_factory, 'load_model_config_from_hf', None)
    if original is None or getattr(original, '_maformer_zoo_wrapped', False):
        return

    @functools.wraps(original)
    def load_model_config_from_hf(model_id: str, *args: Any, **kwargs: Any):
        try:
            return original(model_id, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised below
            if not (str(model_id).startswith(HUB_ORG + '/') and _is_hub_unavailable(err)):
                raise
            repo = str(model_id).split('@')[0]
            variant = repo.split('/', 1)[1].split('.')[0]
            raise hub_weights_error(
                err, variant, repo, what='config.json', cache_dir=kwargs.get('cache_dir')) from err

    load_model_config_from_hf._maformer_zoo_wrapped = True
    load_model_config_from_hf.__wrapped_timm__ = original
    _factory.load_model_config_from_hf = load_model_config_from_hf


_install_hub_config_errors()


@register_notrace_function  # Python control flow on sizes: an FX leaf, still run by the traced graph
def check_input(x: torch.Tensor, in_chans: int, min_size: int, model_name: str) -> None:
    """Fail early, and clearly, on an input the model cannot take.

    Args:
        x: the batch given to ``forward``.
        in_chans: channels the model was built for.
        min_size: smallest height/width the model supports.
        model_name: shown in the message.
    """
    if x.ndim != 4:
        raise ValueError(
            f"{model_name} expects a 4-D batch (B, C, H, W); got a tensor of shape {tuple(x.shape)}. "
            f"Add a batch dimension with x.unsqueeze(0) for a single image.")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"{model_name} was built for {in_chans} input channels but got {x.shape[1]} "
            f"(input shape {tuple(x.shape)}). Convert the images, or create the model with "
            f"in_chans={x.shape[1]}.")
    if x.shape[-2] < min_size or x.shape[-1] < min_size:
        raise ValueError(
            f"{model_name} needs inputs of at least {min_size}x{min_size} pixels; got "
            f"{x.shape[-2]}x{x.shape[-1]}. Resize or pad the images.")

#!/usr/bin/env python3
"""Turn a training checkpoint into a Hugging Face Hub repo of timm weights, and upload it.

From a timm ``train.py`` checkpoint (``state_dict`` / ``state_dict_ema`` / ``optimizer`` /
``args`` ...), any checkpoint with a ``model`` / ``model_ema`` entry, or a plain state dict
(``.safetensors``, or a ``.pth``/``.pth.tar``/``.bin`` readable with
``torch.load(weights_only=True)``), the script

1. picks the weights (``--weights auto``: the EMA weights when present) and drops the rest
   (optimizer, scheduler, epoch, args), stripping ``module.`` / ``_orig_mod.`` prefixes;
2. builds ``--model`` and loads the weights *strictly*: a checkpoint that does not match is
   refused and nothing is written;
3. writes ``model.safetensors``, timm's ``config.json`` and a ``README.md`` model card into
   ``--out`` (default ``hub_export/<model>.<tag>``);
4. unless ``--dry-run``, creates ``maformer-zoo/<model>.<tag>`` (or ``--repo-id``) on the Hub
   and uploads the folder with ``huggingface_hub`` (needs ``hf auth login`` or ``HF_TOKEN``).

A pickle that needs code to load is refused (weights are read only with safetensors or
``torch.load(weights_only=True)``).

Examples::

    python scripts/push_to_hub.py --model maformer_s --checkpoint output/train/.../model_best.pth.tar --dry-run
    python scripts/push_to_hub.py --model maformer_s --checkpoint model_best.pth.tar \\
        --top1 81.2 --top5 95.6
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', required=True, help="architecture, e.g. maformer_s")
    parser.add_argument('--checkpoint', required=True, help="checkpoint or state dict file")
    parser.add_argument('--out', default=None, help="folder to write (default hub_export/<model>.<tag>)")
    parser.add_argument('--tag', default='in1k', help="pretrained tag of the repo id (default in1k)")
    parser.add_argument('--repo-id', default=None, help="Hub repo (default maformer-zoo/<model>.<tag>)")
    parser.add_argument('--weights', choices=('auto', 'ema', 'model'), default='auto',
                        help="auto: EMA weights if the checkpoint has them; ema: require them; "
                             "model: the raw (non-EMA) weights")
    parser.add_argument('--num-classes', type=int, default=None,
                        help="classes of the checkpoint's head (default: read from the classifier)")
    parser.add_argument('--model-args', default='{}',
                        help="JSON of other constructor args the checkpoint was trained with")
    parser.add_argument('--top1', type=float, default=None, help="measured ImageNet-1k top-1 (%%) for the card")
    parser.add_argument('--top5', type=float, default=None, help="measured ImageNet-1k top-5 (%%) for the card")
    parser.add_argument('--no-measure', action='store_true',
                        help="skip the fvcore GMACs/activations measurement for the card (params only)")
    parser.add_argument('--dry-run', action='store_true', help="write the folder, do not upload")
    parser.add_argument('--private', action='store_true', help="create the Hub repo as private")
    parser.add_argument('--commit-message', default=None)
    return parser.parse_args(argv)


def _check_model_args(model_name: str, model_args: dict) -> None:
    """Each --model-args key must be a constructor argument of the model (close names suggested)."""
    import inspect
    import timm
    from maformer_zoo.utils.names import close_names_hint
    import maformer_zoo
    if not timm.is_model(model_name):
        raise SystemExit(f"error: unknown model '{model_name}'{close_names_hint(model_name, timm.list_models())}.")
    if model_name not in maformer_zoo.list_models():  # the card, Hub id and config are ours: refuse before writing
        raise SystemExit(f"error: '{model_name}' is a timm model, not one of maformer-zoo's "
                         f"({', '.join(maformer_zoo.list_models()[:3])}, ...): this script writes our model cards; "
                         f"publish it with timm.models.push_to_hf_hub instead. Nothing was written.")
    cls = type(timm.create_model(model_name, pretrained=False)) if model_args else None
    params = inspect.signature(cls.__init__).parameters if cls else {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # the model forwards unknown keys itself
    accepted = set(params) - {'self'}
    for key in model_args:
        if key not in accepted:
            raise SystemExit(f"error: --model-args key '{key}' is not an argument of {model_name}"
                             f"{close_names_hint(key, accepted)}.")


def main(argv: Optional[List[str]] = None) -> Path:
    args = parse_args(argv)
    import maformer_zoo  # noqa: F401  (registers the models with timm)
    from maformer_zoo.hub import PUBLISHED_HUB_IDS, hub_id
    from maformer_zoo.weights import export_hub_folder

    try:
        model_args = json.loads(args.model_args)
    except ValueError as err:
        raise SystemExit(f"error: --model-args is not valid JSON: {err}")
    if not isinstance(model_args, dict):
        raise SystemExit(f"error: --model-args must be a JSON object, e.g. '{{\"drop_path_rate\": 0.1}}'.")
    _check_model_args(args.model, model_args)
    repo_id = args.repo_id or hub_id(args.model, args.tag)
    out = Path(args.out or Path('hub_export') / f'{args.model}.{args.tag}')
    results = {}
    if args.top1 is not None:
        results['ImageNet-1k top-1 (%)'] = args.top1
    if args.top5 is not None:
        results['ImageNet-1k top-5 (%)'] = args.top5

    export = export_hub_folder(
        args.model,
        args.checkpoint,
        out,
        weights=args.weights,
        num_classes=args.num_classes,
        model_args=model_args,
        tag=args.tag,
        repo_id=repo_id,
        # uploading publishes the weights, and the card says so; a dry run changes nothing
        published=True if not args.dry_run else None,
        results=results,
        measure=not args.no_measure,
    )
    print(f"wrote {out}: " + ', '.join(sorted(p.name for p in out.iterdir())))
    print(f"weights entry: {export['state_dict_key'] or '(plain state dict)'}; stats: "
          + ', '.join(f'{k}={v}' for k, v in export['stats'].items() if k != 'uncounted_ops'))
    if args.dry_run:
        print(f"dry run: not uploaded (repo would be {repo_id})")
        return out

    from huggingface_hub import HfApi
    api = HfApi()
    repo = api.create_repo(repo_id, private=args.private, exist_ok=True)
    api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=str(out),
        commit_message=args.commit_message or f"Add {args.model} weights ({export['state_dict_key'] or 'state dict'})",
    )
    print(f"uploaded to https://huggingface.co/{repo.repo_id}")
    if repo.repo_id not in PUBLISHED_HUB_IDS:
        print(f"now add '{repo.repo_id}' to PUBLISHED_HUB_IDS in maformer_zoo/hub.py and rerun "
              f"dev/make_hub_cards.py so cards and errors say the weights exist")
    return out


if __name__ == '__main__':
    try:
        main()
    except Exception as err:  # noqa: BLE001 - a CLI: one clear line, not a traceback
        from maformer_zoo.errors import (CheckpointMismatchError, CorruptCheckpointError,
                                         PretrainedWeightsNotFoundError, UnsafeCheckpointError)
        if isinstance(err, (CheckpointMismatchError, CorruptCheckpointError,
                            PretrainedWeightsNotFoundError, UnsafeCheckpointError, ValueError)):
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        raise

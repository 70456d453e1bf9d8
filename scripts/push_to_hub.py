#!/usr/bin/env python3
"""Turn a training checkpoint into a Hugging Face Hub repo of timm weights, and upload it.

Reads the checkpoint safely, takes its weights (EMA first with ``--weights auto``), loads them strictly
into ``--model`` (nothing is written if they do not fit), writes ``model.safetensors``, timm's
``config.json`` (with the class names) and a model card into ``--out``, then, unless ``--dry-run``,
uploads the folder to ``maformer-zoo/<model>.<tag>`` (or ``--repo-id``). Details: docs/weights.md.

    python scripts/push_to_hub.py --model maformer_s --checkpoint output/train/.../model_best.pth.tar --dry-run
"""
import argparse
import inspect
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
                        help="auto: EMA weights if the checkpoint has them; ema: require them; model: the raw ones")
    parser.add_argument('--num-classes', type=int, default=None, help="classes of the head (default: its rows)")
    parser.add_argument('--model-args', default='{}', help="JSON of other constructor args it was trained with")
    parser.add_argument('--top1', type=float, default=None, help="measured ImageNet-1k top-1 (%%) for the card")
    parser.add_argument('--top5', type=float, default=None, help="measured ImageNet-1k top-5 (%%) for the card")
    parser.add_argument('--no-measure', action='store_true', help="params only on the card (no fvcore count)")
    parser.add_argument('--dry-run', action='store_true', help="write the folder, do not upload")
    parser.add_argument('--private', action='store_true', help="create the Hub repo as private")
    parser.add_argument('--commit-message', default=None)
    return parser.parse_args(argv)


def _check_model(model_name: str, model_args: dict) -> None:
    """Before anything is written: one of our models, and each --model-args key one of its arguments."""
    import timm
    import maformer_zoo
    from maformer_zoo.utils.names import close_names_hint
    if model_name not in maformer_zoo.list_models():  # the card and the Hub id are ours
        raise SystemExit(f"error: '{model_name}' is a timm model, not one of maformer-zoo's ("
                         f"{', '.join(maformer_zoo.list_models()[:3])}, ...): publish it with "
                         f"timm.models.push_to_hf_hub instead. Nothing was written." if timm.is_model(model_name) else
                         f"error: unknown model '{model_name}'"
                         f"{close_names_hint(model_name, maformer_zoo.list_models())}.")
    params = inspect.signature(type(timm.create_model(model_name)).__init__).parameters if model_args else {}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):  # else the model forwards unknown keys itself
        for key in set(model_args) - set(params):
            raise SystemExit(f"error: --model-args key '{key}' is not an argument of {model_name}"
                             f"{close_names_hint(key, set(params) - {'self'})}.")


def main(argv: Optional[List[str]] = None) -> Path:
    args = parse_args(argv)
    from maformer_zoo.cards import hub_id
    from maformer_zoo.weights import export_hub_folder
    try:
        model_args = json.loads(args.model_args)
    except ValueError as err:
        raise SystemExit(f"error: --model-args is not valid JSON: {err}")
    if not isinstance(model_args, dict):
        raise SystemExit("error: --model-args must be a JSON object, e.g. '{\"drop_path_rate\": 0.1}'.")
    _check_model(args.model, model_args)
    repo_id = args.repo_id or hub_id(args.model, args.tag)
    out = Path(args.out or Path('hub_export') / f'{args.model}.{args.tag}')
    results = {f'ImageNet-1k {k} (%)': v for k, v in (('top-1', args.top1), ('top-5', args.top5)) if v is not None}
    export = export_hub_folder(args.model, args.checkpoint, out, weights=args.weights, num_classes=args.num_classes,
                               model_args=model_args, tag=args.tag, repo_id=repo_id, results=results,
                               published=not args.dry_run, measure=not args.no_measure)  # an upload publishes
    print(f"wrote {out}: " + ', '.join(sorted(p.name for p in out.iterdir())))
    print(f"weights entry: {export['state_dict_key'] or '(plain state dict)'}; stats: "
          + ', '.join(f'{k}={v}' for k, v in export['stats'].items() if k != 'uncounted_ops'))
    if args.dry_run:
        print(f"dry run: not uploaded (repo would be {repo_id})")
        return out
    # the folder written and checked above (timm's push_to_hf_hub would write a second one and keep an old card)
    from huggingface_hub import HfApi
    api = HfApi()
    repo = api.create_repo(repo_id, private=args.private, exist_ok=True)
    api.upload_folder(repo_id=repo.repo_id, folder_path=str(out), commit_message=args.commit_message or
                      f"Add {args.model} weights ({export['state_dict_key'] or 'state dict'})")
    print(f"uploaded to https://huggingface.co/{repo.repo_id}; now give the model's pretrained cfg "
          f"hf_hub_id='{repo.repo_id}' (timm's convention: no hf_hub_id, no weights) and rerun dev/make_hub_cards.py")
    return out


if __name__ == '__main__':
    try:
        main()
    except (RuntimeError, ValueError) as err:  # ours (maformer_zoo.errors) are RuntimeErrors: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

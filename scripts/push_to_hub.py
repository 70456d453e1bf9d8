#!/usr/bin/env python3
"""Export a training checkpoint as a Hugging Face Hub folder of timm weights and a model card, and upload it.

    python scripts/push_to_hub.py --model maformer_s --checkpoint output/train/.../model_best.pth.tar --dry-run

Details: docs/weights.md.
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
    parser.add_argument('--model-args', type=json.loads, default={}, help="JSON object of other constructor args")
    parser.add_argument('--top1', type=float, default=None, help="measured ImageNet-1k top-1 (%%) for the card")
    parser.add_argument('--top5', type=float, default=None, help="measured ImageNet-1k top-5 (%%) for the card")
    parser.add_argument('--no-measure', action='store_true', help="params only on the card (no fvcore count)")
    parser.add_argument('--dry-run', action='store_true', help="write the folder, do not upload")
    parser.add_argument('--private', action='store_true', help="create the Hub repo as private")
    parser.add_argument('--commit-message', default='Add model')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Path:
    args = parse_args(argv)
    import timm
    from timm.models import push_to_hf_hub, save_for_hf
    from timm.models._hub import generate_readme
    import maformer_zoo
    from maformer_zoo.cards import describe_checkpoint, hub_id, model_card
    from maformer_zoo.errors import CheckpointMismatchError
    from maformer_zoo.utils.atomic import write_atomic
    from maformer_zoo.utils.flops import count_params, measure_model_stats
    from maformer_zoo.utils.names import close_names_hint
    from maformer_zoo.weights import check_fit, label_names_of, load_checkpoint_file, unwrap_state_dict
    ours = maformer_zoo.list_models()  # before anything is written: one of ours (the card and Hub id are ours)
    if args.model not in ours:
        raise SystemExit(f"error: '{args.model}' is a timm model, not one of maformer-zoo's: publish it with "
                         f"timm.models.push_to_hf_hub. Nothing was written." if timm.is_model(args.model) else
                         f"error: unknown model '{args.model}'{close_names_hint(args.model, ours)}.")
    if not isinstance(args.model_args, dict):
        raise SystemExit("error: --model-args must be a JSON object, e.g. '{\"drop_path_rate\": 0.1}'.")
    params = inspect.signature(type(timm.create_model(args.model)).__init__).parameters if args.model_args else {}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):  # else the model forwards unknown keys itself
        for key in set(args.model_args) - set(params):
            raise SystemExit(f"error: --model-args key '{key}' is not an argument of {args.model}"
                             f"{close_names_hint(key, set(params) - {'self'})}.")
    loaded = load_checkpoint_file(args.checkpoint)
    arch = loaded.get('arch') if isinstance(loaded, dict) else None
    if isinstance(arch, str) and arch.split('.')[0] != args.model:
        raise CheckpointMismatchError(f"The checkpoint was trained as '{arch}' (its 'arch' entry), not "
                                      f"'{args.model}': export it with --model {arch.split('.')[0]}.")
    state_dict, key = unwrap_state_dict(loaded, args.weights)
    head = state_dict.get(f'{timm.models.get_pretrained_cfg(args.model).classifier}.weight')
    kwargs = dict(args.model_args, num_classes=args.num_classes or (head.shape[0] if head is not None else None))
    model = timm.create_model(args.model, **{k: v for k, v in kwargs.items() if v is not None}).eval()
    check_fit(model, state_dict, f"'{args.checkpoint}'")  # strict: nothing is written if they do not fit
    model.load_state_dict(state_dict)
    label_names = label_names_of(loaded, model.num_classes)
    model_config = dict(label_names=label_names) if label_names else None
    stats = dict(params_m=round(count_params(model), 2)) if args.no_measure else measure_model_stats(model)
    repo_id = args.repo_id or hub_id(args.model, args.tag)
    results = {f'ImageNet-1k {k} (%)': v for k, v in (('top-1', args.top1), ('top-5', args.top5)) if v is not None}
    card = model_card(args.model, stats, args.tag, model.num_classes, repo_id, not args.dry_run,  # an upload publishes
                      describe_checkpoint(args.checkpoint, loaded, key), results)
    out = Path(args.out or Path('hub_export') / f'{args.model}.{args.tag}')
    save_for_hf(model, str(out), model_config=model_config, safe_serialization=True)
    write_atomic(out / 'README.md', generate_readme(card, f'{args.model}.{args.tag}'))
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}; weights entry: {key or '(plain state dict)'}"
          f"; stats: " + ', '.join(f'{k}={v}' for k, v in stats.items() if k != 'uncounted_ops'))
    if not args.dry_run:  # timm keeps a card already in the repo
        push_to_hf_hub(model, repo_id, args.commit_message, private=args.private, model_config=model_config,
                       model_card=card, safe_serialization=True)
        print(f"uploaded to https://huggingface.co/{repo_id}; now give the model's pretrained cfg "
              f"hf_hub_id='{repo_id}' (timm's convention: no hf_hub_id, no weights) and rerun dev/make_hub_cards.py")
    return out


if __name__ == '__main__':
    try:
        main()
    except (RuntimeError, ValueError) as err:  # ours (maformer_zoo.errors) are RuntimeErrors: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

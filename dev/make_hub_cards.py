#!/usr/bin/env python3
"""Write ``hub_cards/<model>.md`` for every registered maformer-zoo model, and ``hub_cards/stats.json``.

Each card is ``maformer_zoo.cards.render_model_card`` of the model's numbers, measured by
``maformer_zoo.utils.flops.measure_model_stats`` (fvcore as timm's benchmark.py counts, at the model's
default input size, random weights on the CPU: the big models take a minute each).

    python dev/make_hub_cards.py [--models maformer_s ...] [--check]   # --check: exit 1 if a card is stale
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='*', default=None, help="default: maformer_zoo.list_models()")
    parser.add_argument('--out', default=str(ROOT / 'hub_cards'))
    parser.add_argument('--check', action='store_true', help="re-measure and compare with the committed cards")
    args = parser.parse_args(argv)
    import timm
    import maformer_zoo
    from maformer_zoo.cards import render_model_card
    from maformer_zoo.utils.atomic import write_atomic
    from maformer_zoo.utils.flops import measure_model_stats
    names = args.models or maformer_zoo.list_models()
    if set(names) - set(maformer_zoo.list_models()):
        parser.error(f"not maformer-zoo models: {', '.join(sorted(set(names) - set(maformer_zoo.list_models())))}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats_file = out / 'stats.json'
    all_stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    stale = []
    for name in names:
        stats = measure_model_stats(timm.create_model(name))
        print(f"{name}: {stats}", flush=True)  # the big models take a minute each
        card, card_file = render_model_card(name, stats), out / f'{name}.md'
        if not card_file.is_file() or card_file.read_text(encoding='utf-8') != card:
            stale.append(name)
        if not args.check:
            write_atomic(card_file, card)
            all_stats[name] = dict(stats, img_size=list(stats['img_size']))
    if args.check:
        if stale:
            print(f"out of date: {', '.join(stale)}; run dev/make_hub_cards.py", file=sys.stderr)
        return 1 if stale else 0
    registered = set(maformer_zoo.list_models())  # models no longer registered drop out
    write_atomic(stats_file, json.dumps({k: v for k, v in all_stats.items() if k in registered}, indent=2,
                                        sort_keys=True) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())

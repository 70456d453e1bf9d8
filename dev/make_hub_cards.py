#!/usr/bin/env python3
"""Write ``hub_cards/<model>.md`` and ``hub_cards/stats.json`` for every maformer-zoo model, measured on the CPU
(the big models take a minute each); ``--check`` exits 1 if a committed card is stale. docs/weights.md.

    python dev/make_hub_cards.py [--models maformer_s ...] [--check]
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import timm

import maformer_zoo
from maformer_zoo.cards import render_model_card
from maformer_zoo.utils.atomic import write_atomic
from maformer_zoo.utils.flops import measure_model_stats

OUT = Path(__file__).resolve().parents[1] / 'hub_cards'


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='*', choices=maformer_zoo.list_models(), default=maformer_zoo.list_models())
    parser.add_argument('--check', action='store_true', help="re-measure and compare with the committed cards")
    args = parser.parse_args(argv)
    stats = json.loads((OUT / 'stats.json').read_text())
    stale = []
    for name in args.models:
        stats[name] = measure_model_stats(timm.create_model(name))
        print(f"{name}: {stats[name]}", flush=True)
        card, card_file = render_model_card(name, stats[name]), OUT / f'{name}.md'
        if not card_file.is_file() or card_file.read_text(encoding='utf-8') != card:
            stale.append(name)
        if not args.check:
            write_atomic(card_file, card)
    if args.check:
        if stale:
            print(f"out of date: {', '.join(stale)}; run dev/make_hub_cards.py", file=sys.stderr)
        return int(bool(stale))
    stats = {k: dict(v, img_size=list(v['img_size'])) for k, v in stats.items() if k in maformer_zoo.list_models()}
    write_atomic(OUT / 'stats.json', json.dumps(stats, indent=2, sort_keys=True) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())

#!/usr/bin/env python
"""Run the benchmark scripts (``make bench``) and write their tables as Markdown and a plot.

    python benchmarks/run_all.py                 # mscsa, maformer and necks, default settings
    python benchmarks/run_all.py maformer -- --iters 2 --warmup 1
    python benchmarks/run_all.py --report-only output/bench/20261201-0130   # redo the report

Each benchmark runs as ``benchmarks/<name>.py --json <output-dir>/<name>.json [options after --]``
and prints its own tables as it goes; the contract is that it writes a JSON list of flat dicts,
one per measured row. From those files this writes ``report.md`` (one table per benchmark, every
column) and ``report.png`` (every ``*ratio*`` column as bars) beside them, in a new
``<output-dir>/<date-time>/``.
Benchmarks are scripts, not tests: they time on whatever machine runs them and report ratios
against a baseline measured in the same process (timm's base model, Swin-T, plain FPN).
docs/benchmarks.md says what each measures and holds the numbers of our machines.
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = {
    'mscsa': 'mscsa.py',        # MSCSA models vs their timm bases
    'maformer': 'maformer.py',  # MAFormer-S/B/L vs Swin-T
    'necks': 'necks.py',        # FPN vs FINE-FPN vs ASFF-FPN at 800x1333
}
DEFAULT_OUTPUT = os.path.join('output', 'bench')


def load_rows(path: str) -> Optional[List[Dict]]:
    """The rows of a benchmark's JSON file, or None when it is missing or breaks the contract."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return None
    return rows


def _cell(value) -> str:
    if value is None:
        return '-'
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return '-'
        return f'{value:.3f}' if abs(value) < 100 else f'{value:.1f}'
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value).replace('|', '\\|')


def markdown_table(rows: List[Dict]) -> str:
    """Every key of ``rows`` as a column, in order of first appearance."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + ' --- |' * len(columns)]
    lines += ['| ' + ' | '.join(_cell(row.get(c)) for c in columns) + ' |' for row in rows]
    return '\n'.join(lines)


def _label_column(rows: List[Dict]) -> Optional[str]:
    """The first column holding text (the model or variant name)."""
    for key in dict.fromkeys(key for row in rows for key in row):
        if all(isinstance(row.get(key), str) for row in rows):
            return key
    return None


def _ratio_columns(rows: List[Dict]) -> List[str]:
    return [key for key in dict.fromkeys(k for row in rows for k in row) if 'ratio' in key
            and any(isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)
                    for row in rows)]


def write_report(results: Dict[str, Optional[List[Dict]]], output_dir: str,
                 notes: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Write ``report.md`` and ``report.png`` for ``{benchmark: rows or None}``; returns paths."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    notes = notes or {}
    os.makedirs(output_dir, exist_ok=True)
    paths = dict(markdown=os.path.join(output_dir, 'report.md'),
                 plot=os.path.join(output_dir, 'report.png'))
    lines = ['# Benchmark report', '',
             f'{time.strftime("%Y-%m-%d %H:%M")}, {platform.machine()}, {os.cpu_count()} CPUs, '
             f'Python {platform.python_version()}. Ratios are against the baseline measured in '
             f'the same process; the plot is `report.png`.', '']
    plotted = {}
    for name, rows in results.items():
        lines += [f'## {name}', '']
        if notes.get(name):
            lines += [notes[name], '']
        if not rows:
            lines += ['No rows: the benchmark wrote no JSON list of flat dicts '
                      '(`--json PATH`).', '']
            continue
        lines += [markdown_table(rows), '']
        label, ratios = _label_column(rows), _ratio_columns(rows)
        if ratios:
            plotted[name] = (label, ratios, rows)
    with open(paths['markdown'], 'w') as f:
        f.write('\n'.join(lines))

    fig, axes = plt.subplots(max(1, len(plotted)), 1, squeeze=False,
                             figsize=(9, 3.2 * max(1, len(plotted))))
    for ax, (name, (label, ratios, rows)) in zip(axes[:, 0], plotted.items()):
        width = 0.8 / len(ratios)
        for i, column in enumerate(ratios):
            values = [row.get(column) for row in rows]
            values = [v if isinstance(v, (int, float)) else float('nan') for v in values]
            ax.bar([x + i * width for x in range(len(rows))], values, width, label=column)
        ax.set_xticks([x + width * (len(ratios) - 1) / 2 for x in range(len(rows))])
        ax.set_xticklabels([str(row.get(label, i)) for i, row in enumerate(rows)],
                           rotation=20, ha='right', fontsize=8)
        ax.axhline(1.0, color='black', linewidth=0.8)
        ax.set_title(name)
        ax.legend(fontsize=7)
    if not plotted:
        axes[0, 0].text(0.5, 0.5, 'no ratio columns to plot', ha='center', va='center')
        axes[0, 0].set_axis_off()
    fig.tight_layout()
    fig.savefig(paths['plot'], dpi=100)
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('which', nargs='*',
                        help=f'benchmarks to run, of {sorted(BENCHMARKS)} (default: all)')
    parser.add_argument('--output-dir', default=DEFAULT_OUTPUT,
                        help='the JSON files and the report go to a new <dir>/<date-time>/')
    parser.add_argument('--report-only', metavar='DIR', default=None,
                        help='run nothing: rewrite the report from the JSON files in DIR')
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index('--') if '--' in argv else len(argv)
    args = parser.parse_args(argv[:split])
    extra = argv[split + 1:]  # arguments after -- go to each script
    unknown = sorted(set(args.which) - set(BENCHMARKS))
    if unknown:
        parser.error(f'unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}')
    names = args.which or list(BENCHMARKS)

    if args.report_only:
        results = {name: load_rows(os.path.join(args.report_only, f'{name}.json'))
                   for name in names}
        paths = write_report(results, args.report_only)
        print(f'[bench] report: {paths["markdown"]}, plot: {paths["plot"]}')
        return 0

    out = os.path.join(args.output_dir, time.strftime('%Y%m%d-%H%M%S'))
    os.makedirs(out)  # a new folder per run: an earlier report is never overwritten
    status, results, notes = 0, {}, {}
    for i, name in enumerate(names, 1):
        json_path = os.path.join(out, f'{name}.json')
        cmd = [sys.executable, os.path.join(HERE, BENCHMARKS[name]), '--json', json_path, *extra]
        shown = ' '.join(['python', os.path.relpath(cmd[1])] + cmd[2:])
        print(f'[bench {i}/{len(names)}] {name}: {shown}', flush=True)
        start = time.perf_counter()
        code = subprocess.call(cmd)
        seconds = time.perf_counter() - start
        results[name] = load_rows(json_path)
        rows = len(results[name]) if results[name] is not None else 0
        print(f'[bench {i}/{len(names)}] {name}: exit {code}, {rows} rows, {seconds:.0f} s',
              flush=True)
        notes[name] = f'`{shown}`: exit {code}, {seconds:.0f} s.'
        status |= code
    paths = write_report(results, out, notes)
    print(f'[bench] report: {paths["markdown"]}, plot: {paths["plot"]}')
    return status


if __name__ == '__main__':
    sys.exit(main())

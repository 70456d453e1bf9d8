"""`make bench`'s report: benchmarks/run_all.py turns the benchmarks' JSON rows into Markdown and a PNG."""
import json
import os
import subprocess
import sys

from conftest import ROOT, script_env


def test_report_from_json_rows(tmp_path):
    (tmp_path / 'mscsa.json').write_text(json.dumps([
        dict(model='resnet18', params_base=11.7, params_aug=16.8, ratio=0.912, cpu_ratio=0.874),
        dict(model='convnext_tiny', params_base=28.6, params_aug=44.7, ratio=0.95, cpu_ratio=None),
    ]))
    (tmp_path / 'necks.json').write_text(json.dumps({'args': {}, 'variants': {}}))  # not rows
    cmd = [sys.executable, os.path.join(ROOT, 'benchmarks', 'run_all.py'), 'mscsa', 'necks',
           'maformer', '--report-only', str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env=script_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / 'report.md').read_text()
    assert '| model | params_base | params_aug | ratio | cpu_ratio |' in report
    assert '| resnet18 | 11.700 | 16.800 | 0.912 | 0.874 |' in report
    assert '| convnext_tiny | 28.600 | 44.700 | 0.950 | - |' in report
    necks = report.split('## necks')[1].split('## maformer')[0]
    assert 'No rows' in necks and 'No rows' in report.split('## maformer')[1]
    with open(tmp_path / 'report.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'

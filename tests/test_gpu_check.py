"""benchmarks/gpu_check.py runs end to end on CPU at tiny sizes, so the GPU check cannot rot."""
import json
import os
import subprocess
import sys

from conftest import ROOT, script_env


def test_gpu_check_runs_on_cpu_tiny(tmp_path):
    out = tmp_path / 'gpu_check.json'
    env = script_env()
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'benchmarks', 'gpu_check.py'), '--device', 'cpu', '--tiny',
         '--json', str(out)],
        env=env, capture_output=True, text=True, timeout=900)
    rows = json.loads(out.read_text())
    failed = [r for r in rows if not r['ok']]
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-3000:])
    checks = {r['check'] for r in rows}
    assert checks == {'train_step', 'autocast', 'throughput', 'peak_memory', 'mask_rcnn_step'}
    assert sum(r['check'] == 'train_step' for r in rows) == 10
    assert {r['neck'] for r in rows if r['check'] == 'mask_rcnn_step'} == {'fpn', 'fine', 'asff'}
    ratios = [r for r in rows if r['check'] == 'throughput']
    assert len(ratios) == 8 and all(r.get('ratio', r.get('ratio_maformer_s', 0)) > 0 for r in ratios)
    assert all(isinstance(v, (str, int, float, bool, type(None))) for r in rows for v in r.values())

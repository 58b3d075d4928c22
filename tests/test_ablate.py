"""ablate.py: a sweep end to end, resuming a killed sweep, the results table, the plots, and bad knobs.

    OMP_NUM_THREADS=1 pytest tests/test_ablate.py

The sweeps run the real train.py and finetune.py on the embedded text (the cheapest modality) for 2 steps each.
"""
import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace

import matplotlib.pyplot as plt
import numpy as np
import pytest

import ablate
from conftest import ROOT

ENV = dict(os.environ, OMP_NUM_THREADS='1')
SWEEP = ['--modality', 'text', '--knob', 'top-k', '--values', '1', '2', '--seeds', '0',
         '--finetune-flags', '--steps 2 --batch-size 4 --labeled 16', '--', '--steps', '2', '--batch-size', '4',
         '--micro-batch-size', '4', '--log-every', '1']


def ablate_cli(*args, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / 'ablate.py'), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True, **kw)


def rows(out):
    return [json.loads(line) for line in (out / 'results.jsonl').read_text().splitlines()]


def test_a_sweep_killed_after_its_first_run_resumes_without_redoing_it(tmp_path):
    """2 values × 1 seed + scratch. SIGKILL once the first run is in results.jsonl; the same command then finishes the
    other two and leaves the first run's files untouched; a third call runs nothing. The rows hold what the runs wrote."""
    out = tmp_path / 'sweep'
    proc = ablate_cli('--out', str(out), *SWEEP)
    deadline = time.time() + 300
    while not ((out / 'results.jsonl').exists() and (out / 'results.jsonl').read_text().count('\n') >= 1):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else 'timeout'
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)                                    # ablate.py and whatever child it had started
    proc.wait()
    first = rows(out)
    assert [(r['value'], r['seed']) for r in first] == [('1', 0)]
    run1 = out / 'runs' / '1-seed0'
    stamps = {p: p.stat().st_mtime_ns for p in run1.rglob('*') if p.is_file()}

    second = ablate_cli('--out', str(out), *SWEEP)
    text, _ = second.communicate(timeout=600)
    assert second.returncode == 0, text[-3000:]
    assert '1 of 3 runs already finished, skipped' in text
    done = rows(out)
    assert done[0] == first[0] and [(r['value'], r['seed']) for r in done] == [('1', 0), ('2', 0), ('scratch', 0)]
    assert {p: p.stat().st_mtime_ns for p in run1.rglob('*') if p.is_file()} == stamps   # nothing of run 1 was redone
    for r in done:                                                         # each row is what its run wrote
        metrics = json.loads((out / 'runs' / f'{r["value"]}-seed0' / 'score' / 'metrics.json').read_text())
        assert r['metric'] == 'accuracy' and r['score'] == metrics['value'] and metrics['linear_probe'] is True
        assert r['status'] == 'ok' and r['knob'] == 'top-k'
        if r['value'] != 'scratch':
            log = [json.loads(x) for x in (out / 'runs' / f'{r["value"]}-seed0' / 'pretrain' / 'log.jsonl').read_text().splitlines()]
            assert (r['steps'], r['final_loss'], r['target_std'], r['pred_std']) == (2, log[-1]['loss'], log[-1]['target_var'],
                                                                                   log[-1]['pred_var'])
            config = json.loads((out / 'runs' / f'{r["value"]}-seed0' / 'pretrain' / 'config.json').read_text())
            assert config['train']['top_k'] == int(r['value']) and config['train']['seed'] == 0
    assert 'init scratch' in (out / 'runs' / 'scratch-seed0' / 'score.log').read_text()
    for name in ('ablation.png', 'curves.png'):                            # real images, not empty files
        image = plt.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0.01

    third = ablate_cli('--out', str(out), *SWEEP)
    text, _ = third.communicate(timeout=300)
    assert third.returncode == 0 and '3 of 3 runs already finished, skipped' in text
    assert rows(out) == done


def test_a_sweep_refuses_other_settings_in_the_same_out(tmp_path):
    (tmp_path / 'sweep.json').write_text(json.dumps(dict(modality='text', knob='top_k', score='finetune')))
    with pytest.raises(SystemExit) as e:
        ablate.main(['--out', str(tmp_path), *SWEEP])
    assert 'holds a sweep with other' in str(e.value.code) and 'score' in str(e.value.code)


def test_results_table_holds_mean_and_sample_std_per_value(tmp_path):
    """results.md against numpy: mean ± sample std (ddof 1) per value, the difference to scratch, collapsed runs apart."""
    scores = {'1': [0.50, 0.60, 0.70], '8': [0.80, 0.85, 0.95], 'scratch': [0.40, 0.42, 0.47]}
    rows = [dict(value=v, seed=s, status='ok', metric='accuracy', score=x, higher_is_better=True, final_loss=1.0 + s,
                 target_std=0.5, pred_std=0.25, pretrain_s=10.0 * (s + 1)) for v, xs in scores.items() for s, x in enumerate(xs)]
    rows.append(dict(value='1', seed=3, status='collapsed', metric=None, score=None, final_loss=None, target_std=0.01,
                     pred_std=0.0, pretrain_s=5.0))
    args = Namespace(knob='top_k', values=['1', '8'], seeds=[0, 1, 2, 3], modality='speech', score='probe', cmdline='x')
    ablate.write_table(args, rows, tmp_path / 'results.md')
    lines = {line.split(' | ')[0].strip('| '): line for line in (tmp_path / 'results.md').read_text().splitlines()
             if line.startswith('| ') and not line.startswith('| --')}
    for value, xs in scores.items():
        mean, std = np.mean(xs), np.std(xs, ddof=1)
        assert f'| {mean:.3f} ± {std:.3f} |' in lines[value], lines[value]
        if value != 'scratch':
            assert f'| {mean - np.mean(scores["scratch"]):+.3f} |' in lines[value]
    assert '| 3 (+1 collapsed) |' in lines['1'] and '| 20 |' in lines['8']        # mean pretraining s of seeds 0, 1, 2
    assert 'Figure 2' in (tmp_path / 'results.md').read_text()             # the paper's direction for --top-k


def test_training_seconds_adds_the_segments_of_a_resumed_run():
    """elapsed_s restarts at a resume: 5 → 12 (stopped), then 3 → 8: 12 + 8 = 20 s."""
    log = [dict(elapsed_s=t) for t in (5.0, 12.0, 3.0, 8.0)]
    assert ablate.training_seconds(log) == 20.0


@pytest.mark.parametrize('argv, message', [
    (['--knob', 'not-a-flag', '--values', '1'], 'train.py has no flag --not-a-flag'),
    (['--knob', 'seed', '--values', '1'], 'ablate.py sets --seed itself'),
    (['--knob', 'top-k', '--values', '1', '99'], '--top-k 99 must be between 1 and --layers (4)'),
    (['--knob', 'target-layer', '--values', 'ffn', 'nope'], '--target-layer nope: choose from'),
    (['--knob', 'top-k', '--values', '1', '1'], 'must not repeat'),
    (['--knob', 'top-k', '--values', '1', '--finetune-flags', '--labeled -3'], 'finetune.py: --labeled must be ≥ 0'),
])
def test_a_bad_knob_or_value_is_one_clear_error(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        ablate.main(['--modality', 'speech', '--out', str(tmp_path), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and message in err[-1] and err[-1].startswith('ablate.py: error:'), err
    assert not (tmp_path / 'results.jsonl').exists()


def test_event_lines_of_a_log_are_not_rows(tmp_path):
    """train.py logs a bad sample or a skipped update as an event line without loss or time: the curves, the final
    loss and the wall time read the step lines only."""
    lines = [dict(step=10, loss=2.0, target_var=0.5, pred_var=0.4, elapsed_s=3.0), dict(event='bad_sample', file='x.wav'),
             dict(step=20, loss=1.0, target_var=0.6, pred_var=0.5, elapsed_s=6.0)]
    (tmp_path / 'log.jsonl').write_text('\n'.join(json.dumps(x) for x in lines) + '\n')
    rows = ablate.read_log(tmp_path / 'log.jsonl')
    assert [r['step'] for r in rows] == [10, 20] and ablate.training_seconds(rows) == 6.0

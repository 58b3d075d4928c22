"""train.py from the command line: one step, its outputs, and clear errors.   pytest tests/test_train.py"""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SMALL = ['--dim', '32', '--layers', '2', '--heads', '2', '--ffn-dim', '64', '--conv-dim', '16', '--top-k', '2',
         '--batch-size', '4', '--micro-batch-size', '2', '--crop', '16000', '--workers', '0']


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / 'train.py'), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_one_step_from_the_command_line(tmp_path):
    r = run('--modality', 'speech', '--steps', '2', '--log-every', '1', '--out', str(tmp_path), *SMALL)
    assert r.returncode == 0, r.stderr
    assert 'M parameters' in r.stdout
    for name in ('config.json', 'log.jsonl', 'checkpoint.pt', 'curves.png'):
        assert (tmp_path / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records] == [1, 2]
    assert {'step', 'loss', 'lr', 'ema_decay', 'target_var', 'pred_var', 'samples_per_s'} <= set(records[0])
    ckpt = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    assert {'student', 'teacher', 'optimizer', 'step', 'config', 'rng'} <= set(ckpt) and ckpt['step'] == 2
    assert ckpt['config']['model']['dim'] == 32 and ckpt['config']['train']['top_k'] == 2
    assert not any(k.startswith(('_orig_mod', 'module')) for k in ckpt['student'])
    assert set(ckpt['teacher']) == {k[len('encoder.'):] for k in ckpt['student'] if k.startswith('encoder.')}


@pytest.mark.parametrize('flag, value, words', [('--top-k', '13', '--top-k 13'), ('--mask-prob', '1.5', '--mask-prob 1.5'),
                                                 ('--target-layer', 'fc3', '--target-layer fc3'), ('--preset', 'huge', '--preset huge'),
                                                 ('--micro-batch-size', '0', '--micro-batch-size 0'), ('--heads', '0', '--heads 0'),
                                                 ('--batch-size', '0', '--batch-size 0')])
def test_out_of_range_flags_fail_with_the_flag_name(flag, value, words):
    r = run(flag, value, '--preset', 'base') if flag != '--preset' else run(flag, value)
    assert r.returncode == 2 and words in r.stderr and 'Traceback' not in r.stderr


def test_bad_data_folder_fails_in_one_line(tmp_path):
    r = run('--data', str(tmp_path / 'missing'), '--out', str(tmp_path / 'out'), *SMALL)
    assert r.returncode == 1 and 'missing: no such directory' in r.stderr and 'Traceback' not in r.stderr
    for i in range(2):
        (tmp_path / f'broken{i}.wav').write_bytes(b'RIFF0000WAVEjunk')
    r = run('--data', str(tmp_path), '--out', str(tmp_path / 'out'), '--steps', '1', *SMALL)
    assert r.returncode == 1 and 'broken' in r.stderr and '.wav: cannot read audio' in r.stderr and 'Traceback' not in r.stderr


def test_tri_stage_schedule():
    from train import TrainConfig, lr_at
    cfg = TrainConfig(lr=1.0, steps=100, warmup=0.1, hold=0.6)
    assert lr_at(0, cfg) == pytest.approx(0.01) and lr_at(5, cfg) == pytest.approx(0.505)
    assert lr_at(10, cfg) == lr_at(69, cfg) == 1.0
    assert lr_at(85, cfg) == pytest.approx(0.1)                       # halfway through the decay: 0.01 ** 0.5
    assert lr_at(100, cfg) == pytest.approx(0.01)


def test_ranks_share_out_each_epoch_without_overlap():
    """Two ranks draw disjoint micro-batches in every epoch, also when the data does not split evenly."""
    import numpy as np
    from train import batches, parse_args

    class Numbered(torch.utils.data.Dataset):                         # utterance i is the constant i, 1 s long
        lengths = [16000] * 21

        def __len__(self):
            return 21

        def __getitem__(self, i):
            return np.full(16000, float(i), np.float32), ''

    _, cfg = parse_args(['--micro-batch-size', '2', '--batch-size', '4', '--workers', '0'])
    seen = {}
    for rank in (0, 1):
        it = batches(Numbered(), cfg, rank, 2, pin=False)
        ids = [next(it)[0][:, 0].long().tolist() for _ in range(10)]  # 5 micro-batches per rank and epoch
        seen[rank] = [set(sum(ids[:5], [])), set(sum(ids[5:], []))]
    for epoch in (0, 1):
        assert len(seen[0][epoch]) == len(seen[1][epoch]) == 10 and not seen[0][epoch] & seen[1][epoch]
    assert seen[0][0] != seen[0][1]                                   # reshuffled

"""Shared test setup: the repository root on sys.path, and the optional real data in ../shared/data."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = Path(os.environ.get('D2V_SHARED_DATA', ROOT.parent / 'shared' / 'data'))


@pytest.fixture
def shared_data():
    """../shared/data (or $D2V_SHARED_DATA); the test is skipped where it is absent, as in a user's fresh clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'{SHARED_DATA} is absent')
    return SHARED_DATA


def pretrain_then_finetune(tmp_path, train_args, finetune_args):
    """`train.py TRAIN_ARGS --steps 2` into tmp_path/pre, then `finetune.py --init <its checkpoint> FINETUNE_ARGS --steps 2`
    into tmp_path/ft, one thread each; both must succeed and the fine-tuning must start from the pretrained weights.
    → (train.py's stdout, the fine-tuned state dict)."""
    import subprocess
    import torch
    env = dict(os.environ, OMP_NUM_THREADS='1')
    pre = subprocess.run([sys.executable, str(ROOT / 'train.py'), *train_args, '--steps', '2', '--workers', '0',
                          '--out', str(tmp_path / 'pre')], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert pre.returncode == 0, pre.stderr[-2000:]
    ft = subprocess.run([sys.executable, str(ROOT / 'finetune.py'), '--init', str(tmp_path / 'pre' / 'checkpoint.pt'),
                         *finetune_args, '--steps', '2', '--out', str(tmp_path / 'ft')],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ft.returncode == 0, ft.stderr[-2000:]
    assert 'init pretrained' in ft.stdout and (tmp_path / 'ft' / 'metrics.json').stat().st_size > 0
    weights = torch.load(tmp_path / 'ft' / 'finetuned.pt', weights_only=True)
    return pre.stdout, weights.get('model', weights)

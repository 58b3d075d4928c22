"""Faults injected into train.py and finetune.py, and what the run must do (README, "Resuming and failures").

    OMP_NUM_THREADS=1 pytest tests/test_resume.py

SIGKILL mid-run, SIGKILL inside a checkpoint save, SIGTERM and a process-group SIGINT, a malicious pickle, NaN losses,
a changed config on --resume, an unwritable --out. Every run is a real process (or main() in this one); the expected
values come from an uninterrupted run of the same command, never from the code under test.
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import finetune
import train
from checkpoint import CheckpointError, load, rng_state, save, set_rng_state
from conftest import ROOT

ENV = dict(os.environ, OMP_NUM_THREADS='1')        # one thread in every run: the same summation order, bit-exact losses
TINY = ['--dim', '32', '--layers', '2', '--heads', '2', '--ffn-dim', '64', '--top-k', '2', '--batch-size', '4',
        '--micro-batch-size', '2', '--workers', '0']
FLAGS = {'speech': TINY + ['--conv-dim', '16', '--crop', '16000'],
         'vision': ['--modality', 'vision'] + TINY,
         'text': ['--modality', 'text'] + TINY + ['--vocab-size', '5000', '--block-size', '32'],
         'speech-v2': ['--version', '2'] + TINY + ['--conv-dim', '16', '--crop', '16000', '--clones', '2', '--decoder-dim', '16',
                                                   '--decoder-groups', '2'],
         'vision-v2': ['--modality', 'vision', '--version', '2'] + TINY + ['--clones', '2', '--decoder-dim', '16',
                                                                          '--decoder-groups', '2'],
         'text-v2': ['--modality', 'text', '--version', '2'] + TINY + ['--vocab-size', '5000', '--block-size', '32', '--clones', '2',
                                                                      '--decoder-dim', '16']}
# train.main(argv) in a child process that SIGKILLs itself when update `at` (0-based) begins
KILL_AT_UPDATE = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
at, real = int(sys.argv[1]), train.train_step
def dying(model, teacher, optimizer, micro, step, *rest):
    if step == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(model, teacher, optimizer, micro, step, *rest)
train.train_step = dying
train.main(sys.argv[2:])
"""


def cli(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)


def lines(out, event=None):
    """log.jsonl: the metric lines (event None) or the events of one kind."""
    rows = [json.loads(x) for x in (out / 'log.jsonl').read_text().splitlines()]
    return [r for r in rows if r.get('event') == event]


def same_tensors(a, b):
    """Two nested checkpoint dicts hold bit-identical tensors and equal plain values."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return a == b


def assert_one_line_error(r, *words):
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(('train.py: error: ', 'finetune.py: error: ')), last
    for w in words:
        assert w in last, (w, last)


# ---------------------------------------------------------------------------------------------- SIGKILL and exact resume
@pytest.mark.parametrize('modality', ['speech', 'vision', 'text', 'speech-v2', 'vision-v2', 'text-v2'])
def test_resume_after_sigkill_logs_exactly_the_uninterrupted_losses(tmp_path, modality):
    """SIGKILL at update 7 of 10 (checkpoint at 4, log lines every 3, so the checkpoint falls inside a log interval);
    --resume redoes 5..10. Every logged loss and std, and the final weights, teacher and Adam state, are bit-identical
    to an uninterrupted run's. The resumed speech run also reads with a loader worker: the data do not depend on it."""
    args = ['--steps', '10', '--ckpt-every', '4', '--log-every', '3', *FLAGS[modality]]
    assert cli('train.py', *args, '--out', str(tmp_path / 'full')).returncode == 0
    killed = subprocess.run([sys.executable, '-c', KILL_AT_UPDATE.format(root=str(ROOT)), '6', *args, '--out', str(tmp_path / 'cut')],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert [r['step'] for r in lines(tmp_path / 'cut')] == [3, 6]                  # 6 is after the checkpoint: redone
    assert torch.load(tmp_path / 'cut' / 'checkpoint.pt', weights_only=True)['step'] == 4
    workers = ['--workers', '1'] if modality.startswith('speech') else []
    r = cli('train.py', *args, '--out', str(tmp_path / 'cut'), '--resume', *workers)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'resuming' in r.stdout and 'at step 4 of 10' in r.stdout
    full, cut = lines(tmp_path / 'full'), lines(tmp_path / 'cut')
    assert [r['step'] for r in cut] == [r['step'] for r in full] == [3, 6, 9, 10]
    for a, b in zip(full, cut):
        assert (a['loss'], a['target_var'], a['pred_var'], a['lr'], a['ema_decay']) == \
            (b['loss'], b['target_var'], b['pred_var'], b['lr'], b['ema_decay'])
    a, b = (torch.load(tmp_path / run / 'checkpoint.pt', weights_only=True) for run in ('full', 'cut'))
    for key in ('student', 'teacher', 'optimizer', 'step', 'data'):
        assert same_tensors(a[key], b[key]), key


def test_rng_state_round_trip_covers_python_numpy_and_torch():
    import random
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
    assert all(torch.is_tensor(state[k]['keys']) for k in ('python', 'numpy'))   # stored as tensors, loadable weights_only


# ---------------------------------------------------------------------------------------------- a kill inside a save
def test_a_kill_inside_a_save_keeps_the_previous_checkpoint(tmp_path):
    """The second checkpoint save (step 4) is SIGKILLed after half its bytes are written. checkpoint.pt is still the
    complete step-2 file (the half-written one is the .tmp beside it), and --resume finishes the run from it."""
    dying_save = f"""
import io, os, signal, sys, torch
sys.path.insert(0, {str(ROOT)!r})
import train
real, calls = torch.save, []
def save(obj, f):
    calls.append(1)
    if len(calls) == 2:
        buf = io.BytesIO()
        real(obj, buf)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real(obj, f)
torch.save = save
train.main(sys.argv[1:])
"""
    out = tmp_path / 'run'
    args = ['--steps', '6', '--ckpt-every', '2', '--log-every', '1', *FLAGS['speech'], '--out', str(out)]
    r = subprocess.run([sys.executable, '-c', dying_save, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL
    ckpt = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert ckpt['step'] == 2 and all(torch.isfinite(v).all() for v in ckpt['student'].values())
    half = out / 'checkpoint.pt.tmp'
    assert 0 < half.stat().st_size < (out / 'checkpoint.pt').stat().st_size
    with pytest.raises(Exception):
        torch.load(half, weights_only=True)
    r = cli('train.py', *args, '--resume')
    assert r.returncode == 0 and 'at step 2 of 6' in r.stdout, r.stderr[-2000:]
    assert torch.load(out / 'checkpoint.pt', weights_only=True)['step'] == 6 and not half.exists()


def test_save_refuses_non_finite_tensors_and_keeps_the_old_file(tmp_path):
    path = tmp_path / 'checkpoint.pt'
    save(path, dict(w=torch.ones(3), step=1))
    with pytest.raises(CheckpointError, match=r'optimizer\.state\.0\.exp_avg holds NaN/Inf'):
        save(path, dict(w=torch.ones(3), optimizer=dict(state={0: dict(exp_avg=torch.tensor([1.0, float('inf')]))}), step=2))
    assert torch.load(path, weights_only=True)['step'] == 1 and not path.with_name('checkpoint.pt.tmp').exists()


# ---------------------------------------------------------------------------------------------- safe loading
class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):                                                  # unpickling would run this
        return os.system, (f'touch {self.marker}',)


@pytest.mark.parametrize('script', ['train.py', 'finetune.py'])
def test_a_malicious_checkpoint_is_refused_and_runs_no_code(tmp_path, script):
    """checkpoint.pt replaced by a pickle whose __reduce__ runs a shell command; --resume must refuse it, run nothing."""
    marker = tmp_path / 'pwned'
    (tmp_path / 'out').mkdir()
    torch.save(dict(student=Evil(marker), step=1), tmp_path / 'out' / 'checkpoint.pt')
    args = FLAGS['speech'] if script == 'train.py' else ['--modality', 'vision', '--init', 'scratch', '--image-size', '16']
    r = cli(script, *args, '--steps', '2', '--out', str(tmp_path / 'out'), '--resume')
    assert_one_line_error(r, 'checkpoint.pt: refused to load', 'could run code')
    assert not marker.exists()
    with open(tmp_path / 'plain.pkl', 'wb') as f:                          # a bare pickle (not torch's zip) as well
        pickle.dump(Evil(marker), f, protocol=2)
    with pytest.raises(CheckpointError, match='refused to load'):
        load(tmp_path / 'plain.pkl')
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- NaN / Inf
def nan_losses(monkeypatch, module, name, bad_calls, inf_calls=()):
    """Make module.<name> (the loss) return NaN on the given calls (0-based, one per micro-batch), so the gradients are
    NaN too, or loss + inf on `inf_calls`: an infinite loss whose gradients stay finite."""
    real, calls = getattr(module, name), []

    def loss(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        bad = (float('nan'), 0.0) if len(calls) - 1 in bad_calls else (1.0, float('inf')) if len(calls) - 1 in inf_calls else None
        if bad:
            return (out[0] * bad[0] + bad[1], *out[1:]) if isinstance(out, tuple) else out * bad[0] + bad[1]
        return out
    monkeypatch.setattr(module, name, loss)


def test_nan_losses_skip_the_update_and_are_counted(tmp_path, monkeypatch):
    """NaN loss on update attempt 3 (one of its 2 micro-batches), on attempt 6 (both), and an infinite loss with finite
    gradients on attempt 8: those attempts change neither the student, the teacher nor Adam; the run still makes its
    6 updates, logs 3 skips, and saves finite tensors only."""
    nan_losses(monkeypatch, train, 'forward_loss', {4, 10, 11}, inf_calls={15})
    real_step, unchanged = train.train_step, []

    def spy(model, teacher, optimizer, micro, step, *rest):
        before = [p.detach().clone() for p in (*model.parameters(), *teacher.parameters())]
        stats, applied = real_step(model, teacher, optimizer, micro, step, *rest)
        if not applied:
            unchanged.append(all(torch.equal(a, p) for a, p in zip(before, (*model.parameters(), *teacher.parameters()))))
        return stats, applied
    monkeypatch.setattr(train, 'train_step', spy)
    train.main(['--steps', '6', '--log-every', '1', *FLAGS['speech'], '--out', str(tmp_path)])
    assert unchanged == [True, True, True]
    skips = lines(tmp_path, 'skipped update')                          # step: the update that was skipped
    assert [(s['step'], s['in_a_row']) for s in skips] == [(3, 1), (5, 1), (6, 1)]
    assert np.isnan(skips[0]['loss']) and np.isnan(skips[1]['grad_norm']) and skips[2]['loss'] == np.inf
    assert np.isfinite(skips[2]['grad_norm'])
    metrics = lines(tmp_path)
    assert [r['step'] for r in metrics] == [1, 2, 3, 4, 5, 6] and metrics[-1]['skipped_updates'] == 3
    assert all(np.isfinite(r['loss']) for r in metrics)
    ckpt = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    assert ckpt['step'] == 6 and all(s['step'].item() == 6 for s in ckpt['optimizer']['state'].values())   # 6 Adam steps
    for part in ('student', 'teacher'):
        assert all(torch.isfinite(v).all() for v in ckpt[part].values() if v.is_floating_point())


def test_max_bad_steps_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Every loss is NaN from update attempt 5 on: after --max-bad-steps 3 skips in a row the run stops with a message,
    and checkpoint.pt is still the step-4 one, finite."""
    nan_losses(monkeypatch, train, 'forward_loss', set(range(8, 100)))
    with pytest.raises(SystemExit, match=r'3 updates in a row had a NaN/Inf loss.*checkpoint\.pt is from step 4, the last good one'):
        train.main(['--steps', '8', '--ckpt-every', '2', '--log-every', '1', '--max-bad-steps', '3', *FLAGS['speech'],
                    '--out', str(tmp_path)])
    assert [s['in_a_row'] for s in lines(tmp_path, 'skipped update')] == [1, 2, 3]
    ckpt = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    assert ckpt['step'] == 4 and all(torch.isfinite(v).all() for v in ckpt['student'].values())


def test_finetune_skips_a_nan_update(tmp_path, monkeypatch):
    nan_losses(monkeypatch, finetune, 'loss_fn', {1})
    finetune.main(['--modality', 'vision', '--init', 'scratch', '--image-size', '16', '--steps', '3', '--batch-size', '4',
                   '--labeled', '16', '--log-every', '1', '--out', str(tmp_path)])
    assert [s['step'] for s in lines(tmp_path, 'skipped update')] == [2]
    m = json.loads((tmp_path / 'metrics.json').read_text())
    assert m['skipped_updates'] == 1 and [r['step'] for r in lines(tmp_path)] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------- SIGTERM, SIGINT
def interrupt(script, args, out, sig, group=False):
    """Start a run, send `sig` once its log has 3 metric lines (to the process group if `group`: Ctrl-C), wait."""
    p = subprocess.Popen([sys.executable, str(ROOT / script), *args, '--out', str(out)], cwd=ROOT, env=ENV, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=group)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if (out / 'log.jsonl').exists() and len(lines(out)) >= 3:
            break
        time.sleep(0.02)
    os.killpg(p.pid, sig) if group else p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    return p.returncode, err


SIGNALLED = ['--steps', '30', '--log-every', '3', '--ckpt-every', '1000', *FLAGS['speech']]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    """The log of SIGNALLED run without a signal (the batches do not depend on --workers, so one run serves all)."""
    out = tmp_path_factory.mktemp('uninterrupted')
    assert cli('train.py', *SIGNALLED, '--out', str(out)).returncode == 0
    return lines(out)


@pytest.mark.parametrize('sig, group, workers', [(signal.SIGTERM, True, '1'), (signal.SIGINT, True, '1'), (signal.SIGTERM, False, '0')])
def test_a_signal_saves_at_the_step_boundary_and_resume_is_exact(tmp_path, sig, group, workers, uninterrupted):
    """SIGTERM or SIGINT to every process of the run (a scheduler's preemption, Ctrl-C; the loader worker gets it too),
    or SIGTERM to the main process only: the run saves
    checkpoint.pt at the next step boundary, says how to continue, exits 128 + signal; resuming it logs the same
    losses as an uninterrupted run."""
    args = [*SIGNALLED, '--workers', workers]
    rc, err = interrupt('train.py', args, tmp_path / 'cut', sig, group)
    assert rc == 128 + sig, err[-2000:]
    step = torch.load(tmp_path / 'cut' / 'checkpoint.pt', weights_only=True)['step']
    assert 9 <= step < 30
    assert f'{sig.name}: saved {tmp_path / "cut" / "checkpoint.pt"} at step {step} of 30. To continue: python train.py' in err
    assert err.strip().endswith('--resume')
    r = cli('train.py', *args, '--out', str(tmp_path / 'cut'), '--resume')
    assert r.returncode == 0, r.stderr[-2000:]
    assert [(x['step'], x['loss']) for x in lines(tmp_path / 'cut')] == [(x['step'], x['loss']) for x in uninterrupted]


def test_finetune_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path):
    """finetune.py: SIGTERM mid-run saves checkpoint.pt; --resume ends with the same losses, metrics and weights as an
    uninterrupted run, and removes checkpoint.pt once finetuned.pt is written."""
    args = ['--modality', 'vision', '--init', 'scratch', '--image-size', '16', '--steps', '40', '--batch-size', '4',
            '--labeled', '32', '--log-every', '1']
    rc, err = interrupt('finetune.py', args, tmp_path / 'cut', signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and 'To continue: python finetune.py' in err, err[-2000:]
    assert 3 <= torch.load(tmp_path / 'cut' / 'checkpoint.pt', weights_only=True)['step'] < 40
    r = cli('finetune.py', *args, '--out', str(tmp_path / 'cut'), '--resume')
    assert r.returncode == 0, r.stderr[-2000:]
    assert cli('finetune.py', *args, '--out', str(tmp_path / 'full')).returncode == 0
    assert [(x['step'], x['loss']) for x in lines(tmp_path / 'cut')] == [(x['step'], x['loss']) for x in lines(tmp_path / 'full')]
    a, b = (json.loads((tmp_path / run / 'metrics.json').read_text()) for run in ('full', 'cut'))
    assert a['metrics'] == b['metrics']
    a, b = (torch.load(tmp_path / run / 'finetuned.pt', weights_only=True)['model'] for run in ('full', 'cut'))
    assert same_tensors(a, b) and not (tmp_path / 'cut' / 'checkpoint.pt').exists()


# ---------------------------------------------------------------------------------------------- config and --out
def test_resume_with_another_architecture_is_an_error_listing_the_keys(tmp_path):
    out = str(tmp_path / 'run')
    assert cli('train.py', '--steps', '2', *FLAGS['speech'], '--out', out).returncode == 0
    r = cli('train.py', '--steps', '2', *FLAGS['speech'], '--out', out)                 # no --resume: never overwritten
    assert_one_line_error(r, 'checkpoint.pt exists: pass --resume')
    r = cli('train.py', '--steps', '2', *FLAGS['speech'], '--dim', '48', '--heads', '4', '--lr', '0.01', '--out', out, '--resume')
    assert_one_line_error(r, "dim 32 → 48", "heads 2 → 4", "lr 0.002 → 0.01", 'only ')
    r = cli('train.py', '--modality', 'vision', *FLAGS['vision'], '--out', out, '--resume')
    assert_one_line_error(r, "modality 'speech' → 'vision'")
    r = cli('train.py', '--steps', '4', *FLAGS['speech'], '--log-every', '1', '--out', out, '--resume')   # allowed, stated
    assert r.returncode == 0 and 'changed: steps 2 → 4' in r.stdout, r.stderr[-2000:]
    assert torch.load(tmp_path / 'run' / 'checkpoint.pt', weights_only=True)['step'] == 4


def test_an_unwritable_out_fails_at_start_up(tmp_path):
    """--out below a regular file cannot be created: the error comes before the data are read (--data is missing too)."""
    (tmp_path / 'file').write_text('')
    for script, args in (('train.py', FLAGS['speech']), ('finetune.py', ['--modality', 'vision', '--init', 'scratch'])):
        r = cli(script, *args, '--data', str(tmp_path / 'missing'), '--out', str(tmp_path / 'file' / 'out'))
        assert_one_line_error(r, '--out', 'cannot write there')


# ---------------------------------------------------------------------------------------------- DDP
SIGTERM_ONE_RANK = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
real = train.train_step
def step(model, teacher, optimizer, micro, step, *rest):
    out = real(model, teacher, optimizer, micro, step, *rest)
    if step == 4 and os.environ['RANK'] == '1':            # after update 5, on rank 1 only
        os.kill(os.getpid(), signal.SIGTERM)
    return out
train.train_step = step
train.main(sys.argv[1:])
"""


def test_ddp_ranks_stop_together_and_resume_exactly(tmp_path):
    """torchrun, 2 gloo processes, gradient accumulation 2: SIGTERM reaches rank 1 only, after update 5. Both ranks save
    at the same step boundary (one checkpoint holding both ranks' RNG states and loss sums), and the resumed run logs
    the losses of an uninterrupted one, including the interval that spans the resume."""
    driver = tmp_path / 'driver.py'
    driver.write_text(SIGTERM_ONE_RANK.format(root=str(ROOT)))
    args = ['--steps', '10', '--log-every', '4', '--ckpt-every', '100', *FLAGS['speech'], '--batch-size', '8', '--device', 'cpu']

    def torchrun(script, *more):
        return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                               str(script), *args, *more], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert torchrun(ROOT / 'train.py', '--out', str(tmp_path / 'full')).returncode == 0
    r = torchrun(driver, '--out', str(tmp_path / 'cut'))
    assert r.returncode != 0 and 'saved' in r.stderr and 'To continue: torchrun --nproc_per_node 2 train.py' in r.stderr, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / 'cut' / 'checkpoint.pt', weights_only=True)
    assert ckpt['step'] == 5 and len(ckpt['rng']) == len(ckpt['loop']['loss_sum']) == 2
    r = torchrun(ROOT / 'train.py', '--out', str(tmp_path / 'cut'), '--resume')
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(x['step'], x['loss']) for x in lines(tmp_path / 'cut')] == [(x['step'], x['loss']) for x in lines(tmp_path / 'full')]


def test_a_checkpoint_from_an_older_version_is_refused_by_name():
    """A stored config that lacks a key this version has (a flag added since) cannot be resumed exactly: one error
    naming the missing keys, not a 'None → default' difference the user cannot act on."""
    from checkpoint import resume_changes
    with pytest.raises(CheckpointError, match=r'x\.pt was written by an older version, without pad, crop_step'):
        resume_changes(dict(steps=4), dict(steps=4, pad=False, crop_step=16000, resume=True), ('steps',), 'x.pt')
    assert resume_changes(dict(steps=4, pad=False), dict(steps=8, pad=False, resume=True), ('steps',), 'x.pt') == ['steps 4 → 8']
    # a knob whose default is what the older code did (config.UNCHANGED_DEFAULTS) resumes; another value is a change
    assert resume_changes(dict(steps=4), dict(steps=4, layer_norm_eps=0.0, resume=True), (), 'x.pt', dict(layer_norm_eps=0.0)) == []
    with pytest.raises(CheckpointError, match=r'layer_norm_eps 0.0 → 0.001'):
        resume_changes(dict(steps=4), dict(steps=4, layer_norm_eps=1e-3, resume=True), (), 'x.pt', dict(layer_norm_eps=0.0))

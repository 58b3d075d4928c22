"""finetune.py under torchrun, and gradient accumulation: the global batch (--batch-size) is one update whatever the
number of processes and micro-batches. Every expected value comes from another run: one process accumulating
micro-batches, an uninterrupted run, one forward pass of the whole batch.

    OMP_NUM_THREADS=1 pytest tests/test_finetune_ddp.py
"""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from config import fill_recipe, parse_finetune_args, parse_train_args
from conftest import ROOT

ENV = dict(os.environ, OMP_NUM_THREADS='1')
# a tiny architecture without dropout (the tiny preset has attention dropout): each rank draws its own, so only then
# can runs on different numbers of processes agree
ARCH = ['--dim', '32', '--layers', '2', '--heads', '2', '--ffn-dim', '64', '--top-k', '2', '--dropout', '0',
        '--attn-dropout', '0']
# vision: 32 labelled images, 6 updates of 8 in micro-batches of 2 (so the stream crosses an epoch, and 2 processes
# accumulate too), the encoder frozen for the first 2 (DDP then sees parameters without a gradient), no stochastic
# depth; the BEiT head has no dropout or BatchNorm
VISION = ['--modality', 'vision', '--init', 'scratch', '--drop-path', '0', '--labeled', '32', '--steps', '6', '--batch-size', '8',
          '--micro-batch-size', '2', '--freeze-steps', '2', '--log-every', '1', '--workers', '0', '--device', 'cpu']
# finetune.main in a torchrun worker that sends itself SIGTERM (rank 0 only: a preemption that reaches one process)
# when its loss_fn is called for the `at`-th time
SIGTERM_AT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import finetune
at, calls, real = int(sys.argv[1]), [0], finetune.loss_fn
def loss_fn(*args):
    calls[0] += 1
    if calls[0] == at and os.environ['RANK'] == '0':
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args)
finetune.loss_fn = loss_fn
finetune.main(sys.argv[2:])
"""


def arch(path, modality, *extra):
    """A train.py config.json of ARCH (random weights through --init scratch --arch): → the path."""
    mcfg, cfg = parse_train_args(['--modality', modality, *ARCH, *extra])
    path.write_text(json.dumps(dict(model=asdict(mcfg), train=asdict(cfg))))
    return str(path)


def finetune(out, args, nproc=1, script=None, check=True):
    """finetune.py ARGS --out OUT (or SCRIPT ARGS …) on `nproc` gloo processes (torchrun) → the finished run's
    (finetuned.pt, metric log lines, metrics.json, stdout), or the completed process when not `check`."""
    launch = [sys.executable] if nproc == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                                  '--nproc_per_node', str(nproc)]
    r = subprocess.run([*launch, *(script or [str(ROOT / 'finetune.py')]), *args, '--out', str(out)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    if not check:
        return r
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(x) for x in (out / 'log.jsonl').read_text().splitlines()]
    return (torch.load(out / 'finetuned.pt', weights_only=True), [x for x in log if 'event' not in x],
            json.loads((out / 'metrics.json').read_text()), r.stdout)


@pytest.fixture(scope='module')
def vision_runs(tmp_path_factory):
    """The VISION run on one process accumulating 4 micro-batches of 2, and on 2 processes accumulating 2 each."""
    tmp = tmp_path_factory.mktemp('vision')
    args = VISION + ['--arch', arch(tmp / 'config.json', 'vision', '--image-size', '16', '--patch-size', '4')]
    return args, finetune(tmp / 'one', args), finetune(tmp / 'two', args, nproc=2)


def test_two_gloo_processes_fine_tune_as_one_process_accumulating(vision_runs):
    """torchrun --nproc_per_node 2, each accumulating 2 micro-batches of 2 (DDP's no_sync on the first), against one
    process accumulating 4: the same 8 images, crops and flips per update (data.batches deals micro-batches out in
    turn), gradients averaged over ranks by DDP and over micro-batches by accumulation, through the 2 frozen updates
    and after. The losses, the final weights and
    the held-out accuracy (rank 0 evaluates) agree to float rounding; rank 0 alone prints."""
    _, (one, log_one, m_one, out_one), (two, log_two, m_two, out_two) = vision_runs
    assert 'batch 8 = 2 × 4 accumulation × 1 process\n' in out_one and 'batch 8 = 2 × 2 accumulation × 2 processes' in out_two
    assert out_two.count('vision classify | accuracy') == 1                 # rank 0's summary only
    assert [x['step'] for x in log_one] == [x['step'] for x in log_two] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(log_one, log_two):
        assert a['loss'] == pytest.approx(b['loss'], rel=1e-5) and a['lr'] == b['lr'], (a, b)
    assert log_one[0]['loss'] != pytest.approx(log_one[-1]['loss'], rel=1e-3)    # it trained
    assert one['model'].keys() == two['model'].keys()
    for name, t in one['model'].items():
        assert torch.allclose(t.float(), two['model'][name].float(), rtol=0, atol=1e-5), name
    trained = one['model']['backbone.encoder.layers.0.norm1.weight']         # LayerNorm: 1 at the start; the encoder trained
    assert not torch.allclose(trained, torch.ones_like(trained), atol=1e-4)
    assert one['config']['finetune']['micro_batch_size'] == two['config']['finetune']['micro_batch_size'] == 2
    assert m_one['test_examples'] == m_two['test_examples'] == 512 and m_one['metrics'] == m_two['metrics']


def test_two_processes_stopped_by_sigterm_resume_exactly(tmp_path, vision_runs):
    """SIGTERM to rank 0 only, during update 3 of 6 (its 5th micro-batch): both ranks save checkpoint.pt at that step
    boundary and exit; the command printed resumes it on 2 processes, which ends with the uninterrupted 2-process
    run's losses, weights and metrics, bit for bit."""
    args, _, (two, log_two, m_two, _) = vision_runs
    script = tmp_path / 'sigterm_at.py'
    script.write_text(SIGTERM_AT.format(root=str(ROOT)))
    r = finetune(tmp_path / 'cut', args, nproc=2, script=[str(script), '5'], check=False)
    assert r.returncode != 0 and 'To continue: torchrun --nproc_per_node 2 finetune.py' in r.stderr, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / 'cut' / 'checkpoint.pt', weights_only=True)
    assert ckpt['step'] == 3 and len(ckpt['rng']) == 2 and ckpt['data']['consumed'] == 6   # 6 micro-batches per rank
    cut, log_cut, m_cut, out = finetune(tmp_path / 'cut', args + ['--resume'], nproc=2)
    assert 'resuming' in out and 'at step 3 of 6' in out
    assert [(x['step'], x['loss']) for x in log_cut] == [(x['step'], x['loss']) for x in log_two]
    for name, t in two['model'].items():
        assert torch.equal(t, cut['model'][name]), name
    assert m_cut['metrics'] == m_two['metrics'] and not (tmp_path / 'cut' / 'checkpoint.pt').exists()


def test_accumulating_micro_batches_equals_one_forward_of_the_whole_batch(tmp_path):
    """One process, --batch-size 8: 2 micro-batches of 4 accumulated against one forward pass of 8. Text, 8 labelled
    sentences: every update sees all 8 either way (however they are grouped), and text batches draw nothing at
    random; only the padding differs (each micro-batch is padded to its own longest sentence)."""
    args = ['--modality', 'text', '--init', 'scratch', '--arch', arch(tmp_path / 'config.json', 'text', '--vocab-size', '400'),
            '--labeled', '8', '--steps', '4', '--batch-size', '8', '--log-every', '1', '--workers', '0', '--device', 'cpu']
    whole, log_whole, m_whole, _ = finetune(tmp_path / 'whole', args)
    accum, log_accum, m_accum, out = finetune(tmp_path / 'accum', args + ['--micro-batch-size', '4'])
    assert 'batch 8 = 4 × 2 accumulation' in out
    for a, b in zip(log_whole, log_accum):
        assert a['loss'] == pytest.approx(b['loss'], rel=1e-5), (a, b)
    assert log_whole[0]['loss'] != pytest.approx(log_whole[-1]['loss'], rel=1e-3)
    for name, t in whole['model'].items():
        assert torch.allclose(t.float(), accum['model'][name].float(), rtol=0, atol=1e-5), name
    assert m_whole['metrics'] == m_accum['metrics']


def test_batch_size_must_be_a_multiple_of_micro_batch_times_processes():
    """fill_recipe(world) refuses a global batch that micro-batches on `world` processes cannot make up, in one line;
    --micro-batch-size 0 is the batch split over the processes."""
    def filled(world, *argv):
        cfg = parse_finetune_args(['--modality', 'vision', '--init', 'scratch', '--batch-size', '8', *argv])
        return fill_recipe(cfg, 'tiny', 1, world), cfg.micro_batch_size
    assert filled(1) == (None, 8) and filled(2) == (None, 4) and filled(2, '--micro-batch-size', '2') == (None, 2)
    problem, _ = filled(2, '--micro-batch-size', '3')
    assert problem == '--batch-size 8 must be a multiple of --micro-batch-size × processes (3 × 2)'
    assert filled(4, '--micro-batch-size', '4')[0].endswith('(4 × 4)') and filled(3)[0].endswith('(2 × 3)')


def test_resumed_on_one_process_it_keeps_the_micro_batches_of_two(tmp_path, vision_runs):
    """Stopped on 2 processes with the default micro-batch (8 / 2 processes = 4), then resumed on 1 process without
    --micro-batch-size: it keeps micro-batches of 4 (the data stream counts them), accumulating 2, and ends where
    one process with --micro-batch-size 4 from the start ends."""
    args, *_ = vision_runs
    k = args.index('--micro-batch-size')
    args = args[:k] + args[k + 2:]                                             # the default: --batch-size / processes
    script = tmp_path / 'sigterm_at.py'
    script.write_text(SIGTERM_AT.format(root=str(ROOT)))
    r = finetune(tmp_path / 'cut', args, nproc=2, script=[str(script), '3'], check=False)
    assert r.returncode != 0 and torch.load(tmp_path / 'cut' / 'checkpoint.pt', weights_only=True)['step'] == 3
    cut, log_cut, _, out = finetune(tmp_path / 'cut', args + ['--resume'])
    assert 'at step 3 of 6' in out and 'batch 8 = 4 × 2 accumulation × 1 process' in out
    one, log_one, _, _ = finetune(tmp_path / 'one', args + ['--micro-batch-size', '4'])
    assert [x['step'] for x in log_cut] == [x['step'] for x in log_one]
    for a, b in zip(log_one, log_cut):
        assert a['loss'] == pytest.approx(b['loss'], rel=1e-5), (a, b)
    for name, t in one['model'].items():
        assert torch.allclose(t.float(), cut['model'][name].float(), rtol=0, atol=1e-5), name

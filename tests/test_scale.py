"""What full-scale GPU training relies on, checked on the CPU: DDP over 2 processes equals one process at the same
global batch, and the data2vec step compiles into one graph (README, "Full scale").

    OMP_NUM_THREADS=1 pytest tests/test_scale.py
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo

import data
import train
from config import parse_train_args
from conftest import ROOT
from model import build_student
from teacher import Teacher

ENV = dict(os.environ, OMP_NUM_THREADS='1')
SMALL = ['--dim', '32', '--layers', '2', '--heads', '2', '--ffn-dim', '64', '--top-k', '2', '--workers', '0', '--device', 'cpu',
         '--dropout', '0', '--attn-dropout', '0']   # no dropout: each rank draws its own, so only then can runs agree exactly
FLAGS = {'speech': SMALL + ['--conv-dim', '16', '--crop', '16000'],
         'vision': ['--modality', 'vision', '--drop-path', '0'] + SMALL,
         'text': ['--modality', 'text'] + SMALL + ['--vocab-size', '5000', '--block-size', '32'],
         # data2vec 2.0: no decoder noise or dropout either (each rank draws its own)
         'speech-v2': ['--version', '2'] + SMALL + ['--conv-dim', '16', '--crop', '16000', '--clones', '2', '--decoder-dim', '16',
                                                    '--decoder-groups', '2', '--mask-noise-std', '0', '--decoder-dropout', '0'],
         'vision-v2': ['--modality', 'vision', '--version', '2'] + SMALL + ['--clones', '2', '--decoder-dim', '16',
                                                                           '--decoder-groups', '2', '--mask-noise-std', '0'],
         'text-v2': ['--modality', 'text', '--version', '2'] + SMALL + ['--vocab-size', '5000', '--block-size', '32', '--clones', '2',
                                                                       '--decoder-dim', '16', '--mask-noise-std', '0',
                                                                       '--decoder-dropout', '0']}


# train.main under torchrun, checking after every update that every rank holds the same teacher, bit for bit
SAME_TEACHER = """
import sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
import train
real, checks = train.train_step, []
def step(model, teacher, *rest):
    out = real(model, teacher, *rest)
    mine = torch.cat([p.detach().flatten() for p in train.unwrap(teacher).parameters()])
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    assert all(torch.equal(mine, other) for other in every), 'teachers differ between ranks'
    checks.append(1)
    return out
train.train_step = step
train.main(sys.argv[1:])
sys.stdout.write('teacher checks: %d\\n' % len(checks))   # one write: the two ranks' lines cannot interleave
sys.stdout.flush()
"""


def run(out, modality, micro, nproc):
    """6 updates of 8 samples: `nproc` processes of `micro`-sample micro-batches, accumulation 8 / (micro · nproc);
    with 2 or more, through SAME_TEACHER."""
    script = ROOT / 'train.py'
    if nproc > 1:
        script = out.parent / f'same_teacher_{out.name}.py'
        script.write_text(SAME_TEACHER.format(root=str(ROOT)))
    launch = [sys.executable] if nproc == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                                  '--nproc_per_node', str(nproc)]
    args = ['--steps', '6', '--log-every', '2', '--batch-size', '8', '--micro-batch-size', str(micro), '--out', str(out)]
    r = subprocess.run([*launch, str(script), *FLAGS[modality], *args], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert nproc == 1 or r.stdout.count('teacher checks: 6') == nproc, r.stdout[-2000:]
    records = [json.loads(x) for x in (out / 'log.jsonl').read_text().splitlines()]
    return records, torch.load(out / 'checkpoint.pt', weights_only=True)


def test_ranks_are_dealt_one_stream_across_epochs_and_resume_on_another_count():
    """27 samples in micro-batches of 2: 13 per epoch, so epochs do not split evenly over 2 or 3 ranks. One process's
    stream of micro-batches (samples and draws) is, micro-batch by micro-batch, the interleaving of 2 ranks' streams
    and of 3 ranks', across epoch boundaries; and a run resumed after 16 micro-batches (past the first epoch) on
    another number of ranks goes on exactly where it stopped."""
    from data import batches

    class Numbers(torch.utils.data.Dataset):
        def __len__(self):
            return 27

        def __getitem__(self, i):
            return torch.tensor([float(i)])

    def collate(items, generator):                                     # the samples and a draw, as masks are drawn
        return torch.cat(items), torch.rand(1, generator=generator)

    def stream(world, rank, n, start=0):
        it = batches(Numbers(), collate, 2, seed=5, rank=rank, world=world, start=start)
        return [torch.cat(next(it)[0]) for _ in range(n)]

    def same(xs, ys):
        return len(xs) == len(ys) and all(torch.equal(x, y) for x, y in zip(xs, ys))

    one = stream(1, 0, 40)
    assert len({tuple(x[:2].tolist()) for x in one[:13]}) == 13 and not same(one[:13], one[13:26])   # a new epoch, reshuffled
    for world in (2, 3):
        ranks = [stream(world, r, 40 // world + 1) for r in range(world)]
        assert same([ranks[g % world][g // world] for g in range(39)], one[:39]), world
    assert same(stream(1, 0, 6, start=16), one[16:22])                 # 2 ranks stopped after 8 each, 1 goes on
    two = [stream(2, r, 3, start=8) for r in (0, 1)]                   # 1 stopped after 16, 2 go on
    assert same([two[g % 2][g // 2] for g in range(6)], one[16:22])


@pytest.mark.parametrize('modality', ['speech', 'vision', 'text', 'speech-v2', 'vision-v2', 'text-v2'])
def test_two_gloo_processes_match_one_process_at_the_same_global_batch(tmp_path, modality):
    """torchrun --nproc_per_node 2 (gloo) with micro-batches of 4, against one process accumulating 2 micro-batches
    of 4: the same 8 samples, crops and masks per update (data.batches deals micro-batches out in turn), gradients
    averaged over ranks by DDP and over micro-batches by accumulation. Every logged loss and target/prediction std,
    the final student, the teacher (EMA) and Adam's moments agree to float rounding (the two sum in another order),
    and after every update both ranks hold bit-identical teachers (SAME_TEACHER)."""
    one, ckpt_one = run(tmp_path / 'one', modality, 4, 1)
    two, ckpt_two = run(tmp_path / 'two', modality, 4, 2)
    assert [r['step'] for r in one] == [r['step'] for r in two] == [2, 4, 6]
    for a, b in zip(one, two):
        for key in ('loss', 'target_var', 'pred_var', 'lr', 'ema_decay'):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
    assert one[0]['loss'] != pytest.approx(one[-1]['loss'], rel=1e-3)          # it trained: the comparison is not vacuous
    for part in ('student', 'teacher'):
        for name, t in ckpt_one[part].items():
            assert torch.allclose(t.float(), ckpt_two[part][name].float(), rtol=1e-4, atol=1e-5), (part, name)
    moments = [(s['exp_avg'], ckpt_two['optimizer']['state'][k]['exp_avg']) for k, s in ckpt_one['optimizer']['state'].items()]
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-7) for a, b in moments)
    assert len(ckpt_two['rng']) == 2 and len(ckpt_one['rng']) == 1            # the second run really had 2 ranks


@pytest.mark.parametrize('modality', ['speech', 'vision', 'text', 'speech-v2', 'vision-v2', 'text-v2'])
def test_the_data2vec_step_is_one_graph(modality):
    """torch._dynamo.explain over train.forward_loss (student forward, teacher forward, targets, loss; what --compile
    compiles) on a real collated micro-batch: one graph, no graph breaks, so torch.compile sees the whole step."""
    mcfg, cfg = parse_train_args(FLAGS[modality] + ['--batch-size', '4', '--micro-batch-size', '4'])
    dataset, collate = data.modality(mcfg.modality).pretraining_data(mcfg, cfg)
    torch.manual_seed(0)
    model = build_student(mcfg)
    teacher = Teacher(model)
    batch = collate([dataset[i] for i in range(4)], generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(train.forward_loss)(model, teacher, batch, cfg)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1

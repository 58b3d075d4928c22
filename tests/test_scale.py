"""What full-scale GPU training relies on, checked on the CPU: DDP over 2 processes equals one process at the same
global batch, and the data2vec step compiles into one graph (README, "Full scale on GPUs").

    OMP_NUM_THREADS=1 pytest tests/test_scale.py
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo

import train
from conftest import ROOT
from model import Data2Vec
from teacher import make_teacher

ENV = dict(os.environ, OMP_NUM_THREADS='1')
SMALL = ['--dim', '32', '--layers', '2', '--heads', '2', '--ffn-dim', '64', '--top-k', '2', '--workers', '0', '--device', 'cpu',
         '--dropout', '0', '--attn-dropout', '0']   # no dropout: each rank draws its own, so only then can runs agree exactly
FLAGS = {'speech': SMALL + ['--conv-dim', '16', '--crop', '16000'],
         'vision': ['--modality', 'vision', '--drop-path', '0'] + SMALL,
         'text': ['--modality', 'text'] + SMALL + ['--vocab-size', '5000', '--block-size', '32']}


def run(out, modality, micro, nproc):
    """6 updates of 8 samples: `nproc` processes of `micro`-sample micro-batches, accumulation 8 / (micro · nproc)."""
    launch = [sys.executable] if nproc == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                                  '--nproc_per_node', str(nproc)]
    args = ['--steps', '6', '--log-every', '2', '--batch-size', '8', '--micro-batch-size', str(micro), '--out', str(out)]
    r = subprocess.run([*launch, str(ROOT / 'train.py'), *FLAGS[modality], *args], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(x) for x in (out / 'log.jsonl').read_text().splitlines()]
    return records, torch.load(out / 'checkpoint.pt', weights_only=True)


@pytest.mark.parametrize('modality', ['speech', 'vision', 'text'])
def test_two_gloo_processes_match_one_process_at_the_same_global_batch(tmp_path, modality):
    """torchrun --nproc_per_node 2 (gloo) with micro-batches of 4, against one process accumulating 2 micro-batches
    of 4: the same 8 samples, crops and masks per update (data.batches deals micro-batches out in turn), gradients
    averaged over ranks by DDP and over micro-batches by accumulation. Every logged loss and target/prediction std,
    the final student, the teacher (EMA) and Adam's moments agree to float rounding (the two sum in another order)."""
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


@pytest.mark.parametrize('modality', ['speech', 'vision', 'text'])
def test_the_data2vec_step_is_one_graph(modality):
    """torch._dynamo.explain over train.forward_loss (student forward, teacher forward, targets, loss; what --compile
    compiles) on a real collated micro-batch: one graph, no graph breaks, so torch.compile sees the whole step."""
    mcfg, cfg = train.parse_args(FLAGS[modality] + ['--batch-size', '4', '--micro-batch-size', '4'])
    dataset = train.make_dataset(mcfg, cfg)
    torch.manual_seed(0)
    model = Data2Vec(mcfg)
    teacher = make_teacher(model.encoder)
    batch = train.collate([dataset[i] for i in range(4)], mcfg, cfg, getattr(dataset, 'mask_id', None),
                          getattr(dataset, 'ordinary', None), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(train.forward_loss)(model, teacher, batch, cfg)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1

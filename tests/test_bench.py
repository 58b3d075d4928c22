"""bench.py: one JSON line, train.py's own step, FLOPs against a formula, clear errors.   pytest tests/test_bench.py"""
import json

import pytest
import torch

import bench
import train

TINY = ['--preset', 'tiny', '--batch-size', '4', '--steps', '2', '--warmup', '1', '--workers', '0']
KEYS = {'bench', 'modality', 'preset', 'version', 'compile', 'batch', 'seconds', 'tokens_per_sample', 'step_ms', 'samples_per_s',
        'student_blocks_fwd_tflop', 'teacher_blocks_fwd_tflop', 'decoder_fwd_tflop',
        'tokens_per_s', 'step_tflop', 'mfu', 'peak_mem_gb', 'data_frac', 'host_syncs', 'loss', 'skipped_updates', 'device', 'torch'}


def run(capsys, *flags):
    """bench.main on the tiny preset; checks that stdout is exactly one JSON line, the returned dict."""
    result = bench.main([*TINY, *flags])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == result
    return result


@pytest.mark.parametrize('modality, flags, tokens', [('speech', ['--seconds', '1'], 49),    # 16000 samples → 49 frames
                                                      ('speech', ['--seconds', '1', '--version', '2'], 49),
                                                      ('vision', [], 64),                    # 32² images in 4² patches
                                                      ('vision', ['--version', '2'], 64),
                                                      ('text', [], 64),                      # blocks of 64 tokens
                                                      ('text', ['--version', '2'], 64)])
def test_one_json_line_with_consistent_numbers(capsys, modality, flags, tokens):
    r = run(capsys, '--modality', modality, '--peak', '1e9', *flags)
    assert KEYS <= set(r)
    assert r['bench'] == 'data2vec-reference' and r['modality'] == modality and r['preset'] == 'tiny'
    assert r['version'] == (2 if '--version' in flags else 1)
    assert r['student_blocks_fwd_tflop'] > 0 and r['teacher_blocks_fwd_tflop'] > 0
    assert (r['decoder_fwd_tflop'] > 0) == (r['version'] == 2)                  # data2vec 2.0's decoder, v1's head
    if r['version'] == 1:
        assert r['student_blocks_fwd_tflop'] == r['teacher_blocks_fwd_tflop']  # the same blocks on the same T steps
    assert r['batch'] == 4 and r['compile'] is False and r['tokens_per_sample'] == tokens
    assert r['seconds'] == (1.0 if modality == 'speech' else None)
    assert r['step_ms'] > 0 and r['step_tflop'] > 0 and r['loss'] > 0 and r['skipped_updates'] == 0
    assert r['samples_per_s'] == pytest.approx(4 * 1000 / r['step_ms'], rel=1e-2)
    assert r['tokens_per_s'] == pytest.approx(r['samples_per_s'] * tokens, rel=1e-3)      # 4 significant digits each
    assert 0 <= r['data_frac'] < 1
    assert r['mfu'] == pytest.approx(r['step_tflop'] * 1e12 / (r['step_ms'] / 1000) / 1e9, rel=1e-2)
    assert r['peak_mem_gb'] is None and r['host_syncs'] is None and r['device'] == 'cpu'   # both CUDA-only


def test_the_step_timed_is_train_step(capsys, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[7] if len(args) > 7 else kwargs.get('loss_fn', train.forward_loss))   # train_step's loss_fn
        return step(*args, **kwargs)

    step = train.train_step
    monkeypatch.setattr(train, 'train_step', counting)
    run(capsys, '--modality', 'text')
    assert len(calls) == 1 + 2 + 1                                     # warmup + steps + the FLOP step
    assert all(fn is train.forward_loss for fn in calls)               # eager: no --compile


def test_profile_prints_the_ops_of_three_more_steps(capsys, monkeypatch):
    calls = []
    step = train.train_step
    monkeypatch.setattr(train, 'train_step', lambda *a, **k: calls.append(1) or step(*a, **k))
    bench.main([*TINY, '--modality', 'text', '--profile'])
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 1                              # stdout stays one JSON line
    assert 'aten::linear' in out.err and 'CPU total' in out.err       # the profiler's table, on stderr
    assert len(calls) == 1 + 2 + 3 + 1                                 # warmup + steps + 3 profiled + the FLOP step


@pytest.mark.parametrize('groups', [1, 16])
def test_convolution_backward_counts_grouped_convolutions_as_grouped(groups):
    """The positional conv (16 groups): forward 2 · N · T · C_out · C_in/groups · k; backward the same again for the
    input gradient and for the weight gradient, counted by hand here."""
    from torch.utils.flop_counter import FlopCounterMode
    conv = torch.nn.Conv1d(128, 128, 19, padding=9, groups=groups)
    x = torch.randn(8, 128, 49, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=bench.CORRECTED) as counter:
        conv(x).sum().backward()
    forward = 2 * 8 * 49 * 128 * (128 // groups) * 19
    assert counter.get_total_flops() == 3 * forward


@pytest.mark.parametrize('attn_dropout, attn_backward', [(0.0, 2.5), (0.1, 2.0)])
def test_flops_match_the_matmul_count(capsys, monkeypatch, attn_dropout, attn_backward):
    """Text (embeddings are lookups, no conv): every FLOP is a Linear or attention, counted by hand here.

    FlopCounterMode charges 2·m·n·k per matmul. Per token and block: q, k, v, out (4·D²) and fc1, fc2 (2·D·F), so
    2·(4D² + 2DF); the text regression head D → 2D → D is 2·4D². Attention per block: QKᵀ and AV, 2·2·B·H·T²·(D/H).
    The teacher runs all L blocks forward (top-K only picks taps). The student runs them and the head forward and
    backward: 2× for every Linear, the input and weight gradients, the first block's input gradient included (the
    embedding is trained). Attention backward: the fused kernels recompute the scores, 5 matmuls, 2.5× (torch's
    formula for CUDA's flash/efficient/cudnn kernels; bench.CORRECTED charges the CPU fused kernel the same,
    torch charges it nothing). With attention dropout the CPU falls back to SDPA's math path: 4 bmm, 2×. The teacher
    (eval) never drops. LayerNorm, GELU, softmax, the loss, Adam and the EMA are not counted: the match is exact.
    """
    counts = []

    class Recording(bench.FlopCounterMode):
        def get_total_flops(self):
            counts.append(super().get_total_flops())
            return counts[-1]

    monkeypatch.setattr(bench, 'FlopCounterMode', Recording)
    B, T, D, F, L, H = 4, 32, 64, 128, 2, 2
    r = run(capsys, '--modality', 'text', '--dim', str(D), '--ffn-dim', str(F), '--layers', str(L), '--heads', str(H),
            '--top-k', '2', '--block-size', str(T), '--dropout', '0', '--attn-dropout', str(attn_dropout))
    linears = B * T * L * 2 * (4 * D * D + 2 * D * F)                 # one forward of the L blocks
    head = B * T * 2 * (D * 2 * D + 2 * D * D)
    attention = L * 2 * 2 * B * H * T * T * (D // H)
    teacher = linears + attention
    student = 3 * (linears + head) + (1 + attn_backward) * attention
    assert counts == [teacher + student]
    assert r['step_tflop'] == pytest.approx((teacher + student) / 1e12, rel=1e-3)


@pytest.mark.parametrize('flags, words', [(['--version', '3'], '--version 3: choose 1 or 2'),
                                          (['--steps', '0'], '--steps 0 must be ≥ 1'),
                                          (['--warmup', '-1'], '--warmup -1 must be ≥ 0'),
                                          (['--seconds', '0'], '--seconds 0.0 must be'),
                                          (['--peak', '0'], '--peak 0.0 must be > 0'),
                                          (['--top-k', '99'], '--top-k 99 must be between 1 and --layers'),   # config.parse_train_args
                                          (['--no-such-flag'], 'unrecognized arguments: --no-such-flag')])
def test_bad_flags_fail_in_one_line(capsys, flags, words):
    with pytest.raises(SystemExit) as e:
        bench.main(['--preset', 'tiny', *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err.strip().splitlines()[-1] and 'Traceback' not in err

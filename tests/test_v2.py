"""data2vec 2.0 (issue 17): ALiBi, visible-step order, the conv decoder, the speech student, teacher and step.

    pytest tests/test_v2.py
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import train
from config import parse_train_args
from conftest import pretrain_then_finetune
from data.speech import collate_v2
from encoders import ALiBi, alibi_slopes, conv_output_length
from masking import block_mask_1d, visible_order
from model import ConvDecoder, Data2Vec2, build_student
from teacher import Teacher, ema_update_


def test_alibi_slopes_are_the_papers_geometric_sequences():
    assert alibi_slopes(8) == pytest.approx([2 ** -i for i in range(1, 9)])          # ALiBi paper: 1/2, 1/4, …, 1/256
    assert alibi_slopes(16) == pytest.approx([2 ** (-i / 2) for i in range(1, 17)])
    # 12 heads: the 8 of H = 8, then H = 16's 1st, 3rd, 5th, 7th: 2^−0.5, 2^−1.5, 2^−2.5, 2^−3.5
    assert alibi_slopes(12) == pytest.approx([2 ** -i for i in range(1, 9)] + [2 ** -(i + 0.5) for i in range(4)])


def test_alibi_bias_is_minus_scaled_slope_times_distance():
    alibi = ALiBi(4)
    with torch.no_grad():
        alibi.scale.copy_(torch.tensor([1.0, 0.5, -2.0, 3.0]))                     # a negative scale counts as 0
    bias = alibi(torch.arange(5))
    assert bias.shape == (4, 5, 5)
    for h, (slope, s) in enumerate(zip([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8], [1.0, 0.5, 0.0, 3.0])):
        for i in range(5):
            for j in range(5):
                assert bias[h, i, j].item() == pytest.approx(-s * slope * abs(i - j))


def test_visible_order_keeps_then_restores():
    mask = block_mask_1d(16, 40, generator=torch.Generator().manual_seed(0))
    ids_keep, ids_restore = visible_order(mask)
    assert ids_keep.shape == (16, 20) and ids_restore.shape == (16, 40)
    for row, keep in zip(mask, ids_keep):
        assert keep.tolist() == [t for t in range(40) if not row[t]]                  # the visible steps, in time order
    x = torch.randn(16, 40, 3)
    shuffled = torch.stack([torch.cat([x[r, ~mask[r]], x[r, mask[r]]]) for r in range(16)])   # [visible, masked]
    assert torch.equal(shuffled.gather(1, ids_restore[..., None].expand(-1, -1, 3)), x)


def test_decoder_restores_order_fills_noise_and_has_fairseqs_residuals():
    torch.manual_seed(0)
    D, C, T = 32, 16, 30
    dec = ConvDecoder(D, decoder_dim=C, layers=3, kernel=7, groups=4, input_dropout=0.0, noise_std=0.01).eval()
    mask = block_mask_1d(64, T, generator=torch.Generator().manual_seed(1))
    ids_keep, ids_restore = visible_order(mask)
    kept = torch.randn(64, ids_keep.shape[1], D)
    seen = []
    dec.convs[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    out = dec(kept, ids_restore)
    assert out.shape == (64, T, D)                                                   # a prediction at every step
    x0 = seen[0].transpose(1, 2)                                                     # (R, T, D): the decoder's input
    for r in range(64):
        assert torch.equal(x0[r, ids_keep[r]], kept[r])                              # visible steps at their time steps
    noise = x0[mask]
    assert abs(noise.std().item() - 0.01) < 0.001 and abs(noise.mean().item()) < 0.001

    def layer(conv, h):                                                              # Conv1d → LN (no affine) → GELU
        return F.gelu(F.layer_norm(conv(h).transpose(1, 2), (C,))).transpose(1, 2)
    h = layer(dec.convs[0], seen[0])                                                 # D → C: no residual (shapes differ)
    h = layer(dec.convs[1], h) + h                                                   # C → C: residual
    h = layer(dec.convs[2], h) + h
    torch.testing.assert_close(out, dec.proj(h.transpose(1, 2)))


def test_base_speech_decoder_size():
    """4 layers, C 384, kernel 7, 16 groups, D 768: a grouped conv has C_out · C_in/groups · k weights + C_out biases."""
    D, C, k, g = 768, 384, 7, 16
    expected = (C * D // g * k + C) + 3 * (C * C // g * k + C) + (C * D + D)
    assert sum(p.numel() for p in ConvDecoder(D).parameters()) == expected == 619_776


# ---- the data2vec 2.0 speech student, teacher and step (tiny sizes)

V2 = ['--version', '2', '--dim', '32', '--layers', '3', '--heads', '4', '--ffn-dim', '64', '--top-k', '2', '--conv-dim', '16',
      '--clones', '3', '--decoder-dim', '16', '--decoder-groups', '4', '--batch-size', '4', '--micro-batch-size', '4',
      '--crop', '16000', '--dropout', '0', '--attn-dropout', '0', '--layerdrop', '0']


def v2_setup(seed=0):
    mcfg, cfg = parse_train_args(V2)
    torch.manual_seed(seed)
    model = build_student(mcfg)
    g = torch.Generator().manual_seed(seed)
    waves = [torch.randn(16000 + 800 * i, generator=g) * 0.1 for i in range(4)]
    batch = collate_v2([(w, '') for w in waves], cfg, torch.Generator().manual_seed(seed))
    return mcfg, cfg, model, Teacher(model), batch


def test_v2_batch_has_m_masks_per_clip_and_no_padding():
    mcfg, cfg, model, teacher, batch = v2_setup()
    T = conv_output_length(16000)                                                   # every clip cropped to the shortest
    assert isinstance(model, Data2Vec2) and batch['source'].shape == (4, 16000) and 'padding_mask' not in batch
    assert batch['mask'].shape == (12, T) and (batch['mask'].sum(1) == int(T * 0.5)).all()
    assert batch['ids_keep'].shape == (12, T - int(T * 0.5))


def test_the_student_never_sees_a_masked_step():
    """Features changed at masked steps change no block output: only the decoder reads those slots."""
    mcfg, cfg, model, teacher, batch = v2_setup()
    fe, mask, keep = model.front_end, batch['mask'], batch['ids_keep']
    features = torch.randn(12, mask.shape[1], 32)
    other = torch.where(mask[..., None], torch.randn_like(features) * 100, features)
    outs = []
    for f in (features, other):
        x, bias = fe.visible(f, mask, keep)
        outs.append(torch.stack(model.encoder(x, bias, tap='block')[1]))         # (L, R, T_keep, D)
    assert torch.equal(outs[0], outs[1])
    assert outs[0].shape[2] == mask.shape[1] - int(mask[0].sum())                   # T_keep steps per row


def test_counts_blocks_see_the_visible_steps_and_the_teacher_runs_once():
    mcfg, cfg, model, teacher, batch = v2_setup()
    T = batch['mask'].shape[1]
    seen, teacher_rows = [], []
    model.encoder.layers[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    teacher.encoder.register_forward_hook(lambda m, inp, out: teacher_rows.append(inp[0].shape))
    train.forward_loss(model, teacher, batch, cfg)
    assert seen == [(4 * 3, T - int(T * 0.5), 32)]                                 # (1 − p)·T steps × M copies per clip
    assert teacher_rows == [(4, T, 32)]                                              # one pass, once per clip, all T steps


def test_v2_loss_equals_a_recomputation_with_repeated_targets(monkeypatch):
    """forward_loss against targets built here: the student's features of the unmasked clip (fairseq: the teacher has
    no feature encoder of its own), the teacher's own positional conv (written out here), its ALiBi, its blocks' FFN
    outputs, instance norm over time, the top-K average, repeated M times; L2 × 1/√D at the masked steps."""
    mcfg, cfg, model, teacher, batch = v2_setup()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.01)                                        # a teacher that is not the student
    captured, real_loss = {}, train.regression_loss
    monkeypatch.setattr(train, 'regression_loss', lambda pred, y, *a: captured.update(pred=pred, y=y) or real_loss(pred, y, *a))
    loss, _ = train.forward_loss(model, teacher, batch, cfg)
    with torch.no_grad():
        features, _ = model.front_end.feature_encoder(batch['source'])              # the student's, once per clip
        h = features.transpose(1, 2)                                                  # (B, D, T)
        for conv in teacher.front_end.pos_encoder.convs:                              # k 19, 16 groups, LN, GELU
            h = F.conv1d(h, conv.weight, conv.bias, padding=9, groups=16)
            h = F.gelu(F.layer_norm(h.transpose(1, 2), (32,))).transpose(1, 2)
        x = features + h.transpose(1, 2)
        T, s = x.shape[1], teacher.front_end.alibi.scale.clamp_min(0)
        dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs().float()
        bias = -(s * torch.tensor(alibi_slopes(4)))[:, None, None] * dist            # (H, T, T)
        taps = teacher.encoder(x, bias, tap='ffn')[1][-2:]                            # top K = 2
        normed = [(a - a.mean(1, keepdim=True)) / torch.sqrt(a.var(1, unbiased=False, keepdim=True) + 1e-5) for a in taps]
        y = (sum(normed) / 2).repeat_interleave(3, 0)                                  # (12, T, D)
    torch.testing.assert_close(captured['y'], y, rtol=1e-4, atol=1e-5)
    m = batch['mask']
    expected = ((captured['pred'] - y).square().sum(-1) / math.sqrt(32))[m].mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_ema_covers_all_but_the_feature_encoder_and_the_decoder():
    mcfg, cfg, model, teacher, batch = v2_setup()
    keys = set(teacher.state_dict())
    assert not any(k.startswith(('front_end.feature_encoder', 'decoder')) for k in keys)
    assert {k for k in model.state_dict() if not k.startswith(('front_end.feature_encoder', 'decoder'))} == keys
    before = copy.deepcopy(teacher.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema_update_(teacher, Teacher.averaged_part(model), 0.9)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * model.state_dict()[k])   # Δ ← τΔ + (1 − τ)θ


def test_the_teacher_reads_the_students_feature_encoder(monkeypatch):
    """A changed student projection changes the targets; the teacher's own weights did not move."""
    mcfg, cfg, model, teacher, batch = v2_setup()
    targets, real_loss = [], train.regression_loss
    monkeypatch.setattr(train, 'regression_loss', lambda pred, y, *a: targets.append(y) or real_loss(pred, y, *a))
    train.forward_loss(model, teacher, batch, cfg)
    with torch.no_grad():
        model.front_end.feature_encoder.projection.weight.mul_(2)
    train.forward_loss(model, teacher, batch, cfg)
    assert not torch.allclose(targets[0], targets[1])


def test_the_visible_bias_is_the_full_bias_at_the_kept_steps():
    """fairseq masked_alibi: the full-length ALiBi bias, rows and columns gathered at the kept steps."""
    mcfg, cfg, model, teacher, batch = v2_setup()
    with torch.no_grad():
        model.front_end.alibi.scale.copy_(torch.tensor([0.5, 1.0, 2.0, 0.1]))
    keep = batch['ids_keep']
    _, bias = model.front_end.visible(torch.randn(12, batch['mask'].shape[1], 32), batch['mask'], keep)
    full = model.front_end.alibi(torch.arange(batch['mask'].shape[1]))              # (H, T, T)
    for r in range(12):
        torch.testing.assert_close(bias[r], full[:, keep[r]][:, :, keep[r]])


def test_a_v2_encoder_reads_masked_frames_as_zeros():
    """Fine-tuning masks (wav2vec 2.0's time masks) on a v2 encoder: masked frames are zero features (fairseq
    encoder_zero_mask), as if the feature encoder had output zeros there."""
    mcfg, cfg, model, teacher, batch = v2_setup()
    model.eval()
    source, mask = batch['source'], batch['mask'][::3]                              # one mask per clip
    out, _ = model.encode(source, None, mask)
    features, _ = model.front_end.feature_encoder(source)
    fe = model.front_end
    x = fe.pos_encoder(features.masked_fill(mask[..., None], 0.0))
    expected, _ = model.encoder(x, fe.alibi(torch.arange(x.shape[1])))
    torch.testing.assert_close(out, expected)


def test_finetune_a_v2_checkpoint_with_time_masks_from_the_command_line(tmp_path):
    """train.py --version 2 for 2 updates, then finetune.py on its checkpoint with wav2vec 2.0's time masks (the v2
    encoder zeroes masked frames; it has no mask embedding): the decoder is dropped, the encoder's weights load."""
    _, weights = pretrain_then_finetune(tmp_path, V2, ['--modality', 'speech', '--batch-size', '4', '--mask-prob', '0.3',
                                                       '--labeled', '16'])
    assert not any(k.startswith('decoder.') for k in weights) and any('alibi' in k for k in weights)

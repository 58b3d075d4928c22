"""EMA teacher and targets, checked against computations written here.   pytest tests/test_teacher.py"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Data2Vec, ModelConfig, Transformer
from teacher import Teacher, ema_decay_at, ema_update_, make_targets, make_teacher, normalize, teacher_targets


def test_ema_decay_schedule_speech():
    t0, te, tn = 0.999, 0.9999, 30_000                               # paper: τ0, τe, τn for speech
    assert ema_decay_at(0, t0, te, tn) == pytest.approx(t0)
    assert ema_decay_at(tn // 2, t0, te, tn) == pytest.approx((t0 + te) / 2)
    assert ema_decay_at(tn, t0, te, tn) == pytest.approx(te)
    assert ema_decay_at(2 * tn, t0, te, tn) == pytest.approx(te)
    assert ema_decay_at(0, 0.9998, 0.9998, 0) == 0.9998               # constant τ (vision) works too


def test_ema_update_formula_on_a_toy_module():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student[1].running_mean.fill_(0.5)
    before = [p.clone() for p in teacher.parameters()]
    tau = 0.9
    ema_update_(teacher, student, tau)
    for d, d0, theta in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(d, tau * d0 + (1 - tau) * theta)  # Δ ← τΔ + (1 − τ)θ
    assert torch.equal(teacher[1].running_mean, student[1].running_mean)
    ema_update_(teacher, student, 0.0)                                # τ = 0 copies the student
    for d, theta in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(d, theta)


def test_make_teacher_is_a_frozen_eval_copy():
    student = Transformer(ModelConfig(dim=16, layers=2, heads=2, ffn_dim=32))
    teacher = make_teacher(student)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(teacher.parameters(), student.parameters()))


def _ffn_outputs_by_hand(encoder, x):
    """Each block's FFN output before the residual, recomputed from the block's sub-modules (eval mode, no dropout)."""
    h = encoder.layer_norm(x)
    outs = []
    for blk in encoder.layers:
        r = blk.self_attn_layer_norm(h + blk.self_attn(h))
        f = blk.fc2(F.gelu(blk.fc1(r)))
        outs.append(f)
        h = blk.final_layer_norm(r + f)
    return outs


def test_targets_are_instance_normed_mean_of_top_k_ffn_outputs():
    torch.manual_seed(0)
    student = Data2Vec(ModelConfig(dim=32, layers=5, heads=4, ffn_dim=64, conv_dim=8))
    teacher, shared = Teacher(student), student.front_end             # speech: the teacher reads the shared front-end's tokens
    x = torch.randn(3, 40, 32)
    K = 3
    ffn = _ffn_outputs_by_hand(teacher.encoder, x)[-K:]
    expected = sum(F.instance_norm(f.transpose(1, 2)).transpose(1, 2) for f in ffn) / K   # IN over time per channel
    y = teacher_targets(teacher, x, None, tap='ffn', top_k=K, norm='instance', front_end=shared)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert y.dtype == torch.float32
    layer = teacher_targets(teacher, x, None, tap='ffn', top_k=K, norm='layer', front_end=shared)
    torch.testing.assert_close(layer, sum(F.layer_norm(f, (32,)) for f in ffn) / K, atol=1e-5, rtol=1e-5)


def test_instance_norm_ignores_padded_steps():
    torch.manual_seed(0)
    a = torch.randn(2, 30, 8)
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[1, 20:] = True
    out = normalize(a, 'instance', pad)
    torch.testing.assert_close(out[1, :20], F.instance_norm(a[1:2, :20].transpose(1, 2)).transpose(1, 2)[0])
    torch.testing.assert_close(out[0], F.instance_norm(a[0:1].transpose(1, 2)).transpose(1, 2)[0])
    bf16 = make_targets([a.bfloat16()], 'instance')
    assert bf16.dtype == torch.float32                                  # targets are computed in fp32 under autocast


def test_teacher_gets_no_gradient_and_changes_only_through_ema():
    from contextlib import nullcontext

    from config import parse_train_args
    from data.speech import SyntheticSpeech, collate
    from train import train_step
    mcfg, cfg = parse_train_args(['--dim', '32', '--layers', '2', '--heads', '2', '--ffn-dim', '64', '--conv-dim', '16',
                                  '--top-k', '2', '--micro-batch-size', '2', '--batch-size', '2', '--crop', '16000'])
    torch.manual_seed(0)
    model = Data2Vec(mcfg)
    teacher = Teacher(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds = SyntheticSpeech(8)
    batch = collate([ds[0], ds[1]], cfg)
    t_before = copy.deepcopy(teacher.state_dict())
    train_step(model, teacher, opt, [batch], 0, cfg, nullcontext())
    assert all(p.grad is None for p in teacher.parameters())
    tau = ema_decay_at(1, cfg.ema_start, cfg.ema_end, cfg.ema_anneal_steps)
    assert set(teacher.state_dict()) == {k for k in model.state_dict() if k.startswith('encoder.')}   # speech: the blocks only
    for name, d in teacher.state_dict().items():
        torch.testing.assert_close(d, tau * t_before[name] + (1 - tau) * model.state_dict()[name])
    assert any(not torch.equal(t_before[n], d) for n, d in teacher.state_dict().items())


def test_vision_targets_are_layer_normed_top_k_block_outputs_averaged_then_layer_normed():
    """data2vec vision v1: y = LN((1/K) Σ_{top K} LN(end-of-block output)), all LNs parameter-free, CLS dropped."""
    cfg = ModelConfig(modality='vision', dim=32, layers=4, heads=4, ffn_dim=64, image_size=16, patch_size=4, dropout=0.0,
                      attn_dropout=0.0, layerdrop=0.0, layer_scale=0.5)
    torch.manual_seed(0)
    teacher = Teacher(Data2Vec(cfg))
    image = torch.rand(2, 3, 16, 16)
    y = teacher_targets(teacher, dict(source=image), None, tap='block', top_k=3, norm='layer', post='layer')

    def ln(a):                                                         # written out: per token, over channels, ε = 1e-5
        return (a - a.mean(-1, keepdim=True)) / torch.sqrt(a.var(-1, unbiased=False, keepdim=True) + 1e-5)
    front = teacher.front_end                                          # the teacher's own (EMA) copy
    x = torch.cat([front.cls_token.expand(2, -1, -1), front.patch_embed(image)], 1)   # (2, 1 + 16, 32)
    outs = []
    for block in teacher.encoder.layers:                               # run the blocks by hand
        x = block(x, front.rel_pos_bias())[0]
        outs.append(x[:, 1:])
    expected = ln(sum(ln(o) for o in outs[-3:]) / 3)
    assert y.shape == (2, 16, 32) and y.dtype == torch.float32
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)


def test_vision_ema_covers_the_patch_embedding_and_relative_position_bias():
    cfg = ModelConfig(modality='vision', dim=16, layers=2, heads=2, ffn_dim=32, image_size=16, patch_size=4)
    student = Data2Vec(cfg)
    teacher = Teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update_(teacher, Teacher.averaged_part(student), 0.9998)
    for name in ('front_end.patch_embed.proj.weight', 'front_end.rel_pos_bias.table', 'front_end.cls_token',
                 'encoder.layers.1.gamma_2', 'encoder.norm.weight'):
        old = student.get_parameter(name) - 1.0                        # the teacher was a copy of these
        torch.testing.assert_close(teacher.get_parameter(name) - old, torch.full_like(old, 1 - 0.9998))   # moved (1 − τ) of the way


def test_text_teacher_reads_the_original_tokens_through_the_shared_embedding():
    """data2vec text: targets = mean of the top-K layer-normed FFN outputs of the teacher's blocks for the ORIGINAL
    tokens; the teacher averages the blocks only, the embeddings (tokens, positions, LayerNorm) are the student's."""
    from contextlib import nullcontext

    from config import TrainConfig
    from masking import token_mask
    from train import train_step
    cfg = ModelConfig(modality='text', vocab_size=300, max_tokens=16, dim=32, layers=3, heads=4, ffn_dim=64, layerdrop=0.0)
    torch.manual_seed(0)
    model = Data2Vec(cfg)
    teacher = Teacher(model)
    assert all(n.startswith('encoder.layers.') for n in teacher.state_dict())   # blocks only: nothing to drift
    original = torch.randint(5, 300, (4, 16))
    original[:, 0], original[:, -1] = 0, 2
    source, mask = token_mask(original, 4, (5, 300), 0.15, 1, 0.1, 0.1, generator=torch.Generator().manual_seed(0))
    _, teacher_input, _, _ = model(source, None, mask, original=original)
    model.eval()
    embed = model.front_end.embed
    torch.testing.assert_close(teacher_input, embed(original))        # the uncorrupted sentence (paper), not the masked one
    y = teacher_targets(teacher, teacher_input, None, tap='ffn', top_k=2, norm='layer', front_end=model.front_end)
    ffn = _ffn_outputs_by_hand(teacher.encoder, embed(original))[-2:]
    torch.testing.assert_close(y, sum(F.layer_norm(f, (32,)) for f in ffn) / 2)
    model.train()
    tcfg = TrainConfig(top_k=2, target_norm='layer', loss_beta=4.0, loss_scale=1.0, steps=10, warmup=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before, old = embed.tokens.weight.clone(), teacher.encoder.layers[0].fc1.weight.clone()
    train_step(model, teacher, opt, [dict(source=source, mask=mask, original=original)], 0, tcfg, nullcontext())
    assert not torch.equal(embed.tokens.weight, before)               # the student's embedding learns
    tau = ema_decay_at(1, tcfg.ema_start, tcfg.ema_end, tcfg.ema_anneal_steps)
    torch.testing.assert_close(teacher.encoder.layers[0].fc1.weight, tau * old + (1 - tau) * model.encoder.layers[0].fc1.weight)
    model.eval()                                                       # the teacher's input after the step, written out:
    e = embed                                                          # LN(E[token] + P[2, 3, …]) with the updated tables
    by_hand = F.layer_norm(e.tokens.weight[original] + e.positions.weight[torch.arange(2, 18)], (32,), e.layer_norm.weight,
                           e.layer_norm.bias)
    torch.testing.assert_close(model(source, None, mask, original=original)[1], by_hand)


@pytest.mark.parametrize('modality', ['speech', 'vision', 'text'])
def test_teacher_context_limits_each_target_to_l_times_w_steps(modality):
    """Figure 3's teacher context W: block l's output at step t depends on no input farther than l·W steps from t
    (vision: patches, max(|Δrow|, |Δcolumn|) on the grid), checked by changing one input step and seeing which outputs
    move; W = 0 is the whole input, where a far step moves too. Speech and text: the teacher reads the shared
    front-end's tokens; vision: the raw image, through its own patch embedding."""
    L, W = 3, 1
    cfg = ModelConfig(modality=modality, dim=32, layers=L, heads=4, ffn_dim=64, conv_dim=8, image_size=32, patch_size=4,
                      vocab_size=300, max_tokens=40, layer_scale=0.5, dropout=0.0, attn_dropout=0.0)
    torch.manual_seed(0)
    student = Data2Vec(cfg)
    teacher, shared = Teacher(student), student.front_end      # shared: what a speech or text teacher reads through
    for p in teacher.parameters():                              # a random relative position bias too (zero at init)
        if p.ndim == 2 and p.shape[1] == 4:
            torch.nn.init.normal_(p)
    if modality == 'vision':                                   # an 8 × 8 grid; change the pixels of patch (4, 4) only
        x = torch.rand(1, 3, 32, 32)
        changed = x.clone()
        changed[:, :, 16:20, 16:20] = torch.rand(1, 3, 4, 4)
        rows, cols = torch.arange(64) // 8, torch.arange(64) % 8
        distance = torch.maximum((rows - 4).abs(), (cols - 4).abs())   # (N,) from patch (4, 4)
    else:                                                      # 40 tokens; change step 20 only
        x = torch.randn(1, 40, 32)
        changed = x.clone()
        changed[0, 20] += torch.randn(32)
        distance = (torch.arange(40) - 20).abs()
    if modality == 'vision':                                   # the teacher's own patch embedding reads the image
        x, changed = dict(source=x), dict(source=changed)
    taps, moved = teacher(x, tap='block', window=W, front_end=shared), teacher(changed, tap='block', window=W, front_end=shared)
    for l, (a, b) in enumerate(zip(taps, moved), start=1):
        differs = (a != b).any(-1)[0]                          # (T,) which outputs moved at all
        assert torch.equal(differs, distance <= l * W), (l, distance[differs].tolist())   # exactly the l·W square
    full, full_moved = teacher(x, tap='block', front_end=shared)[-1], teacher(changed, tap='block', front_end=shared)[-1]
    assert (full != full_moved).any(-1)[0][distance == distance.max()].all()      # W = 0: everything


def test_speech_ema_front_end_averages_the_feature_encoder_and_reads_the_waveform():
    """--ema-front-end (fairseq ema_transformer_only False): the teacher holds its own feature and positional encoders,
    the EMA moves them, and the targets are those of that copy run on the unmasked waveform, recomputed here by hand:
    normalise, convolve, project, add positions, LayerNorm, blocks. The default shares them (test above: no front_end.)."""
    torch.manual_seed(0)
    cfg = ModelConfig(modality='speech', dim=16, layers=2, heads=2, ffn_dim=32, conv_dim=8, pos_conv_depth=1, pos_conv_kernel=3,
                      pos_conv_groups=2, layerdrop=0.0, ema_front_end=True)
    student = Data2Vec(cfg)
    teacher = Teacher(student)
    assert any(k.startswith('front_end.feature_encoder.') for k in teacher.state_dict())
    assert not any(k.startswith('front_end.') for k in Teacher(Data2Vec(ModelConfig(**{**cfg.__dict__, 'ema_front_end': False}))).state_dict())
    with torch.no_grad():                                       # the student moves; the teacher follows by τ only
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    conv = 'front_end.feature_encoder.conv_layers.0.conv.weight'
    before = teacher.state_dict()[conv].clone()
    ema_update_(teacher, Teacher.averaged_part(student), 0.75)
    torch.testing.assert_close(teacher.state_dict()[conv], 0.75 * before + 0.25 * student.state_dict()[conv])

    wav = torch.randn(2, 3200)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 2:6] = True
    _, teacher_input, padding, _ = student(wav, None, mask)
    assert torch.equal(teacher_input['source'], wav)           # the raw waveform, unmasked
    y = teacher_targets(teacher, teacher_input, padding, tap='ffn', top_k=2, norm='instance', front_end=student.front_end)
    fe = teacher.front_end
    with torch.no_grad():                                       # by hand, from the teacher's own modules
        x = (wav - wav.mean(1, keepdim=True)) / (wav.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        h = x[:, None]
        for layer in fe.feature_encoder.conv_layers:
            h = F.gelu(F.layer_norm(layer.conv(h).transpose(1, 2), (8,), layer.layer_norm.weight, layer.layer_norm.bias).transpose(1, 2))
        h = fe.feature_encoder.projection(fe.feature_encoder.layer_norm(h.transpose(1, 2)))           # (B, T, D)
        p = fe.pos_encoder.convs[0](h.transpose(1, 2))[..., :h.shape[1]]
        h = h + F.gelu(F.layer_norm(p.transpose(1, 2), (16,)))
        h = teacher.encoder.layer_norm(h)
        ffn = []
        for block in teacher.encoder.layers:
            h, f = block(h, None, 'ffn')
            ffn.append(f)
        inorm = [(f - f.mean(1, keepdim=True)) / (f.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt() for f in ffn]
    torch.testing.assert_close(y, (inorm[0] + inorm[1]) / 2)


def test_speech_ema_front_end_targets_of_a_padded_batch_are_each_clips_own():
    """--ema-front-end with --pad: the teacher's copy reads the waveforms with their sample padding, so each clip's
    targets at its valid frames are those of the clip alone (the frame padding as the student's)."""
    torch.manual_seed(0)
    cfg = ModelConfig(modality='speech', dim=16, layers=2, heads=2, ffn_dim=32, conv_dim=8, pos_conv_depth=1, pos_conv_kernel=3,
                      pos_conv_groups=2, layerdrop=0.0, ema_front_end=True)
    student = Data2Vec(cfg).eval()
    teacher = Teacher(student)
    long, short = torch.randn(1, 4000), torch.randn(1, 2400)
    wav = torch.zeros(2, 4000)
    wav[0], wav[1, :2400] = long[0], short[0]
    padding = torch.zeros(2, 4000, dtype=torch.bool)
    padding[1, 2400:] = True
    _, teacher_input, frames, _ = student(wav, padding, None)
    y = teacher_targets(teacher, teacher_input, frames, tap='ffn', top_k=2, norm='instance', front_end=student.front_end)
    for row, clip in ((0, long), (1, short)):
        _, alone_input, alone_frames, _ = student(clip, None, None)
        alone = teacher_targets(teacher, alone_input, alone_frames, tap='ffn', top_k=2, norm='instance', front_end=student.front_end)
        n = alone.shape[1]
        assert int((~frames[row]).sum()) == n
        torch.testing.assert_close(y[row, :n], alone[0], rtol=1e-4, atol=1e-4)

"""data2vec 2.0 for text (issue 19): random masks, the visible-only student, the 1-D decoder without residuals, the
targets, the teacher's pass and its EMA coverage, presets, and the command line.

    pytest tests/test_v2_text.py
"""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import train
from config import parse_train_args, random_mask_count
from conftest import ROOT, pretrain_then_finetune
from data.text import collate_v2
from masking import random_mask, visible_order
from model import ConvDecoder, Data2Vec2, build_student
from teacher import Teacher, ema_update_

# ---- random masks


def test_random_mask_count_is_fairseqs():
    """fairseq random_masking keeps int(T·(1 − p)) and masks the rest: 512 · 0.52 = 266.24 → 266 kept, 246 masked."""
    assert random_mask_count(512, 0.48) == 512 - 266 == 246
    assert random_mask_count(512, 0.5) == 256 and random_mask_count(64, 0.48) == 64 - 33


def test_random_masks_have_exact_counts_and_never_touch_specials_or_padding():
    """Rows with specials (<s> 0, </s> 2 between documents) and padding (1) at different places: every row masks exactly
    `count` ordinary tokens, and over many draws each ordinary token of a row is masked count / n of the time (a
    uniformly random subset: MAE's argsort of noise), every special and pad never."""
    T, g = 40, torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (3, T), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2                                       # <s> … </s>
    ids[0, 10] = ids[0, 25] = 2                                        # document breaks
    ids[1, 30:] = 1                                                    # padding
    ids[1, 29] = 2
    candidates = ids >= 5
    count = random_mask_count(T, 0.48)                                 # 40 − int(20.8) = 20
    draws = torch.stack([random_mask(candidates, count, g) for _ in range(2000)])   # (2000, 3, T)
    assert (draws.sum(-1) == count).all()
    assert not (draws & ~candidates).any()
    freq = draws.float().mean(0)                                       # (3, T)
    for r in range(3):
        expected = count / candidates[r].sum().item()
        assert (freq[r][candidates[r]] - expected).abs().max() < 0.05, r   # 2000 draws: std ≤ 0.011
    with pytest.raises(ValueError, match='fewer than the 30 to mask'):
        random_mask(candidates, 30)


def test_collate_gives_m_masks_per_block_with_the_fixed_count():
    mcfg, cfg = parse_train_args(V2)
    blocks = torch.randint(5, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    blocks[:, 0], blocks[:, -1], blocks[2, 12] = 0, 2, 2
    batch = collate_v2([(b, 0) for b in blocks], cfg, (5, 300), torch.Generator().manual_seed(1))
    assert torch.equal(batch['source'], blocks)                        # no <mask> id: the ids stay as they are
    assert batch['mask'].shape == (4 * 3, 32) and (batch['mask'].sum(1) == 32 - int(32 * 0.52)).all()
    assert not batch['mask'][:, [0, -1]].any() and not batch['mask'][6:9, 12].any()
    assert batch['ids_keep'].shape == (12, int(32 * 0.52))
    assert len({tuple(m.tolist()) for m in batch['mask'][:3]}) == 3    # the M copies of a block differ


# ---- the decoder


def test_text_decoder_has_no_residual_and_a_two_layer_projection():
    """Rebuilt here: 5 × [Conv1d(k 9, 1 group) → LN without affine → GELU] with no residual, then
    Linear(C → 2C) → GELU → Linear(2C → D). The same stack with residuals gives another output."""
    torch.manual_seed(0)
    D, T = 16, 20
    dec = ConvDecoder(D, decoder_dim=D, layers=5, kernel=9, groups=1, residual=False, projection_layers=2,
                      input_dropout=0.0, noise_std=0.0).eval()
    mask = random_mask(torch.ones(6, T, dtype=torch.bool), 9, torch.Generator().manual_seed(1))
    ids_keep, ids_restore = visible_order(mask)
    kept = torch.randn(6, T - 9, D)
    x = torch.zeros(6, T, D)
    for r in range(6):
        x[r, ids_keep[r]] = kept[r]                                    # noise σ 0: zeros at the masked steps
    h = x.transpose(1, 2)                                              # (R, D, T)
    hs = [h]
    for conv in dec.convs:
        assert conv.groups == 1 and conv.kernel_size == (9,) and conv.padding == (4,)
        h = F.gelu(F.layer_norm(F.conv1d(h, conv.weight, conv.bias, padding=4).transpose(1, 2), (D,))).transpose(1, 2)
        hs.append(h)
    lin1, lin2 = dec.proj[0], dec.proj[2]
    assert lin1.weight.shape == (2 * D, D) and lin2.weight.shape == (D, 2 * D)
    expected = F.linear(F.gelu(F.linear(h.transpose(1, 2), lin1.weight, lin1.bias)), lin2.weight, lin2.bias)
    out = dec(kept, ids_restore)
    torch.testing.assert_close(out, expected)
    dec.residual = True
    assert not torch.allclose(dec(kept, ids_restore), out, atol=1e-3)  # a residual would change it: the test can tell


def test_base_and_large_text_presets_are_the_shipped_configs():
    mcfg, cfg = parse_train_args(['--modality', 'text', '--version', '2', '--preset', 'base', '--vocab-size', '50265'])
    assert (mcfg.dim, mcfg.layers, mcfg.heads, mcfg.ffn_dim, mcfg.decoder_dim, mcfg.decoder_layers, mcfg.decoder_kernel,
            mcfg.decoder_groups, mcfg.decoder_residual, mcfg.decoder_projection_layers, mcfg.decoder_dropout) == \
        (768, 12, 12, 3072, 768, 5, 9, 1, False, 2, 0.1)
    assert (cfg.mask_prob, cfg.clones, cfg.top_k, cfg.target_norm, cfg.target_post_norm, cfg.loss_scale, cfg.loss_beta) == \
        (0.48, 8, 12, 'instance', 'none', 1.0, 0.0)
    assert (cfg.ema_start, cfg.ema_end, cfg.ema_anneal_steps) == (0.9999, 0.99999, 100_000)
    assert (cfg.lr, cfg.adam_beta2, cfg.adam_eps, cfg.weight_decay, cfg.clip, cfg.schedule, cfg.min_lr) == \
        (2e-4, 0.98, 1e-6, 0.01, 1.0, 'cosine', 0.0)
    assert cfg.warmup * cfg.steps == pytest.approx(4000) and cfg.block_size == 512 and cfg.batch_size == 16 * 4
    assert cfg.no_decay_1d and cfg.micro_batch_size == 4 and cfg.steps == 1_000_000 and mcfg.layerdrop == 0
    model = build_student(mcfg)
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert decoder == 5 * (768 * 768 * 9 + 768) + (768 * 1536 + 1536) + (1536 * 768 + 768)   # fairseq's Decoder1d, counted here
    large_m, large = parse_train_args(['--modality', 'text', '--version', '2', '--preset', 'large'])
    assert (large_m.dim, large_m.layers, large.top_k, large.target_norm, large.target_post_norm, large.mask_prob, large.lr,
            large.steps, large_m.decoder_dim) == (1024, 24, 24, 'layer', 'instance', 0.5, 1e-4, 600_000, 768)
    assert (large.batch_size, large.micro_batch_size, large.warmup * large.steps) == (32 * 2, 2, pytest.approx(4000))


def test_large_targets_are_layer_norm_per_block_then_instance_norm_of_the_average():
    """large_text_only_task.yaml: layer_norm_target_layer, then instance_norm_targets: LN over channels of each block,
    the mean, then IN over time, computed here."""
    from teacher import make_targets
    blocks = [torch.randn(2, 10, 8) * (i + 1) + i for i in range(3)]
    ln = [(a - a.mean(-1, keepdim=True)) / torch.sqrt(a.var(-1, unbiased=False, keepdim=True) + 1e-5) for a in blocks]
    avg = sum(ln) / 3
    expected = (avg - avg.mean(1, keepdim=True)) / torch.sqrt(avg.var(1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(make_targets(blocks, 'layer', None, 'instance'), expected)


def test_text_decoder_projection_starts_as_init_bert_params():
    """fairseq applies init_bert_params to the whole model and never resets the text decoder (unlike speech's and
    images'): its projection's Linears start N(0, 0.02²) with zero biases; the convolutions keep PyTorch's init."""
    mcfg, _ = parse_train_args(['--modality', 'text', '--version', '2', '--preset', 'base', '--vocab-size', '1000'])
    torch.manual_seed(0)
    dec = build_student(mcfg).decoder
    for lin in (dec.proj[0], dec.proj[2]):
        assert abs(lin.weight.std().item() - 0.02) < 0.0005 and not lin.bias.any()
    conv = dec.convs[0]                                                # fan_in 768 · 9: PyTorch's bound 1/√fan_in
    assert conv.weight.abs().max() <= 1 / math.sqrt(768 * 9) and conv.bias.abs().max() > 0


def test_v2_text_flags_are_checked():
    for argv, words in [(['--version', '2', '--text-mask', 'span'], '--text-mask is for --version 1'),
                        (['--version', '2', '--mask-prob', '0.99', '--block-size', '8'], 'more than the 6 between <s> and </s>'),
                        (['--decoder-residual'], '--decoder-residual is for --version 2'),
                        (['--version', '2', '--mask-length', '5'], '--mask-length 5: data2vec 2.0 masks single tokens'),
                        (['--version', '2', '--mask-adjust', '0.3'], '--mask-adjust is for --modality'),
                        (['--version', '2', '--decoder-projection-layers', '3'], '--decoder-projection-layers 3: choose 1 or 2')]:
        r = subprocess.run([sys.executable, str(ROOT / 'train.py'), '--modality', 'text', *argv],     # refused while parsing
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and words in r.stderr.strip().splitlines()[-1], r.stderr


# ---- the student, teacher and step (tiny sizes)

V2 = ['--modality', 'text', '--version', '2', '--dim', '32', '--layers', '3', '--heads', '4', '--ffn-dim', '64', '--top-k', '2',
      '--clones', '3', '--decoder-dim', '32', '--decoder-layers', '2', '--batch-size', '4', '--micro-batch-size', '4',
      '--vocab-size', '300', '--block-size', '32', '--max-tokens', '32', '--dropout', '0', '--attn-dropout', '0']


def v2_setup(seed=0):
    mcfg, cfg = parse_train_args(V2)
    mcfg.vocab_size, mcfg.pad_id = 300, 1
    torch.manual_seed(seed)
    model = build_student(mcfg)
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(5, 300, (4, 32), generator=g)
    blocks[:, 0], blocks[:, -1], blocks[1, 9] = 0, 2, 2
    return mcfg, cfg, model, Teacher(model), collate_v2([(b, 0) for b in blocks], cfg, (5, 300), torch.Generator().manual_seed(seed))


def block_outputs(model, batch, source=None):
    taps = []
    hooks = [b.register_forward_hook(lambda m, i, o: taps.append(o[0])) for b in model.encoder.layers]
    model(**{**batch, 'source': batch['source'] if source is None else source})
    for h in hooks:
        h.remove()
    return torch.stack(taps)                                          # (L, R, T_keep, D)


def test_changing_a_masked_token_changes_no_student_block_output():
    """The student's blocks read the visible tokens only: new ids at the tokens masked in all M copies of their block
    leave every block output as it was; a new id at a visible token changes them (the test can tell)."""
    mcfg, cfg, model, teacher, batch = v2_setup()
    mask = batch['mask'][:1].repeat(12, 1)                             # one mask for every row: masked in all copies
    ids_keep, ids_restore = visible_order(mask)
    batch = dict(batch, mask=mask, ids_keep=ids_keep, ids_restore=ids_restore)
    other = torch.where(mask[::3], torch.randint(5, 300, (4, 32)), batch['source'])
    assert not torch.equal(other, batch['source'])
    before = block_outputs(model, batch)
    assert before.shape == (3, 12, 32 - random_mask_count(32, 0.48), 32)   # (L, R, T_keep, D)
    assert torch.equal(before, block_outputs(model, batch, other))
    visible = batch['source'].clone()
    visible[0, ids_keep[0, 1]] = 7 if visible[0, ids_keep[0, 1]] != 7 else 8
    assert not torch.equal(before, block_outputs(model, batch, visible))


def test_the_students_first_block_reads_the_embeddings_of_the_kept_tokens():
    """Block 0's input, rebuilt here: LN(E[id] + P[position]) (RoBERTa's positions, from 2) at the kept tokens of each
    copy; no <mask> embedding anywhere."""
    mcfg, cfg, model, teacher, batch = v2_setup()
    seen = []
    model.encoder.layers[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model(**batch)
    e = model.front_end.embed
    with torch.no_grad():
        x = F.layer_norm(e.tokens.weight[batch['source']] + e.positions.weight[torch.arange(32) + 2], (32,),
                         e.layer_norm.weight, e.layer_norm.bias, eps=1e-5)          # (4, 32, D)
        x = x.repeat_interleave(3, 0)
        expected = torch.stack([x[r, batch['ids_keep'][r]] for r in range(12)])    # (12, T_keep, D)
    torch.testing.assert_close(seen[0], expected)


def test_the_teacher_runs_once_per_block_on_every_token():
    mcfg, cfg, model, teacher, batch = v2_setup()
    seen, teacher_rows = [], []
    model.encoder.layers[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    teacher.encoder.register_forward_hook(lambda m, inp, out: teacher_rows.append(inp[0].shape))
    train.forward_loss(model, teacher, batch, cfg)
    assert seen == [(4 * 3, 32 - random_mask_count(32, 0.48), 32)]   # the visible tokens of M copies
    assert teacher_rows == [(4, 32, 32)]                               # one pass per block, every token


def test_ema_averages_the_blocks_and_shares_the_embeddings():
    """The teacher holds the blocks only; the embeddings are the student's: a change to the student's embedding
    changes the targets at once, with no EMA step; an EMA step moves the teacher's blocks by (1 − τ)(θ − Δ)."""
    mcfg, cfg, model, teacher, batch = v2_setup()
    assert set(teacher.state_dict()) == {k for k in model.state_dict() if k.startswith('encoder.')}
    assert not any(k.startswith(('front_end', 'decoder')) for k in teacher.state_dict())
    targets = []
    for _ in range(2):
        loss, stats = train.forward_loss(model, teacher, batch, cfg)
        targets.append(stats['target_moments'])
        with torch.no_grad():
            model.front_end.embed.tokens.weight.mul_(1.5).add_(0.1)
    assert not torch.allclose(targets[0], targets[1])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    ema_update_(teacher, Teacher.averaged_part(model), 0.9)
    student = model.state_dict()
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * student[k])


def test_loss_equals_a_recomputation_with_repeated_targets(monkeypatch):
    """forward_loss against everything rebuilt here: the student's embedding of the unmasked ids, the teacher's blocks'
    FFN outputs, instance norm over time per block, the average of the top K, no final norm, repeated for the M copies;
    then L2 × loss_scale 1 summed over channels, averaged over the masked tokens of every copy."""
    mcfg, cfg, model, teacher, batch = v2_setup()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.01)                         # a teacher that is not the student
    captured, real = {}, train.regression_loss
    monkeypatch.setattr(train, 'regression_loss', lambda pred, y, *a: captured.update(pred=pred) or real(pred, y, *a))
    loss, _ = train.forward_loss(model, teacher, batch, cfg)
    e = model.front_end.embed
    with torch.no_grad():
        x = F.layer_norm(e.tokens.weight[batch['source']] + e.positions.weight[torch.arange(32) + 2], (32,),
                         e.layer_norm.weight, e.layer_norm.bias, eps=1e-5)          # (4, 32, D)
        ffn = []
        for block in teacher.encoder.layers:                          # post-LN: the FFN output before the last residual
            a = block.self_attn(x)
            r = F.layer_norm(x + a, (32,), block.self_attn_layer_norm.weight, block.self_attn_layer_norm.bias)
            f = block.fc2(F.gelu(block.fc1(r)))
            ffn.append(f)
            x = F.layer_norm(r + f, (32,), block.final_layer_norm.weight, block.final_layer_norm.bias)
        normed = [(a - a.mean(1, keepdim=True)) / torch.sqrt(a.var(1, unbiased=False, keepdim=True) + 1e-5) for a in ffn[-2:]]
        y = (sum(normed) / 2).repeat_interleave(3, 0)                  # (12, 32, D): no final norm
        expected = (captured['pred'] - y).square().sum(-1)[batch['mask']].mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert isinstance(model, Data2Vec2) and captured['pred'].shape == (12, 32, 32)


def test_train_then_finetune_a_v2_text_checkpoint_from_the_command_line(tmp_path):
    """train.py --version 2 for 2 updates, then finetune.py on its checkpoint with the RoBERTa head: the decoder is
    dropped, the embeddings and blocks load."""
    out, weights = pretrain_then_finetune(tmp_path, V2, ['--modality', 'text', '--batch-size', '8', '--labeled', '24'])
    assert 'data2vec 2.0' in out
    assert not any(k.startswith('decoder.') for k in weights)
    assert 'backbone.front_end.embed.tokens.weight' in weights and any(k.startswith('head.') for k in weights)
    pretrained = torch.load(tmp_path / 'pre' / 'checkpoint.pt', weights_only=False)['student']
    assert weights['backbone.front_end.embed.tokens.weight'].shape == pretrained['front_end.embed.tokens.weight'].shape


def test_a_corpus_of_very_short_documents_is_refused_at_start_up(tmp_path):
    """A block whose ordinary tokens (all but <s>, </s>, <pad>) are fewer than the masked count cannot be masked: one
    DataError before training, not a crash in a loader worker."""
    import data.text
    from data import DataError
    (tmp_path / 'short.txt').write_text('\n\n'.join(['a'] * 400) + '\n')   # 'a' </s> 'a' </s> …
    mcfg, cfg = parse_train_args(V2 + ['--data', str(tmp_path / 'short.txt')])
    with pytest.raises(DataError, match=r'holds only \d+ ordinary tokens .* fewer than the 16 that --mask-prob 0.48 masks'):
        data.text.pretraining_data(mcfg, cfg)


def test_one_embedding_dropout_for_the_student_and_none_for_the_teacher():
    """With the preset's dropout 0.1: block 0 reads the visible tokens' embeddings with one dropout (each value 0 or
    ×1/0.9, about 10% zeros); the teacher's targets are the same on two calls (it reads the embedding clean, in eval
    mode; DEVIATIONS.md 50)."""
    mcfg, cfg = parse_train_args([a for a in V2 if a not in ('--dropout', '--attn-dropout', '0')] + ['--batch-size', '4'])
    assert mcfg.dropout == 0.1
    mcfg.vocab_size, mcfg.pad_id = 300, 1
    torch.manual_seed(0)
    model = build_student(mcfg).train()
    teacher = Teacher(model)
    blocks = torch.randint(5, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    blocks[:, 0], blocks[:, -1] = 0, 2
    batch = collate_v2([(b, 0) for b in blocks], cfg, (5, 300), torch.Generator().manual_seed(0))
    seen = []
    model.encoder.layers[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    targets = [train.forward_loss(model, teacher, batch, cfg)[1]['target_moments'] for _ in range(2)]
    torch.testing.assert_close(targets[0], targets[1], rtol=0, atol=0)
    e = model.front_end.embed
    with torch.no_grad():
        x = e(batch['source']).repeat_interleave(3, 0)                     # (12, 32, D), clean
        clean = torch.stack([x[r, batch['ids_keep'][r]] for r in range(12)])
    dropped = seen[0] == 0
    torch.testing.assert_close(seen[0][~dropped], clean[~dropped] / 0.9)
    assert 0.07 < dropped.float().mean().item() < 0.13

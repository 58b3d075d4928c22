"""data2vec 2.0 for images (issue 18): inverse block masks, sine-cosine positions, the 2-D decoder, the vision student,
its teacher, the CLS loss and the command line.

    pytest tests/test_v2_vision.py
"""
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from config import parse_train_args
from conftest import ROOT, pretrain_then_finetune
from data.vision import collate_v2
from encoders import sincos_positions_2d
from masking import inverse_block_mask, visible_order
from model import ConvDecoder, Data2Vec2, build_student
from teacher import Teacher

# ---- inverse block masks (fairseq compute_block_mask_2d, inverse_mask True)


def simulate_inverse_block_mask(side, R, B, A, rng):
    """One row of fairseq's compute_block_mask_2d with inverse_mask, as loops with Python's random (independent of
    masking.py): keep B × B blocks around int(L·((1 − R + A)/B²)) centres drawn with replacement, fix the kept count to
    int(L·(1 − R)) by uniform trimming or filling, invert. → a 0/1 list, 1 = masked."""
    L, q = side * side, 1 - R
    kept = [[0] * side for _ in range(side)]
    for _ in range(int(L * ((q + A) / B ** 2))):
        c = rng.randrange(L)
        for i in range(B):
            for j in range(B):
                y = min(max(c // side + i - B // 2, 0), side - 1)
                x = min(max(c % side + j - B // 2, 0), side - 1)
                kept[y][x] = 1
    flat = [v for row in kept for v in row]
    target, on = int(L * q), [i for i in range(L) if flat[i]]
    if len(on) > target:
        for i in rng.sample(on, len(on) - target):
            flat[i] = 0
    elif len(on) < target:
        for i in rng.sample([i for i in range(L) if not flat[i]], target - len(on)):
            flat[i] = 1
    return [1 - v for v in flat]


def kept_blocks(row, side, B=3):
    """How many B × B windows of a 0/1 row (1 = masked) are wholly kept: the islands' signature."""
    return sum(all(row[(y + i) * side + x + j] == 0 for i in range(B) for j in range(B))
               for y in range(side - B + 1) for x in range(side - B + 1))


@pytest.mark.parametrize('side, R, A', [(14, 0.8, 0.07), (8, 0.8, 0.07), (7, 0.8, 0.07), (14, 0.75, 0.1)])
def test_inverse_block_masks_keep_exactly_int_L_times_1_minus_R_per_row_and_clone(side, R, A):
    L = side * side
    mask = inverse_block_mask(16 * 8, side, R, 3, A, generator=torch.Generator().manual_seed(side))   # 16 images × M 8
    assert mask.dtype == torch.bool and mask.shape == (128, L)
    assert ((~mask).sum(1) == int(L * (1 - R))).all()                              # base: 39 of 196 kept, 157 masked
    distinct = len({tuple(r.tolist()) for r in mask})                              # clones are drawn independently;
    assert distinct == 128 if side >= 8 else distinct > 64                         # 7 × 7 keeps one 3 × 3 block of 9
    assert abs(mask.float().mean().item() - R) < 1 / L                             # the masked fraction is R, up to int()


def test_inverse_block_masks_match_an_independent_simulation_of_3x3_islands():
    """Over 600 masks of 14 × 14: kept patches come in 3 × 3 islands (wholly kept 3 × 3 windows per mask, far above a
    uniform draw of 39 patches, ≈ 0) as often as in the loop version above, with the same per-patch frequencies."""
    side, n, rng = 14, 600, random.Random(0)
    ours = inverse_block_mask(n, side, 0.8, 3, 0.07, generator=torch.Generator().manual_seed(0)).int().tolist()
    sim = [simulate_inverse_block_mask(side, 0.8, 3, 0.07, rng) for _ in range(n)]
    blocks_ours, blocks_sim = (sum(kept_blocks(r, side) for r in rows) / n for rows in (ours, sim))
    assert blocks_sim > 2 and abs(blocks_ours - blocks_sim) < 0.1 * blocks_sim, (blocks_ours, blocks_sim)
    uniform = [[1] * 196 for _ in range(n)]
    for row in uniform:
        for i in rng.sample(range(196), 39):
            row[i] = 0
    assert sum(kept_blocks(r, side) for r in uniform) / n < 0.05                   # not what a uniform draw gives
    ring = torch.tensor([min(y, x, side - 1 - y, side - 1 - x) for y in range(side) for x in range(side)])   # 0 = border
    f_ours, f_sim = ([(1 - torch.tensor(rows, dtype=torch.float)[:, ring.clamp(max=3) == d]).mean().item() for d in range(4)]
                     for rows in (ours, sim))                                      # P(kept) by distance from the border
    assert max(abs(a - b) for a, b in zip(f_ours, f_sim)) < 0.02, (f_ours, f_sim)  # 52, 44, 36, 64 patches
    assert f_sim[0] < f_sim[3] - 0.02 and f_ours[0] < f_ours[3] - 0.02             # fewer centres reach a border patch


def mae_sincos(D, side):
    """MAE's get_2d_sincos_pos_embed (models/mae.py, reused by fairseq's images.py), ported line by line to numpy."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))   # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, side, side])
    return np.concatenate([one_d(D // 2, grid[0]), one_d(D // 2, grid[1])], axis=1)            # (side², D)


@pytest.mark.parametrize('D, side', [(16, 5), (768, 14), (128, 7)])
def test_sincos_positions_equal_maes(D, side):
    pos = sincos_positions_2d(D, side)
    assert pos.shape == (side * side, D)
    np.testing.assert_allclose(pos.numpy(), mae_sincos(D, side), atol=1e-6)
    assert pos[1, 0] != 0 and pos[side, 0] == 0                                   # the first half follows the column


@pytest.mark.parametrize('D, C', [(32, 32), (32, 16)])
def test_2d_decoder_restores_order_fills_noise_and_is_fairseqs_conv2d_stack(D, C):
    """fairseq Decoder2d: the input restored to the grid (visible outputs in place, N(0, 0.01²) noise at the masked
    patches), layers of Conv2d → LN over channels (no affine) → GELU, a residual wherever the shapes match (so from the
    first layer when D = C, as in base), then a Linear."""
    torch.manual_seed(0)
    side = 4
    dec = ConvDecoder(D, decoder_dim=C, layers=2, kernel=3, groups=4, input_dropout=0.0, noise_std=0.01, grid=(side, side)).eval()
    mask = inverse_block_mask(256, side, 0.75, 3, 0.1, generator=torch.Generator().manual_seed(1))
    ids_keep, ids_restore = visible_order(mask)
    kept = torch.randn(256, ids_keep.shape[1], D)
    seen = []
    dec.convs[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    out = dec(kept, ids_restore)
    assert out.shape == (256, side * side, D)
    x0 = seen[0].flatten(2).transpose(1, 2)                                         # (R, N, D), row-major patches
    for r in range(256):
        assert torch.equal(x0[r, ids_keep[r]], kept[r])                             # visible patches in their places
    noise = x0[mask]                                                                # (R · 12, D)
    assert abs(noise.std().item() - 0.01) < 0.0005 and abs(noise.mean().item()) < 0.0005

    def layer(conv, h):                                                             # Conv2d → LN over C (no affine) → GELU
        h = F.conv2d(h, conv.weight, conv.bias, padding=1, groups=4)
        return F.gelu(F.layer_norm(h.permute(0, 2, 3, 1), (C,))).permute(0, 3, 1, 2)
    h = layer(dec.convs[0], seen[0]) + (seen[0] if D == C else 0)                  # D ≠ C: no residual on the first
    h = layer(dec.convs[1], h) + h
    torch.testing.assert_close(out, dec.proj(h.flatten(2).transpose(1, 2)))


def test_base_vision_sizes():
    """ViT-B/16: patch embedding 768·3·16² + 768, CLS 768, input LN, 12 blocks; decoder 6 × Conv2d(768, k 3, 16 groups)
    + Linear(768, 768). No mask token, no relative position bias, positions not saved."""
    mcfg, cfg = parse_train_args(['--modality', 'vision', '--version', '2', '--preset', 'base'])
    model = build_student(mcfg)
    block = 4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768 + 4 * 768
    assert model.num_params() == 768 * 3 * 256 + 768 + 768 + 2 * 768 + 12 * block == 85_647_360
    assert sum(p.numel() for p in model.decoder.parameters()) == 6 * (768 * 48 * 9 + 768) + 768 * 768 + 768
    assert not any('mask_token' in k or 'rel_pos' in k or 'positions' in k for k in model.state_dict())
    assert (cfg.clones, cfg.top_k, cfg.mask_prob, cfg.mask_length, cfg.mask_adjust, cfg.cls_loss, cfg.cls_rows) == \
        (16, 10, 0.8, 3, 0.07, 0.01, 256)
    assert (mcfg.decoder_dim, mcfg.decoder_layers, mcfg.decoder_kernel, mcfg.decoder_groups, mcfg.decoder_dropout) == (768, 6, 3, 16, 0)
    assert (cfg.target_layer, cfg.target_norm, cfg.target_post_norm, cfg.loss_beta, cfg.loss_scale) == ('ffn', 'instance', 'layer', 0, 0)
    assert (cfg.ema_start, cfg.ema_end, cfg.ema_anneal_steps) == (0.9998, 0.99999, 100_000)
    assert (cfg.lr, cfg.adam_beta2, cfg.adam_eps, cfg.weight_decay, cfg.no_decay_1d, cfg.clip, cfg.schedule, cfg.min_lr) == \
        (1e-3, 0.95, 1e-8, 0.05, True, 4.0, 'cosine', 0.0)
    assert (round(cfg.warmup * cfg.steps), cfg.steps, cfg.batch_size, cfg.micro_batch_size) == (50_040, 375_300, 256, 16)
    assert (cfg.min_crop_scale, cfg.color_jitter) == (0.2, False)                   # MAE's crops and flips
    assert (mcfg.dropout, mcfg.attn_dropout, mcfg.layerdrop, mcfg.drop_path) == (0, 0, 0, 0)
    assert model.encoder.layer_norm.eps == model.encoder.layers[5].final_layer_norm.eps == 1e-6


def test_large_vision_preset_is_the_shipped_config():
    """large_images_only_task.yaml: 24 blocks of 1024, K 18, R 0.75, A 0.1, decoder 3 × Conv2d(1024, k 5), τ → 0.99999
    over 150k, lr 4e-4, 16 GPUs × 8 images (so the CLS loss sums over 8 × 16 rows)."""
    mcfg, cfg = parse_train_args(['--modality', 'vision', '--version', '2', '--preset', 'large'])
    assert (mcfg.dim, mcfg.layers, mcfg.heads, mcfg.ffn_dim, cfg.top_k) == (1024, 24, 16, 4096, 18)
    assert (cfg.mask_prob, cfg.mask_adjust, cfg.mask_length, cfg.clones) == (0.75, 0.1, 3, 16)
    assert (mcfg.decoder_dim, mcfg.decoder_layers, mcfg.decoder_kernel) == (1024, 3, 5)
    assert (cfg.ema_start, cfg.ema_end, cfg.ema_anneal_steps, cfg.lr) == (0.9998, 0.99999, 150_000, 4e-4)
    assert (cfg.batch_size, cfg.micro_batch_size, cfg.cls_rows, round(cfg.warmup * cfg.steps)) == (128, 8, 128, 50_040)


def test_v2_vision_init_is_fairseqs():
    """init_bert_params on the blocks' Linears (N(0, 0.02²), biases 0), xavier_uniform on the patch embedding seen as a
    Linear (D, 3·P²), the CLS token N(0, 1), the decoder's convolutions PyTorch's default (kaiming-uniform bound)."""
    mcfg, _ = parse_train_args(['--modality', 'vision', '--version', '2', '--preset', 'base'])
    torch.manual_seed(0)
    model = build_student(mcfg)
    fc1 = model.encoder.layers[3].fc1
    assert abs(fc1.weight.std().item() - 0.02) < 0.001 and fc1.bias.abs().max() == 0
    w = model.front_end.patch_embed.proj.weight                                   # (768, 3, 16, 16)
    bound = math.sqrt(6 / (3 * 16 * 16 + 768))
    assert w.abs().max() <= bound and abs(w.std().item() - bound / math.sqrt(3)) < 0.001
    assert abs(model.front_end.cls_token.std().item() - 1) < 0.1
    conv = model.decoder.convs[0]                                                  # fan_in = 768/16 · 9 = 432
    assert conv.weight.abs().max() <= 1 / math.sqrt(432) and conv.weight.abs().max() > 0.9 / math.sqrt(432)


# ---- the student, teacher and step (tiny sizes)

V2 = ['--modality', 'vision', '--version', '2', '--dim', '32', '--layers', '3', '--heads', '4', '--ffn-dim', '64', '--top-k', '2',
      '--clones', '3', '--decoder-dim', '32', '--decoder-groups', '4', '--decoder-layers', '2', '--batch-size', '4',
      '--micro-batch-size', '4', '--cls-rows', '12']          # 4 images × M 3: fairseq's sum over one GPU's 12 rows


def v2_setup(seed=0):
    mcfg, cfg = parse_train_args(V2)
    torch.manual_seed(seed)
    model = build_student(mcfg)
    g = torch.Generator().manual_seed(seed)
    images = [(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g), 0) for _ in range(4)]
    return mcfg, cfg, model, Teacher(model), collate_v2(images, mcfg, cfg, torch.Generator().manual_seed(seed))


def test_v2_vision_batch_has_m_masks_per_image():
    mcfg, cfg, model, teacher, batch = v2_setup()
    assert isinstance(model, Data2Vec2) and batch['source'].shape == (4, 3, 32, 32)
    assert batch['mask'].shape == (12, 64) and ((~batch['mask']).sum(1) == 12).all()   # int(64 · 0.2) kept
    assert batch['ids_keep'].shape == (12, 12)


def test_masked_pixels_change_no_student_block_output():
    """Pixels of patches masked in every copy of their image change no block output (CLS included): the student
    reads the visible patches only."""
    mcfg, cfg, model, teacher, batch = v2_setup()
    mask = inverse_block_mask(4, 8, generator=torch.Generator().manual_seed(3)).repeat_interleave(3, 0)   # (12, 64)
    ids_keep, ids_restore = visible_order(mask)
    pixels = mask[::3].view(4, 1, 8, 1, 8, 1).expand(4, 3, 8, 4, 8, 4).reshape(4, 3, 32, 32)   # masked patches' pixels
    other = torch.where(pixels, torch.rand(4, 3, 32, 32), batch['source'])
    outs = []
    for source in (batch['source'], other):
        taps = []
        hooks = [b.register_forward_hook(lambda m, i, o: taps.append(o[0])) for b in model.encoder.layers]
        model(source, mask, ids_keep, ids_restore)
        for h in hooks:
            h.remove()
        outs.append(torch.stack(taps))                                              # (L, R, 1 + N_keep, D)
    assert not torch.equal(other, batch['source'])
    assert outs[0].shape == (3, 12, 1 + 12, 32) and torch.equal(outs[0], outs[1])


def test_the_students_first_block_reads_ln_of_cls_and_the_kept_patches_with_positions():
    """Block 0's input, rebuilt here: LayerNorm(ε 1e-6)([CLS; (PatchEmbed(image) + MAE's positions) at the kept
    patches]) for each of the M copies: positions added before the gather, none on the CLS token."""
    mcfg, cfg, model, teacher, batch = v2_setup()
    seen = []
    model.encoder.layers[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model(**batch)
    pe = model.front_end.patch_embed
    with torch.no_grad():
        patches = F.conv2d((batch['source'] - pe.mean) / pe.std, pe.proj.weight, pe.proj.bias, stride=4)   # (4, D, 8, 8)
        x = patches.flatten(2).transpose(1, 2) + torch.from_numpy(mae_sincos(32, 8)).float()                # (4, 64, D)
        x = x.repeat_interleave(3, 0)
        x = torch.stack([x[r, batch['ids_keep'][r]] for r in range(12)])                                    # (12, 12, D)
        x = torch.cat([model.front_end.cls_token.expand(12, 1, 32), x], 1)
        ln = model.encoder.layer_norm
        expected = F.layer_norm(x, (32,), ln.weight, ln.bias, eps=1e-6)
    torch.testing.assert_close(seen[0], expected, rtol=1e-5, atol=1e-5)


def test_the_teacher_runs_once_per_image_on_every_patch():
    mcfg, cfg, model, teacher, batch = v2_setup()
    seen, teacher_rows = [], []
    model.encoder.layers[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    teacher.encoder.register_forward_hook(lambda m, inp, out: teacher_rows.append(inp[0].shape))
    train.forward_loss(model, teacher, batch, cfg)
    assert seen == [(4 * 3, 1 + 12, 32)]                                            # CLS + 12 kept patches × M copies
    assert teacher_rows == [(4, 1 + 64, 32)]                                        # one pass per image: CLS + all patches


def test_ema_covers_the_patch_embedding_and_cls_but_not_the_decoder():
    mcfg, cfg, model, teacher, batch = v2_setup()
    keys = set(teacher.state_dict())
    assert {'front_end.patch_embed.proj.weight', 'front_end.cls_token'} <= keys
    assert keys == {k for k in model.state_dict() if not k.startswith('decoder.')}


def test_loss_is_regression_plus_the_cls_loss_computed_here(monkeypatch):
    """forward_loss against everything rebuilt here: the teacher's tokens (its own patch embedding of the raw image,
    the fixed positions, its CLS), its blocks' FFN outputs, instance norm over patches, the top-K average, a final
    LayerNorm; then L2 × 1/√D at the masked patches of the M copies, plus 0.01 × Σ over rows of ℓ(CLS output, the mean
    target over patches)."""
    mcfg, cfg, model, teacher, batch = v2_setup()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.01)                                       # a teacher that is not the student
    captured, real = {}, train.regression_loss
    monkeypatch.setattr(train, 'regression_loss', lambda pred, y, *a: captured.update(pred=pred) or real(pred, y, *a))
    cls_out = []
    model.encoder.layers[-1].register_forward_hook(lambda m, i, o: cls_out.append(o[0][:, 0]))
    loss, _ = train.forward_loss(model, teacher, batch, cfg)
    with torch.no_grad():
        fe = teacher.front_end
        patches = F.conv2d((batch['source'] - fe.patch_embed.mean) / fe.patch_embed.std, fe.patch_embed.proj.weight,
                           fe.patch_embed.proj.bias, stride=4).flatten(2).transpose(1, 2)   # (4, 64, 32)
        x = torch.cat([fe.cls_token.expand(4, 1, 32), patches + sincos_positions_2d(32, 8)], 1)
        taps = [t[:, 1:] for t in teacher.encoder(x, None, tap='ffn')[1][-2:]]     # top K = 2, CLS dropped
        normed = [(a - a.mean(1, keepdim=True)) / torch.sqrt(a.var(1, unbiased=False, keepdim=True) + 1e-5) for a in taps]
        y = F.layer_norm(sum(normed) / 2, (32,))                                       # (4, 64, D): IN → average → LN
        reg = ((captured['pred'] - y.repeat_interleave(3, 0)).square().sum(-1) / math.sqrt(32))[batch['mask']].mean()
        cls = ((cls_out[0] - y.mean(1).repeat_interleave(3, 0)).square().sum(-1) / math.sqrt(32)).sum()   # Σ over 12 rows
    torch.testing.assert_close(loss, reg + 0.01 * cls, rtol=1e-4, atol=1e-5)
    assert 0.01 * cls > 0.05 * reg                                                   # far above the tolerance: it is tested


def test_post_ln_blocks_drop_whole_residual_branches_while_training():
    """Stochastic depth in data2vec 2.0's post-LN block (fine-tuning, --drop-path): a dropped sample's block is
    LN₂(LN₁(x)), both branches gone; in eval mode nothing is dropped. The rates rise linearly from 0 (BEiT, fairseq)."""
    from model import Block
    torch.manual_seed(0)
    block = Block(16, 2, 32, dropout=0.0, attn_dropout=0.0, drop_path=1 - 1e-9).train()
    x = torch.randn(4, 5, 16)
    expected = block.final_layer_norm(block.self_attn_layer_norm(x))
    torch.testing.assert_close(block(x)[0], expected)
    assert not torch.allclose(block.eval()(x)[0], expected)
    mcfg, _ = parse_train_args(['--modality', 'vision', '--version', '2', '--drop-path', '0.2', '--layers', '5'])
    assert [b.drop_path for b in build_student(mcfg).encoder.layers] == pytest.approx([0, 0.05, 0.1, 0.15, 0.2])


def test_a_v2_vision_encoder_takes_maes_fine_tuning_recipe():
    """fairseq mae_imagenet_clean.yaml for a v2 base encoder (Adam β2 0.95, lr 1e-3 at 512 images, 16k of 250,200
    updates warming up, layer decay 0.65, drop path 0.1); a v1 encoder keeps BEiT's; tiny is the same for both."""
    from config import fill_recipe, parse_finetune_args
    cfgs = [parse_finetune_args(['--modality', 'vision', '--init', 'scratch']) for _ in range(4)]
    for cfg, (preset, version) in zip(cfgs, [('base', 2), ('base', 1), ('tiny', 2), ('tiny', 1)]):
        assert fill_recipe(cfg, preset, version) is None
    v2, v1, tiny2, tiny1 = cfgs
    assert (v2.adam_beta2, v2.lr, v2.batch_size, v2.steps, v2.layer_decay, v2.drop_path) == (0.95, 1e-3, 512, 250_200, 0.65, 0.1)
    assert v2.warmup == pytest.approx(16_000 / 250_200)
    assert (v1.adam_beta2, v1.lr, v1.batch_size, v1.drop_path) == (0.999, 4e-3, 1024, 0.2)
    assert vars(tiny2) == vars(tiny1)


def test_v2_vision_flags_are_checked():
    for argv, message in [(['--mask-length', '9'], 'side of a kept block'), (['--dim', '30', '--heads', '2', '--decoder-groups', '2'], 'divisible by 4'),
                          (['--rel-pos-bias', 'layer'], 'is for --version 1'), (['--cls-loss', '-1'], '--cls-loss -1.0 must be ≥ 0')]:
        r = subprocess.run([sys.executable, str(ROOT / 'train.py'), '--modality', 'vision', '--version', '2', *argv],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr, (argv, r.stderr[-500:])


def test_train_then_finetune_a_v2_vision_checkpoint_from_the_command_line(tmp_path):
    """train.py --version 2 for 2 updates, then finetune.py on its checkpoint: the decoder is dropped, the CLS token,
    patch embedding and blocks load, and the head pools the patches (mean → fc_norm → Linear)."""
    _, weights = pretrain_then_finetune(tmp_path, V2, ['--modality', 'vision', '--batch-size', '8', '--labeled', '16'])
    assert not any(k.startswith('decoder.') for k in weights) and 'backbone.front_end.cls_token' in weights
    assert 'head.fc_norm.weight' in weights

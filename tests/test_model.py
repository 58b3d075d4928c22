"""Student model, taps, loss and feature encoder.   pytest tests/test_model.py"""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from encoders import SpeechFeatureEncoder, conv_output_length
from model import Block, Data2Vec, ModelConfig, SelfAttention, Transformer, attention_mask, regression_loss
from teacher import Teacher

TINY = ModelConfig(dim=32, layers=3, heads=4, ffn_dim=64, conv_dim=16, dropout=0.0, attn_dropout=0.0, layerdrop=0.0)


def test_conv_output_length():
    assert conv_output_length(16000) == 49                           # 1 s → 49 frames of 20 ms
    assert conv_output_length(399) == 0 and conv_output_length(400) == 1
    fe = SpeechFeatureEncoder(conv_dim=8, dim=16)
    for n in (400, 1234, 16000, 32001):
        x, _ = fe(torch.randn(1, n))
        assert x.shape[1] == conv_output_length(n) == conv_output_length(torch.tensor(n)).item()


def test_attention_matches_softmax_formula():
    torch.manual_seed(0)
    att = SelfAttention(16, 4)
    x = torch.randn(2, 7, 16)
    pad = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])
    q, k, v = (p(x).view(2, 7, 4, 4).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))
    logits = q @ k.transpose(-1, -2) / 2.0                            # 1/√(D/H) = 1/2
    hidden = pad[:, None, :] & ~torch.eye(7, dtype=torch.bool)        # padded keys are hidden, except from themselves
    logits = logits.masked_fill(hidden[:, None], -math.inf)
    expected = att.out_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(att(x, attention_mask(pad, 7)), expected, atol=1e-5, rtol=1e-5)


def test_a_permuted_bias_reaches_sdpa_with_a_unit_last_stride(monkeypatch):
    """SDPA's fused CUDA kernels need the bias's last dimension contiguous; RelativePositionBias returns a permuted
    view (stride 12 there), which sent vision to the math kernel (PERF.md 2026-11-30). Same values, unit stride."""
    from encoders import RelativePositionBias
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda q, k, v, attn_mask=None, **kw:
                        seen.append(attn_mask) or sdpa(q, k, v, attn_mask=attn_mask, **kw))
    rpb = RelativePositionBias((3, 3), 4)
    torch.nn.init.normal_(rpb.table)
    bias = rpb()                                                       # (4, 10, 10)
    assert bias.stride(-1) != 1                                        # the case this guards
    SelfAttention(16, 4)(torch.randn(2, 10, 16), bias)
    assert seen[0].stride(-1) == 1 and torch.equal(seen[0], bias)


def test_post_ln_block_taps_against_a_recomputation():
    """Every tap of a post-LN block (fairseq TransformerSentenceEncoderLayer) recomputed here from its weights: softmax
    attention written out, then LN₁(x + a), the FFN, the residual and LN₂, with F.layer_norm (ε 1e-5)."""
    torch.manual_seed(0)
    blk = Block(32, 4, 64, dropout=0.0, attn_dropout=0.0).eval()
    for norm in (blk.self_attn_layer_norm, blk.final_layer_norm):    # LayerNorms that are not the identity
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 10, 32)
    att = blk.self_attn
    q, k, v = (p(x).view(2, 10, 4, 8).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))
    a = att.out_proj(((q @ k.transpose(-1, -2)) / math.sqrt(8)).softmax(-1).matmul(v).transpose(1, 2).reshape(2, 10, 32))
    r = F.layer_norm(x + a, (32,), blk.self_attn_layer_norm.weight, blk.self_attn_layer_norm.bias)
    f = blk.fc2(F.gelu(blk.fc1(r)))                                   # the paper's target: FFN output before the residual
    s = r + f
    out = F.layer_norm(s, (32,), blk.final_layer_norm.weight, blk.final_layer_norm.bias)
    for name, expected in dict(attention=a, ffn=f, ffn_residual=s, block=out).items():
        y, tap = blk(x, tap=name)
        torch.testing.assert_close(tap, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y, out, atol=1e-5, rtol=1e-5)


def test_teacher_context_window_limits_what_a_step_sees():
    torch.manual_seed(0)
    enc = Transformer(ModelConfig(dim=16, layers=1, heads=2, ffn_dim=32, dropout=0, attn_dropout=0, layerdrop=0)).eval()
    x = torch.randn(1, 20, 16)
    x2 = x.clone()
    x2[0, 15] += torch.randn(16)                                      # (a constant shift would vanish in the LayerNorm)
    window = attention_mask(None, 20, 3)
    y, y2 = enc(x, window)[0], enc(x2, window)[0]
    torch.testing.assert_close(y[0, :12], y2[0, :12])                 # |t − 15| > 3: untouched
    torch.testing.assert_close(y[0, 19:], y2[0, 19:])
    assert not torch.allclose(y[0, 12:19], y2[0, 12:19])
    assert not torch.allclose(enc(x)[0][0, 10], enc(x2)[0][0, 10])    # full context: every step sees step 15


def test_loss_is_l2_over_masked_steps_only():
    torch.manual_seed(0)
    B, T, D = 2, 12, 16
    pred, target = torch.randn(B, T, D), torch.randn(B, T, D)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 3:8] = True
    loss = regression_loss(pred, target, mask)
    expected = ((pred[mask] - target[mask]) ** 2).sum(-1).mean() / math.sqrt(D)
    torch.testing.assert_close(loss, expected)
    perturbed = pred.clone()
    perturbed[0, 0] += 100.0                                          # an unmasked step
    assert regression_loss(perturbed, target, mask) == loss
    perturbed[0, 4] += 1.0                                            # a masked step
    assert regression_loss(perturbed, target, mask) != loss
    beta = 0.5                                                        # Smooth L1, written out
    e = (pred[mask] - target[mask]).abs()
    smooth = torch.where(e <= beta, 0.5 * e ** 2 / beta, e - 0.5 * beta).sum(-1).mean()
    torch.testing.assert_close(regression_loss(pred, target, mask, beta=beta, scale=1.0), smooth)
    with pytest.raises(AssertionError):
        regression_loss(pred, target, mask.long())


def test_padding_does_not_change_valid_frames():
    torch.manual_seed(0)
    model = Data2Vec(TINY).eval()
    wav = torch.randn(1, 8000)
    padded = torch.cat([wav, torch.zeros(1, 4000)], 1)
    pad = torch.zeros(1, 12000, dtype=torch.bool)
    pad[:, 8000:] = True
    T = conv_output_length(8000)
    pred, feats, frame_pad, _ = model(padded, pad)
    pred0, feats0, _, _ = model(wav)
    assert frame_pad[0, :T].logical_not().all() and frame_pad[0, T:].all()
    torch.testing.assert_close(pred[:, :T], pred0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats[:, :T], feats0, atol=1e-4, rtol=1e-4)


def test_teacher_reads_the_unmasked_input():
    torch.manual_seed(0)
    model = Data2Vec(TINY).eval()
    wav = torch.randn(2, 8000)
    T = conv_output_length(8000)
    none, some = torch.zeros(2, T, dtype=torch.bool), torch.zeros(2, T, dtype=torch.bool)
    some[:, 3:20] = True
    pred0, teacher_input0, _, _ = model(wav, None, none)
    pred1, teacher_input1, _, _ = model(wav, None, some)
    torch.testing.assert_close(teacher_input0, teacher_input1)       # the mask changes what the student sees ...
    assert not torch.allclose(pred0, pred1)                           # ... and only that
    assert not teacher_input1.requires_grad


def test_layerdrop_skips_whole_blocks_only_in_training():
    torch.manual_seed(0)
    enc = Transformer(ModelConfig(dim=16, layers=3, heads=2, ffn_dim=32, dropout=0.0, attn_dropout=0.0, layerdrop=1.0))
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(enc.train()(x)[0], enc.layer_norm(x))  # p = 1: every block skipped
    assert not torch.allclose(enc.eval()(x)[0], enc.layer_norm(x))    # eval: no LayerDrop


class GivenFeatures(torch.nn.Module):
    """Stands in for the conv feature encoder: the 'waveform' is already the features (B, T, D)."""

    def forward(self, x, padding_mask=None):
        return x, padding_mask


def test_masked_frames_see_the_mask_embedding():
    torch.manual_seed(0)
    model = Data2Vec(TINY).eval()
    model.front_end.feature_encoder = GivenFeatures()
    x = torch.randn(2, 30, 32)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[:, 10:20] = True
    x2 = x.clone()
    x2[mask] = torch.randn(20, 32)                                    # content under the mask is invisible
    torch.testing.assert_close(model.encode(x, mask=mask)[0], model.encode(x2, mask=mask)[0])


def test_student_overfits_one_batch_with_a_frozen_teacher():
    from teacher import teacher_targets
    torch.manual_seed(0)
    model = Data2Vec(TINY)
    wav = torch.randn(2, 8000)
    mask = torch.zeros(2, conv_output_length(8000), dtype=torch.bool)
    mask[:, 5:15] = True
    with torch.no_grad():                                             # targets computed once: nothing moves them
        y = teacher_targets(Teacher(model), model(wav)[1], top_k=2, front_end=model.front_end)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        loss = regression_loss(model(wav, None, mask)[0], y, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


# HF transformers Data2VecAudioModel names (reference.md §3.1) ← ours: a plain regex key map
HF_KEY_MAP = [
    (r'^front_end\.feature_encoder\.conv_layers\.', 'feature_extractor.conv_layers.'),
    (r'^front_end\.feature_encoder\.(layer_norm|projection)\.', r'feature_projection.\1.'),
    (r'^front_end\.mask_emb$', 'masked_spec_embed'),
    (r'^front_end\.pos_encoder\.convs\.(\d+)\.', r'encoder.pos_conv_embed.layers.\1.conv.'),
    (r'\.self_attn\.', '.attention.'),
    (r'\.self_attn_layer_norm\.', '.layer_norm.'),
    (r'\.fc1\.', '.feed_forward.intermediate_dense.'),
    (r'\.fc2\.', '.feed_forward.output_dense.'),
]


def test_base_matches_hf_data2vec_audio_base_in_size_and_key_names():
    with torch.device('meta'):
        model = Data2Vec(ModelConfig())                               # defaults = Base
    assert abs(model.num_params() - 93.16e6) / 93.16e6 < 0.01, model.num_params()
    hf = {}
    for name, p in model.named_parameters():
        for pattern, repl in HF_KEY_MAP:
            name = re.sub(pattern, repl, name)
        hf[name] = tuple(p.shape)
    expected = {'masked_spec_embed': (768,), 'feature_projection.layer_norm.weight': (512,), 'feature_projection.layer_norm.bias': (512,),
                'feature_projection.projection.weight': (768, 512), 'feature_projection.projection.bias': (768,),
                'encoder.layer_norm.weight': (768,), 'encoder.layer_norm.bias': (768,)}
    for i, k in enumerate((10, 3, 3, 3, 3, 2, 2)):                   # reference.md §3.1: no conv bias, LN after every conv
        expected[f'feature_extractor.conv_layers.{i}.conv.weight'] = (512, 1 if i == 0 else 512, k)
        expected.update({f'feature_extractor.conv_layers.{i}.layer_norm.{w}': (512,) for w in ('weight', 'bias')})
    for i in range(5):
        expected.update({f'encoder.pos_conv_embed.layers.{i}.conv.weight': (768, 48, 19), f'encoder.pos_conv_embed.layers.{i}.conv.bias': (768,)})
    for i in range(12):
        L = f'encoder.layers.{i}.'
        for proj in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
            expected.update({L + f'attention.{proj}.weight': (768, 768), L + f'attention.{proj}.bias': (768,)})
        expected.update({L + 'feed_forward.intermediate_dense.weight': (3072, 768), L + 'feed_forward.intermediate_dense.bias': (3072,),
                         L + 'feed_forward.output_dense.weight': (768, 3072), L + 'feed_forward.output_dense.bias': (768,)})
        for norm in ('layer_norm', 'final_layer_norm'):
            expected.update({L + f'{norm}.weight': (768,), L + f'{norm}.bias': (768,)})
    hf.pop('regression_head.weight'), hf.pop('regression_head.bias')  # fairseq final_proj: not in HF checkpoints
    assert hf == expected


# ------------------------------------------------------------------------------------------- vision (BEiT / data2vec vision v1)
VISION = ModelConfig(modality='vision', dim=32, layers=3, heads=4, ffn_dim=64, image_size=32, patch_size=8, dropout=0.0,
                     attn_dropout=0.0, layerdrop=0.0, drop_path=0.0, layer_scale=0.1)


def test_relative_position_index_is_symmetric_and_translation_invariant():
    from encoders import RelativePositionBias
    h = w = 14
    rpb = RelativePositionBias((h, w), heads=12)
    idx = rpb.index
    assert idx.shape == (197, 197) and rpb.table.shape == (27 * 27 + 3, 12)  # (2·14 − 1)² + 3 = 732 rows
    patch = idx[1:, 1:]
    center = (27 * 27) // 2                                             # the row of offset (0, 0)
    assert (patch.diagonal() == center).all()
    assert (patch + patch.T == 2 * center).all()                        # offset (dy, dx) and (−dy, −dx) mirror the centre
    ys, xs = torch.arange(196) // w, torch.arange(196) % w
    offsets = torch.stack([ys[:, None] - ys[None], xs[:, None] - xs[None]], -1).view(-1, 2).tolist()
    by_offset = {}
    for off, i in zip(offsets, patch.flatten().tolist()):
        by_offset.setdefault(tuple(off), set()).add(i)
    assert all(len(v) == 1 for v in by_offset.values())                 # one row per offset, wherever the pair sits
    assert len(by_offset) == len(set(patch.flatten().tolist())) == 729   # and distinct offsets get distinct rows
    assert set(idx[0, 1:].tolist()) == {729} and set(idx[1:, 0].tolist()) == {730} and idx[0, 0] == 731
    # BEiT's layout, so released tables load: row (dy + 13)·27 + (dx + 13) for query patch i, key patch j, dy = y_i − y_j
    assert idx[1, 16] == 12 * 27 + 12 and idx[16, 1] == 14 * 27 + 14 and idx[1, 2] == 13 * 27 + 12   # patches 0, 15, 1
    torch.nn.init.normal_(rpb.table)
    bias = rpb()
    assert bias.shape == (12, 197, 197) and torch.equal(bias[3, 5, 9], rpb.table[idx[5, 9], 3])


def test_pre_ln_block_layer_scale_and_taps():
    from model import PreLNBlock
    torch.manual_seed(0)
    block = PreLNBlock(32, 4, 64, layer_scale=0.1).eval()
    torch.nn.init.normal_(block.gamma_1)
    torch.nn.init.normal_(block.gamma_2)
    x, bias = torch.randn(2, 5, 32), torch.randn(4, 5, 5)
    out, a = block(x, bias, 'attention')
    assert torch.equal(block(x, bias, 'ffn_residual')[1], out) and torch.equal(block(x, bias, 'block')[1], out)
    _, f = block(x, bias, 'ffn')
    # independent recomputation: softmax attention with the bias, LayerScale, pre-LN FFN, two residuals
    n1 = F.layer_norm(x, (32,), block.norm1.weight, block.norm1.bias, eps=1e-6)
    q, k, v = (p(n1).view(2, 5, 4, 8).transpose(1, 2) for p in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj))
    att = ((q @ k.transpose(-1, -2)) / math.sqrt(8) + bias).softmax(-1) @ v
    a_ref = block.gamma_1 * block.self_attn.out_proj(att.transpose(1, 2).reshape(2, 5, 32))
    h = x + a_ref
    f_ref = block.gamma_2 * block.fc2(F.gelu(block.fc1(F.layer_norm(h, (32,), block.norm2.weight, block.norm2.bias, eps=1e-6))))
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(out, x + a_ref + f_ref)
    assert block.self_attn.k_proj.bias is None and block.self_attn.q_proj.bias is not None   # BEiT: no key bias
    fresh = PreLNBlock(32, 4, 64, layer_scale=1e-4).eval()            # γ = 1e-4 at init: every block starts near the identity
    assert (fresh(x, bias)[0] - x).abs().max() < 1e-3


def test_vision_student_ignores_masked_pixels_and_the_teacher_sees_them():
    torch.manual_seed(0)
    model = Data2Vec(VISION).eval()
    image = torch.rand(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 5] = True                                                   # patch 5 = row 1, column 1 of the 4 × 4 grid
    changed = image.clone()
    changed[:, :, 8:16, 8:16] = torch.rand(2, 3, 8, 8)                  # new pixels inside that patch only
    pred, teacher_input, padding, _ = model(image, None, mask)
    assert pred.shape == (2, 16, 32) and padding is None and torch.equal(teacher_input['source'], image)
    torch.testing.assert_close(model(changed, None, mask)[0], pred)     # the student sees the mask token there
    taps, taps2 = Teacher(model)(dict(source=image), tap='block'), Teacher(model)(dict(source=changed), tap='block')
    assert len(taps) == 3 and taps[0].shape == (2, 16, 32)              # one per block, CLS dropped
    assert not torch.allclose(taps[-1], taps2[-1])                      # the teacher's view is unmasked


def test_vision_loss_is_beit_smooth_l1_mean_over_masked_tokens():
    torch.manual_seed(0)
    pred, y = torch.randn(2, 16, 32) * 3, torch.randn(2, 16, 32)
    mask = torch.rand(2, 16) < 0.6
    loss = regression_loss(pred, y, mask, beta=2.0, scale=1 / 32)
    torch.testing.assert_close(loss, F.smooth_l1_loss(pred[mask], y[mask], beta=2.0))   # BEiT: mean over tokens × channels
    other = pred.clone()
    other[~mask] = 100.0
    torch.testing.assert_close(regression_loss(other, y, mask, beta=2.0, scale=1 / 32), loss)


HF_VISION_KEY_MAP = [                                                   # ours → HF Data2VecVisionModel (reference.md §3.3)
    (r'^front_end\.(cls_token|mask_token)$', r'embeddings.\1'),
    (r'^front_end\.patch_embed\.proj\.', 'embeddings.patch_embeddings.projection.'),
    (r'^front_end\.rel_pos_bias\.table$', 'encoder.relative_position_bias.relative_position_bias_table'),
    (r'^encoder\.layers\.', 'encoder.layer.'),
    (r'\.self_attn\.q_proj\.', '.attention.attention.query.'), (r'\.self_attn\.k_proj\.', '.attention.attention.key.'),
    (r'\.self_attn\.v_proj\.', '.attention.attention.value.'), (r'\.self_attn\.out_proj\.', '.attention.output.dense.'),
    (r'\.norm1\.', '.layernorm_before.'), (r'\.norm2\.', '.layernorm_after.'),
    (r'\.fc1\.', '.intermediate.dense.'), (r'\.fc2\.', '.output.dense.'), (r'\.gamma_(\d)$', r'.lambda_\1'),
    (r'^encoder\.norm\.', 'layernorm.'),
]


def test_vision_base_matches_hf_data2vec_vision_base_in_size_and_key_names():
    cfg = ModelConfig(modality='vision', dropout=0.0, attn_dropout=0.05, layerdrop=0.0, drop_path=0.2)
    with torch.device('meta'):
        model = Data2Vec(cfg)
    hf = {}
    for name, p in model.named_parameters():
        for pattern, repl in HF_VISION_KEY_MAP:
            name = re.sub(pattern, repl, name)
        hf[name] = tuple(p.shape)
    expected = {'embeddings.cls_token': (1, 1, 768), 'embeddings.mask_token': (1, 1, 768),
                'embeddings.patch_embeddings.projection.weight': (768, 3, 16, 16), 'embeddings.patch_embeddings.projection.bias': (768,),
                'encoder.relative_position_bias.relative_position_bias_table': (732, 12),
                'layernorm.weight': (768,), 'layernorm.bias': (768,)}
    for i in range(12):
        L = f'encoder.layer.{i}.'
        for proj in ('attention.attention.query', 'attention.attention.value', 'attention.output.dense'):
            expected.update({L + proj + '.weight': (768, 768), L + proj + '.bias': (768,)})
        expected[L + 'attention.attention.key.weight'] = (768, 768)  # no key bias
        expected.update({L + 'intermediate.dense.weight': (3072, 768), L + 'intermediate.dense.bias': (3072,),
                         L + 'output.dense.weight': (768, 3072), L + 'output.dense.bias': (768,),
                         L + 'lambda_1': (768,), L + 'lambda_2': (768,)})
        for norm in ('layernorm_before', 'layernorm_after'):
            expected.update({L + f'{norm}.weight': (768,), L + f'{norm}.bias': (768,)})
    hf.pop('regression_head.weight'), hf.pop('regression_head.bias')   # BEiT lm_head: not converted to HF
    assert hf == expected
    hf_base = sum(math.prod(s) for s in expected.values())             # 85,666,128 for HF Data2VecVision-base, shared bias
    assert model.num_params() == hf_base and abs(hf_base - 85.67e6) / 85.67e6 < 0.001


def test_vision_init_and_stochastic_depth_follow_beit():
    torch.manual_seed(0)
    cfg = ModelConfig(modality='vision', dim=256, layers=4, heads=4, ffn_dim=1024, image_size=32, patch_size=8, drop_path=0.3,
                      layer_scale=0.5)
    model = Data2Vec(cfg)
    vit = model.encoder
    w = vit.layers[0].fc1.weight
    assert w.abs().max() <= 0.02 and 0.0103 < w.std() < 0.0113       # N(0, 0.02²) cut at ±0.02: std 0.02 · 0.5396
    patch = model.front_end.patch_embed.proj
    assert 0.0103 < patch.weight.std() < 0.0113 and not patch.bias.any()
    assert 0.0103 / 2 < vit.layers[1].fc2.weight.std() < 0.0113 / 2  # fix_init_weight: block 2 divided by √(2·2)
    assert [b.drop_path for b in vit.layers] == pytest.approx([0.0, 0.1, 0.2, 0.3])   # linear from 0
    image = torch.rand(4, 3, 32, 32)
    # eval (the teacher) is deterministic: it equals, in train mode, a copy with stochastic depth and dropouts at 0
    still = Data2Vec(ModelConfig(**{**vars(cfg), 'drop_path': 0.0, 'dropout': 0.0, 'attn_dropout': 0.0}))
    still.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.eval().encode(image)[0], still.train().encode(image)[0])
    model.train()
    assert not torch.allclose(model.encode(image)[0], still.encode(image)[0])   # the student drops paths


def test_drop_path_drops_whole_samples_and_rescales_the_rest():
    """Stochastic depth (Huang et al.; timm DropPath): each sample's branch is all zero with probability p, else all
    scaled by 1/(1 − p), so its expectation is unchanged; the identity in eval mode."""
    from model import drop_path
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 5)
    y = drop_path(x, 0.25, training=True)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()   # whole samples, nothing in between
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03 and abs(y.mean().item() - 1) < 0.05
    assert torch.equal(drop_path(x, 0.25, training=False), x)


def test_text_embedding_positions_start_after_pad_and_roberta_base_size():
    from encoders import TextEmbedding
    torch.manual_seed(0)
    emb = TextEmbedding(vocab_size=100, dim=8, max_tokens=6, pad=1)
    assert emb.positions.weight.shape == (6 + 2, 8)                   # RoBERTa: 512 tokens → 514 rows
    tokens = torch.tensor([[0, 7, 9, 2, 1, 1], [0, 5, 6, 7, 8, 2]])   # <s> … </s> <pad> <pad>
    x = emb(tokens)
    by_hand = F.layer_norm(emb.tokens.weight[tokens] + emb.positions.weight[torch.tensor([[2, 3, 4, 5, 1, 1], [2, 3, 4, 5, 6, 7]])],
                           (8,), emb.layer_norm.weight, emb.layer_norm.bias)
    torch.testing.assert_close(x, by_hand)
    with torch.device('meta'):
        base = TextEmbedding(50_265, 768, 512)
    hf = 50_265 * 768 + 514 * 768 + 1 * 768 + 2 * 768                # HF Data2VecText embeddings (+ one token-type row)
    assert abs(sum(p.numel() for p in base.parameters()) - hf) / hf < 0.001


def test_text_base_matches_hf_data2vec_text_base_in_size():
    with torch.device('meta'):
        model = Data2Vec(ModelConfig(modality='text', vocab_size=50_265, layerdrop=0.0))
    layer = 4 * (768 * 768 + 768) + (768 * 3072 + 3072) + (3072 * 768 + 768) + 2 * 2 * 768   # attention, FFN, 2 LayerNorms
    hf = (50_265 + 514 + 1) * 768 + 2 * 768 + 12 * layer + (768 * 768 + 768)              # + token type row, + pooler
    assert abs(model.num_params() - hf) / hf < 0.01, (model.num_params(), hf)            # 124,054,272 vs 124,645,632
    head = model.num_params(head=True) - model.num_params()
    assert head == (768 * 1536 + 1536) + (1536 * 768 + 768)                             # Linear(D, 2D) → GELU → Linear(2D, D)
    torch.manual_seed(0)
    small = Data2Vec(ModelConfig(modality='text', vocab_size=3000, dim=256, layers=1, heads=4, ffn_dim=512))
    embed = small.front_end.embed
    for w in (embed.tokens.weight, embed.positions.weight, small.regression_head[0].weight):
        assert abs(w[2:].std().item() - 0.02) < 0.001                  # fairseq init_bert_params, embeddings and head too
    assert not embed.tokens.weight[1].any() and not embed.positions.weight[1].any()   # the <pad> rows
    assert not small.regression_head[2].bias.any()


def test_text_loss_counts_only_mask_positions():
    from masking import token_mask
    tokens = torch.randint(5, 1000, (8, 64))
    source, mask = token_mask(tokens, 4, (5, 1000), 0.3, 1, 0.2, 0.2, generator=torch.Generator().manual_seed(0))
    pred, y = torch.randn(8, 64, 16), torch.randn(8, 64, 16)
    loss = regression_loss(pred, y, mask, beta=4.0, scale=1.0)
    other = pred.clone()
    other[~mask] += 10.0                                               # randomised, kept and unchosen tokens: no loss there
    torch.testing.assert_close(regression_loss(other, y, mask, beta=4.0, scale=1.0), loss)
    assert ((source != tokens) & ~mask).any() and (source[mask] == 4).all()


def test_feature_grad_mult_scales_the_conv_gradient_only():
    """--feature-grad-mult k (wav2vec 2.0 GradMultiply): the same forward, the conv layers' gradient × k, every other
    gradient unchanged. Two encoders with the same weights, k = 1 and k = 0.1, compared parameter by parameter."""
    torch.manual_seed(0)
    one, tenth = SpeechFeatureEncoder(8, 16, grad_mult=1.0), SpeechFeatureEncoder(8, 16, grad_mult=0.1)
    tenth.load_state_dict(one.state_dict())
    wav = torch.randn(2, 3200)
    outs = [enc(wav)[0] for enc in (one, tenth)]
    assert torch.equal(outs[0], outs[1])                               # identity forward, bit for bit
    for out in outs:
        out.square().sum().backward()
    for (name, p1), (_, p2) in zip(one.named_parameters(), tenth.named_parameters()):
        k = 0.1 if name.startswith('conv_layers.') else 1.0
        torch.testing.assert_close(p2.grad, k * p1.grad, rtol=1e-4, atol=1e-6 * p1.grad.abs().max().item(), msg=name)

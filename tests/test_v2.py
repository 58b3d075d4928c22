"""data2vec 2.0's parts (issue 17, in progress): ALiBi, visible-step order, the conv decoder.   pytest tests/test_v2.py"""
import pytest
import torch
import torch.nn.functional as F

from encoders import ALiBi, alibi_slopes
from masking import block_mask_1d
from model import ConvDecoder, visible_order


def test_alibi_slopes_are_the_papers_geometric_sequences():
    assert alibi_slopes(8) == pytest.approx([2 ** -i for i in range(1, 9)])          # ALiBi paper: 1/2, 1/4, …, 1/256
    assert alibi_slopes(16) == pytest.approx([2 ** (-i / 2) for i in range(1, 17)])
    # 12 heads: the 8 of H = 8, then H = 16's 1st, 3rd, 5th, 7th: 2^−0.5, 2^−1.5, 2^−2.5, 2^−3.5
    assert alibi_slopes(12) == pytest.approx([2 ** -i for i in range(1, 9)] + [2 ** -(i + 0.5) for i in range(4)])


def test_alibi_bias_is_minus_scaled_slope_times_distance():
    alibi = ALiBi(4)
    with torch.no_grad():
        alibi.scale.copy_(torch.tensor([1.0, 0.5, -2.0, 3.0]))                     # a negative scale counts as 0
    bias = alibi(5)
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

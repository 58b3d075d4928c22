"""Speech span masking against the paper's numbers.   pytest tests/test_masking.py"""
import torch

from masking import span_mask


def test_mask_ratio_is_049_with_equal_counts_per_row():
    g = torch.Generator().manual_seed(0)
    T = 1000
    fractions = []
    for _ in range(10):                                              # 10 draws × 64 rows
        mask = span_mask(torch.full((64,), T), T, mask_prob=0.65, span=10, generator=g)
        assert mask.dtype == torch.bool and mask.shape == (64, T)
        counts = mask.sum(1)
        assert (counts == counts[0]).all()
        fractions.append(mask.float().mean().item())
    mean = sum(fractions) / len(fractions)
    assert abs(mean - 0.49) <= 0.02, mean                            # paper: 'approximately 49%'


def test_padding_is_never_masked_and_counts_match():
    g = torch.Generator().manual_seed(1)
    T = 300
    for _ in range(20):
        lengths = torch.randint(40, T + 1, (16,), generator=g)
        mask = span_mask(lengths, T, 0.65, 10, generator=g)
        padded = torch.arange(T) >= lengths[:, None]
        assert not (mask & padded).any()
        assert len(set(mask.sum(1).tolist())) == 1
        assert mask.sum(1).min() > 0


def test_start_probability_is_mask_prob_over_span():
    """With spans of 1 nothing overlaps, so the masked fraction is the start probability p = mask_prob / span itself."""
    g = torch.Generator().manual_seed(2)
    mask = span_mask(torch.full((200,), 1000), 1000, mask_prob=0.065, span=1, generator=g)
    assert abs(mask.float().mean().item() - 0.065) < 0.005
    # and a span of 10 at the same start probability masks 1 − (1 − 0.065)^10 of the steps, less the trimming to equal counts
    mask10 = span_mask(torch.full((200,), 1000), 1000, mask_prob=0.65, span=10, generator=g)
    assert 0.47 < mask10.float().mean().item() < 1 - (1 - 0.065) ** 10 + 0.01


def test_rows_of_different_lengths_meet_at_the_mean_fraction_of_the_shortest():
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([250, 200, 150, 125])
    fractions = []
    for _ in range(200):
        mask = span_mask(lengths, 250, 0.65, 10, generator=g)
        counts = mask.sum(1)
        assert (counts == counts[0]).all() and not (mask & (torch.arange(250) >= lengths[:, None])).any()
        fractions.append(counts[0].item() / 125)
    assert abs(sum(fractions) / len(fractions) - 0.49) < 0.02       # the shortest row is masked as the paper says

"""Speech span masking and vision block masking against the papers' numbers.   pytest tests/test_masking.py"""
import pytest
import torch

import random

from masking import block_mask, block_mask_1d, exact_count, span_mask, token_mask


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


def components(mask):
    """Sizes of the 4-connected regions of a 2-D bool array (a flood fill written here, independent of masking.py)."""
    mask, seen, sizes = mask.tolist(), set(), []
    h, w = len(mask), len(mask[0])
    for start in ((i, j) for i in range(h) for j in range(w) if mask[i][j]):
        if start in seen:
            continue
        stack, size = [start], 0
        seen.add(start)
        while stack:
            i, j = stack.pop()
            size += 1
            for n in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if 0 <= n[0] < h and 0 <= n[1] < w and mask[n[0]][n[1]] and n not in seen:
                    seen.add(n)
                    stack.append(n)
        sizes.append(size)
    return sizes


@pytest.mark.parametrize('grid, count, min_block', [((14, 14), 120, 16), ((8, 8), 39, 5), ((7, 7), 30, 4)])
def test_block_mask_has_the_exact_count_and_blocks_of_at_least_min_block(grid, count, min_block):
    """ViT-B/16 (120 of 196, blocks ≥ 16), the tiny preset's 8 × 8 grid and MNIST's 7 × 7 (28² in 4² patches)."""
    g = torch.Generator().manual_seed(0)
    masks = block_mask(300, grid, count, min_block, generator=g)
    assert masks.dtype == torch.bool and masks.shape == (300, grid[0] * grid[1])
    assert (masks.sum(1) == count).all()                              # static shapes: the same count in every row
    for m in masks:
        assert min(components(m.view(grid))) >= min_block
    assert len({tuple(m.tolist()) for m in masks}) > 250              # images get their own masks
    assert masks.float().mean(0).min() > 0.05                         # every position gets masked at times (corners least)


def test_block_mask_is_reproducible_with_a_generator():
    a = block_mask(4, (14, 14), 120, generator=torch.Generator().manual_seed(1))
    b = block_mask(4, (14, 14), 120, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match='cannot mask 200 of 196'):
        block_mask(1, (14, 14), 200)


def test_bert_masking_chooses_15_percent_split_80_10_10_and_never_specials():
    tokens = torch.randint(5, 50_000, (400, 128), generator=torch.Generator().manual_seed(0))   # ids 0–4: specials
    tokens[:, 0], tokens[:, -1], tokens[:40, 100:-1] = 0, 2, 1       # <s> … </s>, and padding in some rows
    ordinary, mask_id = tokens >= 5, 4
    # Unchanged tokens cannot be seen in the output, so draw twice with the same seed: once with everything
    # chosen becoming <mask> (this shows the chosen set), once with the 80/10/10 split of the same choice.
    _, chosen = token_mask(tokens, mask_id, (5, 50_000), 0.15, 1, 0.0, 0.0, generator=torch.Generator().manual_seed(1))
    source, mask = token_mask(tokens, mask_id, (5, 50_000), 0.15, 1, 0.1, 0.1, generator=torch.Generator().manual_seed(1))
    assert not chosen[~ordinary].any() and (source[~ordinary] == tokens[~ordinary]).all()   # specials and pad untouched
    assert abs(chosen.sum() / ordinary.sum() - 0.15) < 0.01
    randomised = chosen & ~mask & (source != tokens)
    kept = chosen & ~mask & (source == tokens)
    assert (mask <= chosen).all() and (source[mask] == mask_id).all() and not (source != tokens)[~chosen].any()
    n = chosen.sum()
    assert abs(mask.sum() / n - 0.8) < 0.02 and abs(randomised.sum() / n - 0.1) < 0.02 and abs(kept.sum() / n - 0.1) < 0.02
    assert ((source[randomised] >= 5) & (source[randomised] < 50_000)).all()


def test_text_span_masking_covers_31_percent():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 1000, (200, 512), generator=g)
    tokens[:, 0], tokens[:, -1] = 0, 2
    source, mask = token_mask(tokens, 4, (5, 1000), 0.35, 4, 0.0, 0.0, generator=g)
    expected = 1 - (1 - 0.35 / 4) ** 4                              # 0.306: starts with p = 0.0875, 4 tokens each
    assert abs(mask.float().mean().item() - expected) < 0.02
    assert torch.equal(source != tokens, mask) and not mask[:, [0, -1]].any()


# ---- data2vec 2.0: block masks in 1-D (speech) with exact counts

def simulate_block_mask_1d(L, p, span, adjust, rng):
    """fairseq compute_block_mask_1d for one row, written as loops with Python's random (independent of masking.py)."""
    row = [0] * L
    for _ in range(int(L * (p + adjust) / span)):
        c = rng.randrange(L)                                           # centres with replacement
        for i in range(span):
            row[min(max(c + i - span // 2, 0), L - 1)] = 1
    target, masked = int(L * p), [i for i in range(L) if row[i]]
    if len(masked) > target:                                           # unmask a uniform subset
        for i in rng.sample(masked, len(masked) - target):
            row[i] = 0
    elif len(masked) < target:                                         # mask a uniform subset of the rest
        for i in rng.sample([i for i in range(L) if not row[i]], target - len(masked)):
            row[i] = 1
    return row


def runs(row):
    """Lengths of the masked runs of a 0/1 row."""
    out, n = [], 0
    for v in list(row) + [0]:
        if v:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


@pytest.mark.parametrize('L', [49, 100, 391])
def test_block_mask_1d_exact_count_per_row_and_clone(L):
    g = torch.Generator().manual_seed(L)
    mask = block_mask_1d(8 * 16, L, 0.5, 5, 0.05, generator=g)           # 16 samples × M = 8 clones
    assert mask.dtype == torch.bool and mask.shape == (128, L)
    assert (mask.sum(1) == int(L * 0.5)).all()
    assert len({tuple(r.tolist()) for r in mask}) == 128                # every clone its own mask


def test_block_mask_1d_matches_an_independent_simulation():
    """Run lengths and per-step frequencies (fewer at the borders) over 2000 rows, against the loop version above."""
    L, n, rng = 60, 2000, random.Random(0)
    ours = block_mask_1d(n, L, 0.5, 5, 0.05, generator=torch.Generator().manual_seed(0)).int().tolist()
    sim = [simulate_block_mask_1d(L, 0.5, 5, 0.05, rng) for _ in range(n)]
    for stat in (lambda rows: sum(len(runs(r)) for r in rows) / n,                     # masked runs per row (~9)
                 lambda rows: sum(sum(x >= 5 for x in runs(r)) for r in rows) / n):   # runs of ≥ 5 steps
        a, b = stat(ours), stat(sim)
        assert abs(a - b) < 0.05 * b, (a, b)
    freq_ours = torch.tensor(ours, dtype=torch.float).mean(0)
    freq_sim = torch.tensor(sim, dtype=torch.float).mean(0)
    assert (freq_ours - freq_sim).abs().max() < 0.05                    # binomial sd ≈ 0.011 per step
    assert freq_sim[0] < freq_sim[L // 2] - 0.05 and freq_ours[0] < freq_ours[L // 2] - 0.05   # 3 centres reach step 0, 5 inside


def test_exact_count_trims_or_fills_uniformly():
    g = torch.Generator().manual_seed(0)
    few = torch.zeros(4000, 10, dtype=torch.bool)
    few[:, :2] = True                                                  # 2 masked → 5: 3 of the 8 others, uniformly
    out = exact_count(few, 5, g)
    assert (out.sum(1) == 5).all() and out[:, :2].all()
    assert (out[:, 2:].float().mean(0) - 3 / 8).abs().max() < 0.04
    many = torch.ones(4000, 10, dtype=torch.bool)
    many[:, 8:] = False                                                # 8 masked → 5: keep 5 of those 8, uniformly
    out = exact_count(many, 5, g)
    assert (out.sum(1) == 5).all() and not out[:, 8:].any()
    assert (out[:, :8].float().mean(0) - 5 / 8).abs().max() < 0.04

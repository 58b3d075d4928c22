"""Masking (paper, 'Masking'): which time steps the student must predict.

Convention, used everywhere: `mask` is a torch.bool tensor of shape (B, T); True = masked, i.e. the
student sees the mask embedding there and the loss is taken there. Padded steps are never masked.

Speech uses wav2vec 2.0 span masking with the semantics of fairseq `compute_mask_indices`
(mask_selection static, no_mask_overlap False, require_same_masks True, min_masks 1).
Vision uses BEiT's block-wise masking on the patch grid (data2vec vision v1: 120 of 196 patches).
Both give every row of a batch the same masked count, so shapes stay static for torch.compile.
Text uses BERT masking or its wav2vec-style span variant (fairseq MaskTokensDataset), on token ids.
data2vec 2.0 (--version 2): speech uses block_mask_1d, images inverse_block_mask, text random_mask, exact counts per row
and per clone (exact_count).

    python masking.py        # saves masks.png (span masks, BEiT's block masks, data2vec 2.0's inverse block masks)
"""
import math

import numpy as np
import torch


def span_mask(lengths, T, mask_prob=0.65, span=10, min_spans=1, generator=None):
    """Span masks for a batch: (B, T) bool, every row with the same number of masked steps.

    Parameter conversion (written once): fairseq's `mask_prob` is the fraction of steps that would be
    masked if spans never overlapped, so the probability of a step being a span *start* is
        p = mask_prob / span        (0.65 / 10 = 0.065, the paper's 'p = 0.065 ... mask the subsequent ten').
    Spans may overlap, so the masked fraction is about 1 − (1 − p)^span ≈ 0.49.

    Row b, with n = lengths[b] valid steps, gets int(p·n + u) starts, u ~ U[0, 1), drawn without
    replacement from [0, n − span), so spans end inside the valid steps. Rows then meet at one count
    c = round(mean masked fraction of the batch × shortest length): rows above c keep a random subset of
    their masked steps (fairseq require_same_masks), rows below c mask random extra steps (fairseq add_masks).
    fairseq v1 meets at the smallest count instead, which masks ≈ 45% at 16 rows (DEVIATIONS.md 1).
    lengths: (B,) ints; T: padded length.
    """
    lengths = [int(v) for v in lengths]
    if min(lengths) < 1:
        raise ValueError('span_mask: every row needs at least one valid step')
    rows = []
    for n in lengths:
        candidates = max(n - span, 1)
        num = int(mask_prob * n / span + torch.rand((), generator=generator).item())   # ≈ p·n, rounded at random
        num = min(max(num, min_spans), candidates)
        starts = torch.randperm(candidates, generator=generator)[:num]               # without replacement
        idx = (starts[:, None] + torch.arange(span)).flatten()                      # (num · span,)
        rows.append(idx[idx < n].unique())
    fraction = sum(len(r) / n for r, n in zip(rows, lengths)) / len(rows)
    count = max(1, round(fraction * min(lengths)))
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (idx, n) in enumerate(zip(rows, lengths)):
        if len(idx) < count:                                                        # add masked steps outside the spans
            free = torch.ones(n, dtype=torch.bool)
            free[idx] = False
            extra = free.nonzero()[:, 0]
            idx = torch.cat([idx, extra[torch.randperm(len(extra), generator=generator)[:count - len(idx)]]])
        mask[b, idx[torch.randperm(len(idx), generator=generator)[:count]]] = True
    return mask


def block_mask(batch, grid, count, min_block=16, min_aspect=0.3, attempts=10, generator=None):
    """BEiT block-wise masks (BEiT masking_generator.py): (B, h·w) bool, exactly `count` patches per row.

    For each image, while r = count − (patches masked so far) > 0, place a block:
        area s ~ U(min_block, r),  aspect a = exp(U(log min_aspect, −log min_aspect)),
        block h_b × w_b = round(√(s·a)) × round(√(s/a)) at a uniformly random position (h_b < h, w_b < w),
        kept if it masks between 1 and r new patches; up to `attempts` tries per block.
    Blocks may overlap earlier ones, which is how the last few patches get masked. Two changes to BEiT,
    so every row has exactly `count` (BEiT stops short when no block fits) and every masked region has at
    least `min_block` patches (BEiT's rounding can make a block of 14): blocks smaller than `min_block` are
    redrawn, and when no block fits the few patches left, the mask grows by single patches that touch it.
    data2vec vision: 120 of 196 (0.61), min_block 16, min_aspect 0.3. grid: (h, w) patches.
    """
    h, w = grid
    if not 0 < count <= h * w:
        raise ValueError(f'block_mask: cannot mask {count} of {h * w} patches')
    seed = int(torch.randint(2 ** 62, (), generator=generator))             # numpy for speed: this runs per image
    rng = np.random.default_rng(seed)
    log_aspect = math.log(min_aspect), -math.log(min_aspect)
    masks = np.zeros((batch, h, w), dtype=bool)
    for m in masks:
        while (left := count - int(m.sum())) > 0:
            for _ in range(attempts):
                area = min_block + (left - min_block) * rng.random()          # Python's random.uniform, as BEiT: works for left < min_block
                aspect = math.exp(rng.uniform(*log_aspect))
                bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if bh * bw < min_block or bh >= h or bw >= w:
                    continue
                top, lft = rng.integers(h - bh + 1), rng.integers(w - bw + 1)
                new = bh * bw - int(m[top:top + bh, lft:lft + bw].sum())
                if 0 < new <= left:
                    m[top:top + bh, lft:lft + bw] = True
                    break
            else:                                                             # no block fits: grow by one touching patch
                touching = np.zeros_like(m)
                touching[1:] |= m[:-1]
                touching[:-1] |= m[1:]
                touching[:, 1:] |= m[:, :-1]
                touching[:, :-1] |= m[:, 1:]
                free = np.flatnonzero((touching if m.any() else np.ones_like(m)) & ~m)
                m.flat[rng.choice(free)] = True
    return torch.from_numpy(masks.reshape(batch, h * w))


def exact_count(mask, count, generator=None):
    """data2vec 2.0's require_same_masks: every row of `mask` (R, L) bool gets exactly `count` masked steps.

    A row with more masked steps unmasks a uniformly random subset of them; a row with fewer masks a uniformly random
    subset of its unmasked steps (fairseq draws both with torch.multinomial on 0/1 weights, i.e. uniformly). Here as
    one sort: masked steps first, each group in random order, and the first `count` are masked.
    """
    noise = torch.rand(mask.shape, generator=generator)               # (R, L) in [0, 1)
    order = (noise - mask.float()).argsort(1)                          # masked keys in [−1, 0), unmasked in [0, 1)
    return torch.zeros_like(mask).scatter_(1, order[:, :count], True)   # (R, L)


def block_mask_1d(rows, L, mask_prob=0.5, span=5, adjust=0.05, generator=None):
    """data2vec 2.0 speech masks (fairseq compute_block_mask_1d, not inverse): (rows, L) bool.

        centres  n_c = int(L·(p + A)/B) per row, uniform on [0, L), drawn with replacement
        spans    each centre c masks [c − ⌊B/2⌋, c − ⌊B/2⌋ + B), clamped to [0, L − 1]
        count    then exactly int(L·p) masked steps per row (exact_count)

    p = mask_prob (0.5), B = span (5), A = adjust (0.05): the adjust makes up for overlapping spans, so that the
    count fix mostly trims. Every row and every clone gets the same count, so the visible steps gather into a
    static (rows, L − int(L·p)) shape. One row per clone: rows = batch × M.
    """
    centres = torch.randint(0, L, (rows, int(L * (mask_prob + adjust) / span)), generator=generator)   # (R, n_c)
    steps = (centres[:, :, None] + torch.arange(span) - span // 2).clamp(0, L - 1).flatten(1)       # (R, n_c·B)
    mask = torch.zeros(rows, L, dtype=torch.bool).scatter_(1, steps, True)                           # (R, L)
    return exact_count(mask, int(L * mask_prob), generator)


def inverse_block_mask(rows, side, mask_prob=0.8, block=3, adjust=0.07, generator=None):
    """data2vec 2.0 image masks (fairseq compute_block_mask_2d, inverse_mask): (rows, side²) bool, True = masked.

        keep     q = 1 − R of the L = side² patches (R = mask_prob 0.8: 20% kept)
        centres  n_c = int(L·((q + A)/B²)) per row, uniform over the patches, drawn with replacement
        blocks   centre (y, x) keeps rows y − ⌊B/2⌋ … y − ⌊B/2⌋ + B − 1 × the same columns around x, clamped to the grid
        count    exactly int(L·q) kept patches per row (exact_count), then inverted: masked = not kept

    The choice is of what to KEEP: the student sees a few B × B islands (base: 5 centres, 39 of 196 patches kept),
    and must predict everything around them. R = mask_prob, A = adjust (more centres, for overlaps), B = block.
    """
    L, keep = side * side, 1 - mask_prob                                   # fairseq: mask_prob ← 1 − mask_prob
    centres = torch.randint(0, L, (rows, int(L * ((keep + adjust) / block ** 2))), generator=generator)   # (R, n_c)
    offsets = torch.arange(block) - block // 2                             # −1, 0, 1 for B = 3
    y = (centres[..., None, None] // side + offsets[:, None]).clamp(0, side - 1)   # (R, n_c, B, 1)
    x = (centres[..., None, None] % side + offsets).clamp(0, side - 1)             # (R, n_c, 1, B)
    kept = torch.zeros(rows, L, dtype=torch.bool).scatter_(1, (y * side + x).flatten(1), True)   # (R, L)
    return ~exact_count(kept, int(L * keep), generator)


def random_mask(candidates, count, generator=None):
    """data2vec 2.0 text masks (fairseq random_masking, MAE's): (R, T) bool, exactly `count` masked steps per row.

        noise u_t ~ U[0, 1) at each step; the `count` candidate steps of smallest u are masked

    i.e. a uniformly random subset of `count` of the candidate steps, drawn afresh for every row and clone. candidates:
    (R, T) bool, the steps that may be masked (text: ordinary tokens, never <s>, </s>, <pad>: DEVIATIONS.md 49); fairseq
    draws among all T steps. count: config.random_mask_count, T − int(T·(1 − p)), fairseq's. Every row needs ≥ count."""
    if int(candidates.sum(1).min()) < count:
        raise ValueError(f'random_mask: a row has {int(candidates.sum(1).min())} candidate steps, fewer than the {count} to mask')
    noise = torch.rand(candidates.shape, generator=generator) + (~candidates).float()   # (R, T): non-candidates sort last
    return torch.zeros_like(candidates).scatter_(1, noise.argsort(1)[:, :count], True)  # (R, T)


def visible_order(mask):
    """data2vec 2.0: the order that puts the visible steps first. mask (R, T) bool, the same count n in every row →
    ids_keep (R, T − n), the visible steps in time order; ids_restore (R, T), which puts [visible, masked] back in time
    order. Computed with the masks, in the data pipeline on the CPU, so the model needs no count from the device."""
    ids_shuffle = mask.int().argsort(dim=1, stable=True)                        # (R, T): visible steps, then masked
    return ids_shuffle[:, :mask.shape[1] - int(mask[0].sum())], ids_shuffle.argsort(1)


def token_mask(tokens, mask_id, ordinary, prob=0.15, span=1, random_prob=0.1, leave_prob=0.1, generator=None):
    """Text masking (fairseq MaskTokensDataset) → (corrupted tokens (B, T), mask (B, T) bool).

    Each row with n ordinary tokens gets int(prob·n/span + u), u ~ U[0, 1), span starts drawn without
    replacement among its ordinary tokens; a span covers the `span` positions from its start, minus any
    special or padding token (those are never chosen). Of the chosen positions, a fraction random_prob
    becomes a random ordinary token, leave_prob stays unchanged and the rest becomes <mask>.
        BERT (paper):         prob 0.15, span 1, random 0.1, leave 0.1  →  15% chosen: 80/10/10
        span (fairseq config): prob 0.35, span 4, random 0,   leave 0    →  ≈ 1 − (1 − 0.0875)⁴ ≈ 31% masked
    `mask` marks the positions replaced by <mask>, the only ones the loss counts (fairseq data2vec_text,
    issue #4229): randomised and unchanged positions are not predicted. tokens: (B, T) int64;
    ordinary: (lo, hi), the ids of ordinary (non-special) tokens, which also bound the random tokens.
    """
    lo, hi = ordinary
    is_ordinary = (tokens >= lo) & (tokens < hi) & (tokens != mask_id)                      # (B, T)
    chosen = torch.zeros_like(is_ordinary)
    for b in range(len(tokens)):
        where = is_ordinary[b].nonzero()[:, 0]                                             # (n,) ordinary positions
        num = int(prob * len(where) / span + torch.rand((), generator=generator).item())
        starts = where[torch.randperm(len(where), generator=generator)[:num]]
        idx = (starts[:, None] + torch.arange(span)).flatten().clamp(max=tokens.shape[1] - 1)
        chosen[b, idx] = True
    chosen &= is_ordinary
    u = torch.rand(tokens.shape, generator=generator)
    randomised = chosen & (u < random_prob)
    kept = chosen & (u >= random_prob) & (u < random_prob + leave_prob)
    mask = chosen & ~randomised & ~kept
    source = torch.where(mask, mask_id, tokens)
    source = torch.where(randomised, torch.randint(lo, hi, tokens.shape, generator=generator), source)
    return source, mask


if __name__ == '__main__':
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(0)
    big = span_mask(torch.full((1000,), 1000), 1000, 0.65, 10, generator=g)
    print(f'speech span masks, p = 0.065, span 10: masked fraction {big.float().mean():.3f} over 1000 rows of T = 1000 (paper: ≈ 0.49)')
    T = 250                                                  # 5 s of audio at 50 frames per second
    batches = {'equal lengths (embedded corpus, 1 s crops)': torch.full((8,), T),
               'padded, similar lengths (real data, grouped by length)': torch.tensor([250, 246, 240, 238, 233, 230, 226, 221])}
    fig = plt.figure(figsize=(10, 10))
    grid = fig.add_gridspec(4, 6, height_ratios=(1, 1, 1.15, 1.15))
    for row, (title, lengths) in enumerate(batches.items()):
        ax = fig.add_subplot(grid[row, :])
        mask = span_mask(lengths, T, 0.65, 10, generator=g)
        picture = mask.float()                               # 1 = masked, 0 = visible, 0.5 = padding
        picture[torch.arange(T) >= lengths[:, None]] = 0.5
        ax.imshow(picture, aspect='auto', cmap='Greys', vmin=0, vmax=1, interpolation='nearest')
        ax.set(ylabel='utterance', title=f'speech, {title}: {mask.sum(1)[0]} masked frames per row, '
                                         f'{mask.float().sum() / lengths.sum():.0%} of valid frames')
        print(f'{title}: per-row counts {mask.sum(1).tolist()}')
    ax.set_xlabel('frame (20 ms)    black = masked, grey = padding; spans start with p = 0.065 and cover 10 frames')
    big = block_mask(1000, (14, 14), 120, generator=g)
    print(f'vision block masks, 120 of 196, min block 16: masked fraction {big.float().mean():.3f}, '
          f'per-row counts {big.sum(1).unique().tolist()}')
    big = inverse_block_mask(1000, 14, generator=g)
    print(f'data2vec 2.0 inverse block masks, R 0.8, 3 × 3, A 0.07: masked fraction {big.float().mean():.3f}, '
          f'per-row counts {big.sum(1).unique().tolist()}')
    panels = [(2, m) for m in block_mask(6, (14, 14), 120, generator=g)] + [(3, m) for m in inverse_block_mask(6, 14, generator=g)]
    for col, (row, mask) in enumerate(panels):
        ax = fig.add_subplot(grid[row, col % 6])
        ax.imshow(mask.view(14, 14), cmap='Greys', vmin=0, vmax=1)
        ax.set_xticks(torch.arange(-0.5, 14, 1), minor=True)
        ax.set_yticks(torch.arange(-0.5, 14, 1), minor=True)
        ax.grid(which='minor', color='lightgrey', lw=0.5)
        ax.tick_params(which='both', length=0, labelbottom=False, labelleft=False)
        if col % 6 == 0:
            ax.set_ylabel('BEiT (v1)' if row == 2 else 'data2vec 2.0')
    fig.text(0.5, 0.01, 'vision (ViT-B/16, 224², 14 × 14 patches; black = masked): BEiT block masks, 120 of 196 (61%), blocks '
             'of ≥ 16;\ndata2vec 2.0 inverse block masks: 39 of 196 kept (157 masked, 80%) in 3 × 3 islands around 5 centres',
             ha='center')
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig('masks.png', dpi=110)
    print('saved masks.png')

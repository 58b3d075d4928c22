"""Masking (paper, 'Masking'): which time steps the student must predict.

Convention, used everywhere: `mask` is a torch.bool tensor of shape (B, T); True = masked, i.e. the
student sees the mask embedding there and the loss is taken there. Padded steps are never masked.

Speech uses wav2vec 2.0 span masking with the semantics of fairseq `compute_mask_indices`
(mask_selection static, no_mask_overlap False, require_same_masks True, min_masks 1).

    python masking.py        # saves masks.png, a picture of a batch of masks, and prints the masked fraction
"""
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
    fairseq v1 meets at the smallest count instead, which masks ≈ 45% at 16 rows (README, Deviations).
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
    fig, axes = plt.subplots(2, 1, figsize=(10, 5))
    for ax, (title, lengths) in zip(axes, batches.items()):
        mask = span_mask(lengths, T, 0.65, 10, generator=g)
        picture = mask.float()                               # 1 = masked, 0 = visible, 0.5 = padding
        picture[torch.arange(T) >= lengths[:, None]] = 0.5
        ax.imshow(picture, aspect='auto', cmap='Greys', vmin=0, vmax=1, interpolation='nearest')
        ax.set(ylabel='utterance', title=f'{title}: {mask.sum(1)[0]} masked frames per row, '
                                         f'{mask.float().sum() / lengths.sum():.0%} of valid frames')
        print(f'{title}: per-row counts {mask.sum(1).tolist()}')
    axes[1].set_xlabel('frame (20 ms)    black = masked, grey = padding; spans start with p = 0.065 and cover 10 frames')
    fig.tight_layout()
    fig.savefig('masks.png', dpi=110)
    print('saved masks.png')

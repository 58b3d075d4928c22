"""Data for each modality, one module each (data/speech.py, data/vision.py, data/text.py): an embedded synthetic set
(no download), a reader for real files, and the module's own batches. Every module answers the same calls:

    pretraining_data(mcfg, cfg, resume_dir)  → (dataset, collate): train.py's samples and how they become a batch
                                               (crops or augmentation, and masks): a dict of tensors for model.Data2Vec
    bench_data(mcfg, cfg, size, seconds)     → (dataset, collate, tokens per sample) of a fixed shape, for bench.py
    labelled_set(path, cfg, mcfg), embedded(split, mcfg), labelled_collate(items, cfg, mcfg, train)   finetune.py's
    (text also prepare_labelled: sentences → token ids once the tokenizer is known)

Here: `modality(name)`, the module of a modality, and `batches`, the endless, resumable stream of micro-batches that
train.py and finetune.py draw from.
"""
import importlib

import numpy as np
import torch


class DataError(ValueError):
    """Bad input data; the message names the file or the flag."""


def modality(name):
    """The data module of a modality: data.speech, data.vision or data.text."""
    return importlib.import_module(f'data.{name}')


class Repeat(torch.utils.data.Dataset):
    """`length` items (input, label), cycling over a pool of inputs: a benchmark's data of a fixed shape."""

    def __init__(self, inputs, label, length):
        self.inputs, self.label, self.length = inputs, label, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.inputs[i % len(self.inputs)], self.label


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batches of epoch `epoch`. Item j reads the samples of groups[j] and collates them with a generator seeded
    by (seed, epoch, numbers[j]), numbers[j] the micro-batch's number in the epoch over all ranks (default j), so crops,
    masks and augmentations depend neither on --workers, nor on where a run was resumed, nor on the number of ranks.
    A sample that raises DataError (a corrupt or vanished file) is replaced by a repeat of a readable one of the same
    micro-batch, so shapes stay static (`fill`; else it is left out, as evaluation must: (None, errors) if none is
    left), and its error is returned for the log; `strict` raises instead. Item → (batch, errors)."""

    def __init__(self, dataset, groups, collate, seed=0, epoch=0, numbers=None, strict=False, fill=True):
        self.dataset, self.groups, self.collate, self.strict, self.fill = dataset, groups, collate, strict, fill
        self.seed, self.epoch, self.numbers = seed, epoch, numbers or range(len(groups))

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, j):
        items, errors = [], []
        for i in self.groups[j]:
            try:
                items.append(self.dataset[i])
            except DataError as e:
                if self.strict:
                    raise
                errors.append(str(e))
        if not items and self.fill:
            raise DataError(f'every sample of a micro-batch is unreadable, e.g. {errors[0]}')
        if not items:
            return None, errors                                   # nothing to evaluate in this chunk
        items = [items[k % len(items)] for k in range(len(self.groups[j]))] if self.fill else items
        seed = np.random.SeedSequence([self.seed, self.epoch, self.numbers[j]]).generate_state(1, np.uint64)[0]
        return self.collate(items, generator=torch.Generator().manual_seed(int(seed))), errors


def epoch_groups(dataset, n, seed, epoch):
    """Epoch `epoch`'s micro-batches of n sample indices, (len(dataset) // n, n), the same on every rank: a permutation
    seeded by (seed, epoch). Where the dataset knows its lengths, each takes samples of similar length (fairseq
    batches by size): sorted within windows of 64 micro-batches, then the micro-batches shuffled."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(dataset), generator=g)
    if getattr(dataset, 'lengths', None):
        lengths = torch.tensor(dataset.lengths)
        order = torch.cat([w[lengths[w].argsort()] for w in order.split(64 * n)])
    groups = order[:len(dataset) // n * n].view(-1, n)                            # (G, n)
    return groups[torch.randperm(len(groups), generator=g)]


def batches(dataset, collate, batch_size, seed, rank=0, world=1, workers=0, pin=False, start=0, strict=False, init_fn=None):
    """Endless (micro-batch, errors) pairs for one rank of `world`, from this rank's `start`-th on (a resumed run skips
    what it has consumed without reading it). collate(items, generator) → batch.

    All ranks share one stream of micro-batches, epoch after epoch, numbered g = 0, 1, …; rank r draws g = r, r + world,
    r + 2·world, … So an update of `accum` micro-batches on each of `world` ranks sees the same samples, crops and
    masks as one process accumulating accum · world of them, and a run resumed on another number of ranks goes on
    where it stopped (tested).
    """
    G = len(dataset) // batch_size                                                # micro-batches per epoch, all ranks
    if G == 0:
        raise DataError(f'{len(dataset)} samples are too few for --micro-batch-size {batch_size}')
    g = start * world + rank                                                      # this rank's next micro-batch
    while True:
        epoch, first = divmod(g, G)
        numbers = list(range(first, G, world))                                    # this rank's share of the epoch
        epoch_set = MicroBatches(dataset, epoch_groups(dataset, batch_size, seed, epoch)[numbers].tolist(), collate, seed,
                                 epoch, numbers, strict)
        yield from torch.utils.data.DataLoader(epoch_set, batch_size=None, num_workers=workers, pin_memory=pin,
                                               worker_init_fn=init_fn, generator=torch.Generator())  # not the global RNG
        g = epoch * G + numbers[-1] + world

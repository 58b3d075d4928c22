"""Data for each modality: an embedded synthetic set (no download) and a reader for real files; and `batches`, the
endless, resumable stream of micro-batches that train.py and finetune.py draw from."""
import itertools

import numpy as np
import torch


class DataError(ValueError):
    """Bad input data; the message names the file or the flag."""


class MicroBatches(torch.utils.data.Dataset):
    """Epoch `epoch`'s micro-batches for one rank of `world`, from number `first` on. Item j reads the samples of
    groups[j] and collates them with a generator seeded by (seed, epoch, i), i = (first + j)·world + rank the micro-
    batch's number in the epoch over all ranks, so crops, masks and augmentations depend neither on --workers, nor on
    where a run was resumed, nor on how many processes share the batch. A sample that raises DataError (a corrupt or vanished file) is
    replaced by a repeat of a readable one of the same micro-batch, so shapes stay static (`fill`; else it is left
    out, as evaluation must: (None, errors) if none is left), and its error is returned for the log; `strict` raises
    instead. Item → (batch, errors)."""

    def __init__(self, dataset, groups, collate, seed=0, epoch=0, rank=0, first=0, strict=False, fill=True, world=1):
        self.dataset, self.groups, self.collate, self.strict, self.fill = dataset, groups, collate, strict, fill
        self.seed, self.epoch, self.rank, self.world, self.first = seed, epoch, rank, world, first

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
        i = (self.first + j) * self.world + self.rank                          # over all ranks
        seed = np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1, np.uint64)[0]
        return self.collate(items, generator=torch.Generator().manual_seed(int(seed))), errors


def batches(dataset, collate, batch_size, seed, rank=0, world=1, workers=0, pin=False, start=0, strict=False, init_fn=None):
    """Endless (micro-batch, errors) pairs of this rank's share of the data, reshuffled every epoch, from the `start`-th
    on (a resumed run skips what it has consumed without reading it). collate(items, generator) → batch.

    Every epoch's micro-batches are formed once for all ranks and dealt out in turn: rank r draws numbers r, r + world,
    … So an update of `accum` micro-batches on each of `world` ranks sees the same samples, crops and masks as one
    process accumulating accum · world of them: the global batch does not depend on the GPU count (tested).
    Where the dataset knows its lengths, each micro-batch takes samples of similar length (fairseq batches by size).
    """
    n = batch_size
    per_rank = len(dataset) // n // world                                         # micro-batches per rank and epoch
    if per_rank == 0:
        raise DataError(f'{len(dataset)} samples are too few for --micro-batch-size {n} on {world} device(s)')
    for epoch in itertools.count(start // per_rank):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)              # one order per epoch, the same on every rank
        order = torch.randperm(len(dataset), generator=g)
        if getattr(dataset, 'lengths', None):
            lengths = torch.tensor(dataset.lengths)
            order = torch.cat([w[lengths[w].argsort()] for w in order.split(64 * n)])  # sort within windows of 64 batches
        groups = order[:len(dataset) // n * n].view(-1, n)                        # (batches, n)
        groups = groups[torch.randperm(len(groups), generator=g)][:per_rank * world][rank::world]   # (per_rank, n)
        first = start % per_rank if epoch == start // per_rank else 0
        epoch_set = MicroBatches(dataset, groups[first:].tolist(), collate, seed, epoch, rank, first, strict, world=world)
        yield from torch.utils.data.DataLoader(epoch_set, batch_size=None, num_workers=workers, pin_memory=pin,
                                               worker_init_fn=init_fn, generator=torch.Generator())  # not the global RNG

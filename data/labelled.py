"""Labelled data for fine-tuning (finetune.py): training and held-out sets, --labeled subsets, class names.

What a labelled example is, and how examples become a batch, is each modality's (data/speech.py, data/vision.py,
data/text.py: labelled_set, embedded, labelled_collate); here is what is common: the split, the subset, the classes.
Targets: class indices (classify) or letter ids (speech CTC).
"""
import torch

from data import DataError, modality


class Examples(torch.utils.data.Dataset):
    """Item k → (input, target) = (base[indices[k]][0], targets[k]); with targets None, base[indices[k]] as it is."""

    def __init__(self, base, indices, targets=None):
        self.base, self.indices, self.targets = base, list(indices), targets

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        item = self.base[self.indices[k]]
        return item if self.targets is None else (item[0], self.targets[k])


def load_data(cfg, mcfg, classes=None):
    """(train Examples, test Examples, class names or None for CTC). Never evaluates on a training example.
    classes: a released classifier's own (its head's order); else the sorted labels of the training data."""
    data = modality(cfg.modality)
    if not cfg.data:
        train, test = data.embedded('train', mcfg), data.embedded('valid', mcfg)
        if cfg.task == 'ctc':                                     # transcripts: the items' own (collate encodes them)
            if cfg.labeled > len(train):
                raise DataError(f'--labeled {cfg.labeled}: only {len(train)} labelled training examples')
            keep = balanced_subset([0] * len(train), cfg.labeled) if cfg.labeled else range(len(train))
            return Examples(train, keep), Examples(test, range(len(test))), None
        if not hasattr(train, 'classes'):
            raise DataError(f'--task {cfg.task} needs --data: the embedded {cfg.modality} set has no classes '
                            '(speech: a folder of <label>/<clip>.wav, the Speech Commands layout)')
        names = lambda ds: [ds.classes[i % len(ds.classes)] for i in range(len(ds))]   # balanced: label = i % classes
        train_t, test_t = names(train), names(test)
        train_i, test_i = range(len(train)), range(len(test))
    else:
        train, train_t = data.labelled_set(cfg.data, cfg, mcfg)
        if cfg.test_data:
            test, test_t = data.labelled_set(cfg.test_data, cfg, mcfg)
            train_i, test_i = range(len(train)), range(len(test))
        else:                                                     # a fixed split: the same test set for every --seed
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
            n_test = max(1, round(cfg.holdout * len(order)))
            test, test_i, train_i = train, sorted(order[:n_test]), sorted(order[n_test:])
            test_t, train_t = [train_t[i] for i in test_i], [train_t[i] for i in train_i]
    if cfg.task == 'classify':
        given, classes = classes, classes or sorted(set(train_t))
        if given:                                                 # a released head's classes: by name or by index
            by_index = {str(i): name for i, name in enumerate(given)}
            train_t, test_t = [by_index.get(t, t) for t in train_t], [by_index.get(t, t) for t in test_t]
        if len(classes) < 2:
            raise DataError(f'--data {cfg.data or "(embedded)"}: {len(classes)} class{"es" if not classes else ""} '
                            f'({", ".join(classes)}); classification needs at least 2')
        unseen = sorted(set(test_t) - set(classes))
        if unseen:
            raise DataError(f'--test-data {cfg.test_data}: labels not in {"the model" if given else "the training data"}: '
                            f'{", ".join(unseen[:10])}')
        train_t, test_t = [classes.index(t) for t in train_t], [classes.index(t) for t in test_t]
    else:
        classes = None
    train_i = list(train_i)
    if not train_i:
        raise DataError(f'--data {cfg.data}: no training examples left after holding out {len(test_i)}; pass --test-data')
    if cfg.labeled:
        if cfg.labeled > len(train_i):
            raise DataError(f'--labeled {cfg.labeled}: only {len(train_i)} labelled training examples')
        if classes and cfg.labeled < len(classes):
            raise DataError(f'--labeled {cfg.labeled}: fewer than the {len(classes)} classes; every class needs an example')
        keep = balanced_subset(train_t if classes else [0] * len(train_i), cfg.labeled)
        train_i, train_t = [train_i[k] for k in keep], [train_t[k] for k in keep]
    if hasattr(data, 'prepare_labelled'):                         # text: token ids once, up front, with the tokenizer
        train, test = data.prepare_labelled(train, test, train_i, cfg, mcfg)
    return Examples(train, train_i, train_t), Examples(test, test_i, test_t), classes


def balanced_subset(labels, n):
    """n positions of `labels`, chosen with seed 0, taking classes in turn: every class gets ⌊n / C⌋ or one more."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).tolist()
    rank, seen = {}, {}
    for k in order:                                               # k's rank among the shuffled examples of its class
        rank[k] = seen[labels[k]] = seen.get(labels[k], -1) + 1
    return sorted(sorted(order, key=lambda k: rank[k])[:n])

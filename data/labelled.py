"""Labelled data for fine-tuning (finetune.py): the embedded sets' labels, folders and files, held-out splits, batches.

Targets: class indices (classify) or letter ids (speech CTC: wav2vec 2.0's letters, '|' between words, blank = 0).
A batch is (source, padding_mask or None, targets, target lengths (CTC) or None, time mask, channel mask).
"""
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from data import DataError
from data.speech import MIN_SECONDS, SR, AudioFolder, SyntheticSpeech, crop_and_pad
from data.text import SyntheticText, read_labelled, train_tokenizer
from data.vision import ImageFolder, SyntheticImages, augment
from encoders import conv_output_length
from masking import span_mask

BLANK, LETTERS = '<blank>', "|ABCDEFGHIJKLMNOPQRSTUVWXYZ'"    # wav2vec 2.0's letter dictionary; '|' = word boundary
CTC_VOCAB = [BLANK] + list(LETTERS)                           # blank = 0


def encode_transcript(text, where=''):
    """'Hello world' → ids of H E L L O | W O R L D. Letters are upper-cased and runs of spaces are one boundary; any other
    character (digits, punctuation but the apostrophe) is an error naming `where` (file:line)."""
    text = ' '.join(text.upper().split())
    bad = sorted(set(text) - set(LETTERS) - {' '})
    if bad or not text:
        raise DataError(f'{where}: transcript {text[:60]!r} ' + (f'has characters outside the CTC vocabulary A–Z, \' and space: '
                        f'{"".join(bad)!r}' if bad else 'is empty') + '; normalise it first (e.g. numbers as words)')
    return [CTC_VOCAB.index('|' if c == ' ' else c) for c in text]


class Examples(torch.utils.data.Dataset):
    """Item k → (input, target) = (base[indices[k]][0], targets[k]); with targets None, base[indices[k]] as it is."""

    def __init__(self, base, indices, targets=None):
        self.base, self.indices, self.targets = base, list(indices), targets

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        item = self.base[self.indices[k]]
        return item if self.targets is None else (item[0], self.targets[k])


def labelled_set(path, cfg, mcfg, tokenizer):
    """(dataset of (input, label or transcript), targets: class names or transcript ids) for a --data/--test-data path."""
    if cfg.modality == 'vision':
        ds = ImageFolder(path, strict=cfg.strict_data)            # smaller images are resized up
        return ds, [ds.classes[label] for _, label in ds.samples]
    if cfg.modality == 'text':
        examples = read_labelled(path, cfg.encoding)
        return [(texts, label) for texts, label in examples], [label for _, label in examples]
    ds = AudioFolder(path, min_samples=int(MIN_SECONDS * SR), strict=cfg.strict_data)
    if cfg.task == 'classify':
        return ds, [f.parent.name for f in ds.files]
    missing = [f for f in ds.files if f.stem not in ds.transcripts]
    if missing:
        raise DataError(f'{missing[0]}: no transcript (expected a line "{missing[0].stem} TEXT" in a *.trans.txt under {path})')
    return ds, [encode_transcript(ds.transcripts[f.stem], ds.transcript_lines[f.stem]) for f in ds.files]


def load_data(cfg, mcfg, tokenizer):
    """(train Examples, test Examples, class names or None for CTC). Never evaluates on a training example."""
    if not cfg.data:
        if cfg.modality == 'speech' and cfg.task == 'classify':
            raise DataError('--task classify needs --data: a folder of <label>/<clip>.wav (Speech Commands layout)')
        make = dict(speech=lambda split, n: SyntheticSpeech(n, split=split),
                    vision=lambda split, n: SyntheticImages(n, image_size=mcfg.image_size, split=split),
                    text=lambda split, n: SyntheticText(n, split=split))[cfg.modality]
        train, test = make('train', 2048), make('valid', 256 if cfg.modality == 'speech' else 512)
        if cfg.task == 'ctc':                                     # transcripts: the items' own (collate encodes them)
            if cfg.labeled > len(train):
                raise DataError(f'--labeled {cfg.labeled}: only {len(train)} labelled training examples')
            keep = balanced_subset([0] * len(train), cfg.labeled) if cfg.labeled else range(len(train))
            return Examples(train, keep), Examples(test, range(len(test))), None
        names = lambda ds: [ds.classes[i % len(ds.classes)] for i in range(len(ds))]   # balanced: label = i % classes
        train_t, test_t = names(train), names(test)
        train_i, test_i = range(len(train)), range(len(test))
    else:
        train, train_t = labelled_set(cfg.data, cfg, mcfg, tokenizer)
        if cfg.test_data:
            test, test_t = labelled_set(cfg.test_data, cfg, mcfg, tokenizer)
            train_i, test_i = range(len(train)), range(len(test))
        else:                                                     # a fixed split: the same test set for every --seed
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
            n_test = max(1, round(cfg.holdout * len(order)))
            test, test_i, train_i = train, sorted(order[:n_test]), sorted(order[n_test:])
            test_t, train_t = [train_t[i] for i in test_i], [train_t[i] for i in train_i]
    if cfg.task == 'classify':
        classes = sorted(set(train_t))
        if len(classes) < 2:
            raise DataError(f'--data {cfg.data or "(embedded)"}: {len(classes)} class{"es" if not classes else ""} '
                            f'({", ".join(classes)}); classification needs at least 2')
        unseen = sorted(set(test_t) - set(classes))
        if unseen:
            raise DataError(f'--test-data {cfg.test_data}: labels not in the training data: {", ".join(unseen[:10])}')
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
    if cfg.modality == 'text':                                    # token ids once, up front
        if tokenizer is None:                                     # scratch without --tokenizer: a BPE of the training texts
            tokenizer = train_tokenizer([t for i in train_i for t in as_tuple(train[i][0])], mcfg.vocab_size)
        if mcfg.vocab_size != tokenizer.get_vocab_size() and cfg.init != 'scratch':
            raise DataError(f'the tokenizer has {tokenizer.get_vocab_size()} tokens, --init {cfg.init} {mcfg.vocab_size}')
        mcfg.vocab_size, mcfg.pad_id = tokenizer.get_vocab_size(), tokenizer.token_to_id('<pad>')
        train, test = encode_texts(train, tokenizer, mcfg.max_tokens), encode_texts(test, tokenizer, mcfg.max_tokens)
    return Examples(train, train_i, train_t), Examples(test, test_i, test_t), classes


def balanced_subset(labels, n):
    """n positions of `labels`, chosen with seed 0, taking classes in turn: every class gets ⌊n / C⌋ or one more."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).tolist()
    rank, seen = {}, {}
    for k in order:                                               # k's rank among the shuffled examples of its class
        rank[k] = seen[labels[k]] = seen.get(labels[k], -1) + 1
    return sorted(sorted(order, key=lambda k: rank[k])[:n])


def as_tuple(texts):
    return (texts,) if isinstance(texts, str) else texts                  # the embedded set: one sentence, a str


def encode_texts(examples, tokenizer, max_tokens):
    """[(texts, label)] → [(LongTensor ids, label)]: <s> a </s> or <s> a </s></s> b </s> (RoBERTa), cut to max_tokens."""
    bos, eos = tokenizer.token_to_id('<s>'), tokenizer.token_to_id('</s>')
    out = []
    for i in tqdm(range(len(examples)), desc='tokenizing', disable=len(examples) < 5000, leave=False):
        texts, label = examples[i]                                        # (a Dataset need not stop iterating at len)
        parts = [tokenizer.encode(t, add_special_tokens=False).ids for t in as_tuple(texts)]
        ids = [bos] + parts[0] + [eos] + (([eos] + parts[1] + [eos]) if len(parts) > 1 else [])
        out.append((torch.tensor(ids[:max_tokens - 1] + [eos] if len(ids) > max_tokens else ids), label))
    return out


def collate(items, cfg, mcfg, train, pad_id=1, generator=None):
    """→ (source, padding_mask or None, targets, target lengths or None, time mask, channel mask); random draws from `generator`."""
    g = generator
    inputs, targets = [x for x, _ in items], [y for _, y in items]
    none = (None, None)
    if cfg.modality == 'vision':
        images = [augment(x, mcfg.image_size, 0.35, g) if train else resize(x, mcfg.image_size) for x in inputs]
        return (torch.stack(images), None, torch.tensor(targets), None) + none     # (B, 3, H, W)
    if cfg.modality == 'text':
        source = pad_sequence(inputs, batch_first=True, padding_value=pad_id)  # (B, T)
        return (source, None, torch.tensor(targets), None) + none
    source, padding_mask = crop_and_pad(inputs, cfg.crop if cfg.task == 'classify' and train else 10 ** 9, g)  # (B, S)
    if cfg.task == 'ctc':                                          # embedded speech: transcripts as text
        targets = [encode_transcript(t, 'embedded speech') if isinstance(t, str) else t for t in targets]
        labels, lengths = torch.tensor([c for t in targets for c in t]), torch.tensor([len(t) for t in targets])
    else:
        labels, lengths = torch.tensor(targets), None
    time_mask = channel_mask = None
    if train and cfg.mask_prob > 0:
        frames = conv_output_length((~padding_mask).sum(1))                      # (B,)
        time_mask = span_mask(frames, conv_output_length(source.shape[1]), cfg.mask_prob, cfg.mask_length, generator=g)  # (B, T)
    if train and cfg.mask_channel_prob > 0:
        channel_mask = span_mask(torch.full((len(items),), mcfg.dim), mcfg.dim, cfg.mask_channel_prob, cfg.mask_channel_length,
                                 generator=g)  # (B, D)
    return source, padding_mask if padding_mask.any() else None, labels, lengths, time_mask, channel_mask


def resize(image, size):
    """Evaluation view: uint8 (3, H, W) → float (3, size, size) in [0, 1]: shorter side to `size`, centre crop."""
    img = image.float() / 255
    if img.shape[1:] != (size, size):
        scale = size / min(img.shape[1:])
        h, w = max(size, round(img.shape[1] * scale)), max(size, round(img.shape[2] * scale))
        img = F.interpolate(img[None], size=(h, w), mode='bicubic', antialias=True)[0].clamp(0, 1)
        top, left = (h - size) // 2, (w - size) // 2
        img = img[:, top:top + size, left:left + size]
    return img

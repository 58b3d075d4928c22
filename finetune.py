"""data2vec fine-tuning: does the pretrained encoder help a downstream task with few labels?

    python finetune.py --modality speech --init runs/speech/checkpoint.pt           # letter CTC on the embedded speech: WER, CER
    python finetune.py --modality speech --task classify --data DIR --init CKPT     # DIR/<label>/<clip>.wav (Speech Commands)
    python finetune.py --modality vision --init runs/vision/checkpoint.pt --linear-probe
    python finetune.py --modality text --init CKPT --data trec/train.txt --test-data trec/test.txt --encoding latin-1
    python finetune.py --modality text --init scratch                               # the same architecture, random weights

The heads are the papers': speech CTC = Linear on the last block, per frame (wav2vec 2.0); speech classify = mean over
the valid frames → BatchNorm (no affine) → Linear; vision = mean of the last block's patch tokens → LayerNorm → Linear (BEiT use_mean_pooling);
text = RoBERTa's classification head on <s>: Dropout → Linear → tanh → Dropout → Linear.
Outputs in --out: metrics.json, log.jsonl, finetuned.pt.
"""
import argparse
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import (CheckpointError, StopSignal, check_writable, ignore_stop_signals, load, open_checkpoint, resume_changes,
                        resume_hint, resume_log, rng_state, save, seed_all, set_rng_state, skipped_update, stop_agreed,
                        too_many_bad_steps, update_is_finite)
from data import DataError, MicroBatches, batches
from data.labelled import CTC_VOCAB, collate, load_data
from data.text import read_tokenizer
from model import Data2Vec, ModelConfig, trunc_normal_
from train import PRESETS, knob, lr_at, pick_device, to_device

# -------------------------------------------------------------------------------------------- config


@dataclass
class FinetuneConfig:
    modality: str = knob('speech', 'speech | vision | text')
    init: str = knob('', 'a train.py checkpoint.pt, or scratch: the same architecture (--preset) with random weights')
    task: str = knob('', 'speech: ctc (letters; WER, CER) | classify (label = the folder name); vision, text: classify')
    data: str = knob('', 'labelled training data; empty: the embedded synthetic set. speech: folder of .wav/.flac with '
                         '*.trans.txt (ctc) or <label>/ folders; vision: <class>/<image>; text: TSV with a header or label-sentence lines')
    test_data: str = knob('', 'held-out data in the same layout; empty: the embedded valid split, or a fixed --holdout of --data')
    holdout: float = knob(0.2, 'fraction of --data held out (seed 0, the same for every --seed) when there is no --test-data')
    labeled: int = knob(0, 'train on N labelled examples only: a fixed (seed 0), class-balanced subset; 0 = all')
    linear_probe: bool = knob(False, 'freeze the encoder (eval mode) and train the head only')
    use_teacher: bool = knob(False, "start from the checkpoint's EMA teacher instead of the student (the paper uses the student)")
    preset: str = knob('', "recipe (and, with --init scratch, architecture): tiny | base; default: the checkpoint's, else tiny")
    image_size: int = knob(0, 'vision, --init scratch: the image size (0 = the preset\'s)')
    encoding: str = knob('utf-8', 'text: the encoding of --data and --test-data')
    tokenizer: str = knob('', 'text: tokenizer.json, or a folder with vocab.json + merges.txt; default: the one beside the '
                              'checkpoint; scratch: a BPE trained on the training texts')
    out: str = knob('', 'output folder (default runs/finetune-<modality>)')
    device: str = knob('auto', 'auto | cpu | cuda')
    seed: int = knob(0, 'random seed: head init, data order, masks (and the weights, for --init scratch)')
    steps: int = knob(0, 'updates')
    batch_size: int = knob(0, 'examples per update')
    lr: float = knob(0.0, 'peak learning rate (default: the recipe\'s, higher for --linear-probe)')
    schedule: str = knob('', 'tri_stage | cosine (train.lr_at)')
    warmup: float = knob(-1.0, 'fraction of the steps warming up')
    hold: float = knob(-1.0, 'tri_stage: fraction of the steps at the peak')
    min_lr: float = knob(0.0, 'cosine: the final learning rate')
    weight_decay: float = knob(-1.0, 'decoupled weight decay')
    layer_decay: float = knob(0.0, 'block i of L gets lr × layer_decay^(L − i); the front end ^(L + 1), the head 1 (BEiT)')
    label_smoothing: float = knob(-1.0, 'classification: label smoothing')
    drop_path: float = knob(-1.0, 'vision: stochastic depth of the last block')
    layerdrop: float = knob(-1.0, 'speech, text: LayerDrop')
    freeze_steps: int = knob(-1, 'speech: the encoder stays frozen (head only) for the first N updates (fairseq freeze_finetune_updates)')
    mask_prob: float = knob(-1.0, 'speech: time masking with the mask embedding, fairseq mask_prob (0 = off)')
    mask_length: int = knob(0, 'speech: frames per time-mask span')
    mask_channel_prob: float = knob(-1.0, 'speech: channel masking (zeroed feature channels), fairseq mask_channel_prob')
    mask_channel_length: int = knob(0, 'speech: channels per channel-mask span')
    crop: int = knob(16_000, 'speech classify: longest clip in samples (CTC never crops)')
    workers: int = knob(0, 'data-loader worker processes')
    log_every: int = knob(20, 'steps between log lines')
    ckpt_every: int = knob(1000, 'steps between resumable checkpoints (--out/checkpoint.pt, removed once finetuned.pt is written)')
    resume: bool = knob(False, 'continue an interrupted run from --out/checkpoint.pt exactly; without one, start')
    max_bad_steps: int = knob(10, 'stop after this many consecutive updates skipped for a NaN/Inf loss or gradient')
    strict_data: bool = knob(False, 'stop at the first unreadable sample instead of skipping it and logging its file')


# Recipes. base: the papers' (reference.md: §1.3 wav2vec 2.0 base_100h CTC, §1.5 BEiT, §1.4 RoBERTa GLUE). tiny: CPU-sized.
RECIPES = {
    'speech': {'base': dict(steps=80_000, batch_size=128, lr=3e-5, probe_lr=1e-3, schedule='tri_stage', warmup=0.1, hold=0.4,
                            weight_decay=0.0, layer_decay=1.0, label_smoothing=0.0, layerdrop=0.1, freeze_steps=0, mask_prob=0.65,
                            mask_length=10, mask_channel_prob=0.5, mask_channel_length=64),
               'tiny': dict(steps=400, batch_size=16, lr=5e-4, probe_lr=3e-3, schedule='tri_stage', warmup=0.1, hold=0.4,
                            weight_decay=0.0, layer_decay=1.0, label_smoothing=0.0, layerdrop=0.0, freeze_steps=0, mask_prob=0.3,
                            mask_length=5, mask_channel_prob=0.25, mask_channel_length=16)},
    'vision': {'base': dict(steps=125_000, batch_size=1024, lr=4e-3, probe_lr=1e-2, schedule='cosine', warmup=0.2, min_lr=1e-6,
                            weight_decay=0.0, layer_decay=0.65, label_smoothing=0.1, drop_path=0.2),
               'tiny': dict(steps=300, batch_size=64, lr=1e-3, probe_lr=3e-3, schedule='cosine', warmup=0.1, min_lr=1e-6,
                            weight_decay=0.05, layer_decay=0.75, label_smoothing=0.1, drop_path=0.1)},
    'text': {'base': dict(steps=10_000, batch_size=32, lr=2e-5, probe_lr=1e-3, schedule='cosine', warmup=0.06, weight_decay=0.1,
                          layer_decay=1.0, label_smoothing=0.0, layerdrop=0.0),
             'tiny': dict(steps=300, batch_size=32, lr=3e-4, probe_lr=3e-3, schedule='cosine', warmup=0.1, weight_decay=0.1,
                          layer_decay=1.0, label_smoothing=0.0, layerdrop=0.0)},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='data2vec fine-tuning and linear probes. Unset numbers come from the recipe (RECIPES).')
    for f in fields(FinetuneConfig):
        kw = dict(action=argparse.BooleanOptionalAction) if type(f.default) is bool else dict(type=type(f.default))
        p.add_argument('--' + f.name.replace('_', '-'), default=f.default, help=f.metadata['help'].replace('%', '%%'), **kw)
    cfg = FinetuneConfig(**vars(p.parse_args(argv)))
    cfg.task = cfg.task or ('ctc' if cfg.modality == 'speech' else 'classify')
    cfg.out = cfg.out or f'runs/finetune-{cfg.modality}'
    checks = [(cfg.modality in RECIPES, f'--modality {cfg.modality}: choose speech, vision or text'),
              (cfg.init != '', '--init: a train.py checkpoint.pt, or scratch'),
              (cfg.task in (('ctc', 'classify') if cfg.modality == 'speech' else ('classify',)),
               f'--task {cfg.task}: {cfg.modality} supports ' + ('ctc or classify' if cfg.modality == 'speech' else 'classify')),
              (cfg.preset in ('', 'tiny', 'base'), f'--preset {cfg.preset}: choose tiny or base'),
              (cfg.labeled >= 0 and 0 < cfg.holdout < 1, '--labeled must be ≥ 0 and --holdout in (0, 1)'),
              (cfg.seed >= 0 and cfg.ckpt_every >= 1 and cfg.max_bad_steps >= 1, '--seed ≥ 0, --ckpt-every and --max-bad-steps ≥ 1'),
              (cfg.device in ('auto', 'cpu', 'cuda'), f'--device {cfg.device}: choose auto, cpu or cuda'),
              (not cfg.test_data or cfg.data, '--test-data needs --data')]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    return cfg


def fill_recipe(cfg, preset):
    """Knobs left at their default take the recipe's value (the lr: probe_lr under --linear-probe)."""
    recipe = dict(RECIPES[cfg.modality][preset])
    probe_lr = recipe.pop('probe_lr')
    recipe['lr'] = probe_lr if cfg.linear_probe else recipe['lr']
    if cfg.task == 'classify' or cfg.linear_probe:                # SpecAugment is CTC fine-tuning's (README Deviations)
        recipe.update(mask_prob=0.0, mask_channel_prob=0.0)
    for f in fields(cfg):
        if f.name in recipe and getattr(cfg, f.name) == f.default:
            setattr(cfg, f.name, recipe[f.name])
    for ok, msg in [(cfg.steps >= 1 and cfg.batch_size >= 1, '--steps and --batch-size must be ≥ 1'),
                    (cfg.lr > 0, f'--lr {cfg.lr} must be > 0'),
                    (cfg.schedule in ('tri_stage', 'cosine'), f'--schedule {cfg.schedule}: choose tri_stage or cosine'),
                    (0 < cfg.layer_decay <= 1, f'--layer-decay {cfg.layer_decay} must be in (0, 1]')]:
        if not ok:
            raise DataError(msg)

# -------------------------------------------------------------------------------------------- the encoder


def load_encoder(cfg):
    """(ModelConfig, checkpoint dict or None, tokenizer or None, recipe preset). From a train.py checkpoint, or
    randomly initialised (--init scratch) with the preset's architecture."""
    tokenizer = None
    if cfg.init == 'scratch' and cfg.use_teacher:
        raise DataError('--use-teacher needs a checkpoint, not --init scratch')
    if cfg.init == 'scratch':
        preset = cfg.preset or 'tiny'
        arch = {k: v for k, v in PRESETS[cfg.modality][preset].items() if k in ModelConfig.__dataclass_fields__}
        mcfg = ModelConfig(**{**arch, 'modality': cfg.modality, **({'image_size': cfg.image_size} if cfg.image_size else {})})
        if cfg.modality == 'text':
            tokenizer = read_tokenizer(cfg.tokenizer) if cfg.tokenizer else None   # else trained on the texts in load_data
        return mcfg, None, tokenizer, preset
    path = Path(cfg.init)
    if not path.is_file():
        raise DataError(f'--init {path}: no such file (a train.py checkpoint.pt, or scratch)')
    try:
        ckpt = load(path)                                                 # weights_only: tensors and plain types, runs no code
        saved, mcfg, _ = ckpt['config'], ModelConfig(**ckpt['config']['model']), ckpt['student']
    except (CheckpointError, KeyError, TypeError) as e:
        raise DataError(f'--init {path}: not a train.py checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:300]})') from None
    if mcfg.modality != cfg.modality:
        raise DataError(f'--init {path}: a {mcfg.modality} checkpoint; --modality is {cfg.modality}')
    if cfg.image_size and cfg.image_size != mcfg.image_size:
        raise DataError(f'--image-size {cfg.image_size}: --init {path} was pretrained on {mcfg.image_size}² images '
                        '(the relative position table fixes the grid); leave --image-size out')
    if cfg.modality == 'text':
        tokenizer = read_tokenizer(cfg.tokenizer or path.parent / 'tokenizer.json')
    return mcfg, ckpt, tokenizer, cfg.preset or {'large': 'base'}.get(saved['train']['preset'], saved['train']['preset'])


def build_backbone(mcfg, ckpt, cfg):
    """The student without its regression head, with the fine-tuning dropouts, and the checkpoint's weights."""
    mcfg.drop_path = cfg.drop_path if cfg.modality == 'vision' else mcfg.drop_path
    mcfg.layerdrop = cfg.layerdrop if cfg.modality != 'vision' else mcfg.layerdrop
    model = Data2Vec(mcfg)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt['student'])
            if cfg.use_teacher:
                model.encoder.load_state_dict(ckpt['teacher'])                # the EMA copy of `encoder`; the rest is shared
        except RuntimeError as e:
            raise DataError(f'--init {cfg.init}: the weights do not fit the architecture in its config '
                            f'({str(e).splitlines()[1].strip()[:200]})') from None
    del model.regression_head                                                 # pretraining only
    return model


def masked_mean(x, padding_mask):
    """Mean over the valid steps: x (B, T, D), padding_mask (B, T) True = padding, or None → (B, D)."""
    if padding_mask is None:
        return x.mean(1)
    x = x.masked_fill(padding_mask[..., None], 0.0)                           # (B, T, D)
    return x.sum(1) / (~padding_mask).sum(1, keepdim=True).clamp(min=1)


class Finetuner(nn.Module):
    """The pretrained encoder and a task head. `frozen`: the encoder runs without gradients (linear probe, first updates)."""

    def __init__(self, backbone, n_out, task):
        super().__init__()
        self.backbone, self.task, self.frozen = backbone, task, False
        cfg, D = backbone.cfg, backbone.cfg.dim
        if cfg.modality == 'vision':                                          # BEiT: fc_norm, head scaled by init_scale 0.001
            self.fc_norm, self.head = nn.LayerNorm(D, eps=1e-6), nn.Linear(D, n_out)
            trunc_normal_(self.head.weight)
            self.head.weight.data.mul_(0.001)
            nn.init.zeros_(self.head.bias)
        elif cfg.modality == 'text':                                          # RobertaClassificationHead
            self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(D, D), nn.Tanh(), nn.Dropout(cfg.dropout),
                                      nn.Linear(D, n_out))
        else:                  # classify: BatchNorm without affine on the pooled features (MAE's linear probe; README Deviations)
            self.pool_norm = nn.BatchNorm1d(D, affine=False) if task == 'classify' else nn.Identity()
            self.head = nn.Linear(D, n_out)

    def forward(self, source, padding_mask=None, time_mask=None, channel_mask=None):
        """→ logits: ctc (B, T, V) and the frame padding (B, T) or None; classify (B, C) and None."""
        b, modality = self.backbone, self.backbone.cfg.modality
        with torch.no_grad() if self.frozen else nullcontext():              # the head always trains
            if modality == 'vision':
                _, taps = b.encoder(source, tap='block')                      # [(B, N, D)]: blocks' outputs, CLS dropped
                x = taps[-1]                                                  # the last block, before the final norm
            elif modality == 'text':
                padding_mask = source == b.cfg.pad_id                         # (B, T)
                x, _ = b.encoder(b.embed(source), padding_mask if padding_mask.any() else None)
            else:
                x, padding_mask = b.feature_encoder(source, padding_mask)     # (B, T, D); the conv layers are frozen
                if channel_mask is not None:
                    x = x.masked_fill(channel_mask[:, None, :], 0.0)          # wav2vec 2.0 mask_channel: zeroed channels
                x = b.encode(x, padding_mask, time_mask)                      # (B, T, D); masked frames → mask embedding
        if modality == 'vision':
            return self.head(self.fc_norm(x.mean(1))), None                   # (B, C)
        if modality == 'text':
            return self.head(x[:, 0]), None                                   # <s> → (B, C)
        if self.task == 'ctc':
            return self.head(x), padding_mask                                 # (B, T, V)
        return self.head(self.pool_norm(masked_mean(x, padding_mask))), None  # (B, C)


def layer_decay_groups(model, weight_decay, decay):
    """BEiT param groups: with L blocks, block i (1-based) trains at lr × decay^(L + 1 − i), the front end (patch/feature
    encoder, tokens, embeddings) at decay^(L + 1), everything after the blocks (norms, relative position bias, head) at 1.
    Speech and text: all of `encoder` outside the blocks (its input LayerNorm) trains at 1, as do the heads.
    Vision: no weight decay on 1-D parameters, the CLS token and the bias table (BEiT); speech and text decay all (fairseq)."""
    L = len(model.backbone.encoder.layers)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if '.layers.' in name:
            layer = int(name.split('.layers.')[1].split('.')[0]) + 1
        elif name.startswith(('backbone.encoder.rel_pos_bias', 'backbone.encoder.norm')) or not name.startswith('backbone.') \
                or (model.backbone.cfg.modality != 'vision' and name.startswith('backbone.encoder.')):
            layer = L + 1
        else:
            layer = 0
        no_decay = model.backbone.cfg.modality == 'vision' and (p.ndim == 1 or 'cls_token' in name or 'rel_pos_bias' in name)
        group = groups.setdefault((layer, no_decay), dict(params=[], weight_decay=0.0 if no_decay else weight_decay,
                                                          lr_scale=decay ** (L + 1 - layer)))
        group['params'].append(p)
    return list(groups.values())

# -------------------------------------------------------------------------------------------- CTC and metrics



def ctc_greedy_decode(ids):
    """Best path → text: merge repeated ids, then drop blanks (so a blank separates a real double letter)."""
    out, prev = [], None
    for i in ids:
        if i != prev and i != 0:
            out.append(CTC_VOCAB[i])
        prev = i
    return ' '.join(''.join(out).replace('|', ' ').split())                 # a blank between two '|' leaves one space


def edit_distance(a, b):
    """Levenshtein distance between two sequences (insertions, deletions, substitutions cost 1)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def error_rate(refs, hyps, unit='word'):
    """WER (unit 'word') or CER ('char'): total edit distance / total reference length over the set."""
    split = str.split if unit == 'word' else (lambda s: list(s))
    edits = sum(edit_distance(split(r), split(h)) for r, h in zip(refs, hyps))
    return edits / max(sum(len(split(r)) for r in refs), 1)


def classification_metrics(labels, preds, n_classes):
    """accuracy; for two classes also F1 of class 1 and Matthews' correlation (GLUE's metrics for MRPC/QQP and CoLA)."""
    labels, preds = torch.as_tensor(labels), torch.as_tensor(preds)
    out = dict(accuracy=(labels == preds).float().mean().item())
    if n_classes == 2:
        tp, tn = ((preds == 1) & (labels == 1)).sum().item(), ((preds == 0) & (labels == 0)).sum().item()
        fp, fn = ((preds == 1) & (labels == 0)).sum().item(), ((preds == 0) & (labels == 1)).sum().item()
        out['f1'] = 2 * tp / max(2 * tp + fp + fn, 1)
        out['mcc'] = (tp * tn - fp * fn) / max(((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5, 1e-12)
    return out

# -------------------------------------------------------------------------------------------- train and evaluate


def loss_fn(model, batch, cfg, label_smoothing):
    source, padding_mask, labels, lengths, time_mask, channel_mask = batch
    logits, frame_padding = model(source, padding_mask, time_mask, channel_mask)
    if cfg.task == 'ctc':                                          # fairseq: summed over the batch, / sentences
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)                 # (T, B, V)
        frames = torch.full((len(logits),), logits.shape[1]) if frame_padding is None else (~frame_padding).sum(1)
        return F.ctc_loss(log_probs, labels, frames, lengths, blank=0, reduction='sum', zero_infinity=True) / len(logits)
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


@torch.no_grad()
def evaluate(model, loader, cfg, classes, device, autocast):
    """Metrics over the held-out set; an unreadable example is left out (its error is printed), or stops the run (--strict-data)."""
    model.eval()
    refs, hyps = [], []
    for batch, errors in tqdm(loader, desc='evaluating', leave=False):
        for e in errors:
            tqdm.write(f'left an unreadable held-out example out of the metrics: {e}')
        if batch is None:
            continue
        source, padding_mask, labels, lengths = (t.to(device) if t is not None else None for t in batch[:4])
        with autocast:
            logits, frame_padding = model(source, padding_mask)
        if cfg.task == 'ctc':
            best = logits.argmax(-1).cpu()                                         # (B, T)
            frames = [best.shape[1]] * len(best) if frame_padding is None else (~frame_padding).sum(1).tolist()
            refs += [''.join(CTC_VOCAB[i] for i in t).replace('|', ' ') for t in labels.cpu().split(lengths.tolist())]
            hyps += [ctc_greedy_decode(b[:n].tolist()) for b, n in zip(best, frames)]
        else:
            refs += labels.tolist()
            hyps += logits.argmax(-1).tolist()
    if cfg.task == 'ctc':
        return dict(wer=error_rate(refs, hyps, 'word'), cer=error_rate(refs, hyps, 'char')), list(zip(refs, hyps))[:3], len(refs)
    return classification_metrics(refs, hyps, len(classes)), [], len(refs)


# what a resumed run may change (checkpoint.resume_changes)
RESUMABLE = ('steps', 'out', 'test_data', 'device', 'workers', 'log_every', 'ckpt_every', 'max_bad_steps', 'strict_data')


def main(argv=None):
    cfg = parse_args(argv)
    out, ckpt_path = Path(cfg.out), Path(cfg.out) / 'checkpoint.pt'
    check_writable(out)                                                       # now, not after training
    state = open_checkpoint(ckpt_path, cfg.resume)                           # an interrupted fine-tune's
    mcfg, ckpt, tokenizer, preset = load_encoder(cfg)
    fill_recipe(cfg, preset)
    changes = resume_changes(state['config']['finetune'], asdict(cfg), RESUMABLE, ckpt_path) if state else []
    seed_all(cfg.seed)
    device, cuda, autocast = pick_device(cfg.device)
    train_set, test_set, classes = load_data(cfg, mcfg, tokenizer)
    model = Finetuner(build_backbone(mcfg, ckpt, cfg), len(CTC_VOCAB) if cfg.task == 'ctc' else len(classes), cfg.task).to(device)
    model.backbone.requires_grad_(not cfg.linear_probe)
    if cfg.modality == 'speech':
        model.backbone.feature_encoder.conv_layers.requires_grad_(False)      # wav2vec 2.0 feature_grad_mult 0: conv frozen
    betas = (0.9, 0.999) if cfg.modality == 'vision' else (0.9, 0.98)
    optimizer = torch.optim.AdamW(layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay), lr=cfg.lr, betas=betas,
                                  eps=1e-8, **(dict(fused=True) if cuda else dict(foreach=True)))
    step, consumed, loop = 0, 0, dict(loss_sum=torch.zeros(()), skipped_updates=0, bad_samples=0, in_a_row=0)
    if state and state['step'] > cfg.steps:
        raise CheckpointError(f'--steps {cfg.steps}: {ckpt_path} is already at step {state["step"]}')
    if state:
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        step, consumed, loop = state['step'], state['data']['consumed'], state['loop']
        set_rng_state(state['rng'], device)
        print(f'resuming {ckpt_path} at step {step} of {cfg.steps}' + (f'; changed: {", ".join(changes)}' if changes else ''))
    to_batch = partial(collate, cfg=cfg, mcfg=mcfg, pad_id=mcfg.pad_id)
    data = batches(train_set, partial(to_batch, train=True), min(cfg.batch_size, len(train_set)), cfg.seed, workers=cfg.workers,
                   pin=cuda, start=consumed, strict=cfg.strict_data, init_fn=ignore_stop_signals)
    unreadable = getattr(train_set.base, 'unreadable', [])                  # left out at start-up
    test_skipped = getattr(test_set.base, 'unreadable', []) if test_set.base is not train_set.base else []

    init = 'scratch' if ckpt is None else f'{cfg.init} ({"teacher" if cfg.use_teacher else "student"}, step {ckpt["step"]})'
    print(f'{cfg.modality} {cfg.task}{" (linear probe)" if cfg.linear_probe else ""} from {init}: {len(train_set)} labelled '
          f'training and {len(test_set)} held-out examples{f", {len(classes)} classes" if classes else ""}; '
          f'{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f} M trainable parameters')
    for what, errors in (('training', unreadable), ('held-out', test_skipped)):
        if errors:
            print(f'skipped {len(errors)} unreadable {what} files (--strict-data stops instead), e.g. {errors[0]}')
    log, _ = resume_log(out / 'log.jsonl', step, state)
    log.writelines(json.dumps(dict(step=0, event='bad sample', error=e)) + '\n' for e in ([] if state else unreadable))
    loss_sum, skipped, in_a_row, t0 = loop['loss_sum'].to(device), loop['skipped_updates'], loop['in_a_row'], time.time()
    bad = loop['bad_samples'] if state else len(unreadable)                  # start-up skips count too
    last_ckpt = step if state else 0

    def checkpoint_now():                                                     # the whole state, to resume exactly
        save(ckpt_path, dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, classes=classes,
                             config=dict(model=asdict(mcfg), finetune=asdict(cfg)), rng=rng_state(device),
                             data=dict(consumed=consumed), loop=dict(loss_sum=loss_sum.cpu(), skipped_updates=skipped, bad_samples=bad,
                                                                     in_a_row=in_a_row)))

    with StopSignal() as stop, tqdm(total=cfg.steps, initial=step, desc='fine-tuning', dynamic_ncols=True) as pbar:
        while step < cfg.steps:
            batch, errors = next(data)                                        # errors: unreadable samples, replaced
            consumed, bad = consumed + 1, bad + len(errors)
            for e in errors:
                log.write(json.dumps(dict(step=step + 1, event='bad sample', error=e)) + '\n')   # read for update step + 1
                tqdm.write(f'skipped an unreadable sample (--strict-data stops instead): {e}')
            model.frozen = cfg.linear_probe or step < cfg.freeze_steps
            model.train()
            if cfg.linear_probe:
                model.backbone.eval()                                             # no dropout in a frozen encoder
            for group in optimizer.param_groups:
                group['lr'] = lr_at(step, cfg) * group['lr_scale']
            batch = to_device(batch, device)
            with autocast:
                loss = loss_fn(model, batch, cfg, cfg.label_smoothing)
            loss.backward()
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None], foreach=True)
            applied = update_is_finite(loss, norm)                            # NaN/Inf: skip the update
            if applied:
                optimizer.step()
                step, in_a_row, loss_sum = step + 1, 0, loss_sum + loss.detach()
                pbar.update()
            else:
                skipped, in_a_row = skipped + 1, in_a_row + 1
                event, message = skipped_update(step + 1, loss, norm, in_a_row, skipped, cfg.max_bad_steps)
                log.write(json.dumps(event) + '\n')
                tqdm.write(message)
            optimizer.zero_grad(set_to_none=True)
            if applied and (step % cfg.log_every == 0 or step == cfg.steps):
                n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                rec = dict(step=step, loss=loss_sum.item() / n, lr=lr_at(step - 1, cfg), skipped_updates=skipped,
                           bad_samples=bad, elapsed_s=time.time() - t0)
                loss_sum.zero_()
                log.write(json.dumps(rec) + '\n')
                pbar.set_postfix(loss=f'{rec["loss"]:.3f}')
            log.flush()
            if in_a_row >= cfg.max_bad_steps:
                raise too_many_bad_steps(in_a_row, cfg.max_bad_steps, ckpt_path, last_ckpt)
            if applied and (step % cfg.ckpt_every == 0 or step == cfg.steps):   # the last one: evaluation may be killed
                checkpoint_now()
                last_ckpt = step
            if stop_agreed(stop, device) and step < cfg.steps:                # SIGTERM/SIGINT: save at this step boundary
                checkpoint_now()
                pbar.close()
                print(f'{stop.name}: saved {ckpt_path} at step {step} of {cfg.steps}. To continue: '
                      f'{resume_hint("finetune.py", argv or sys.argv[1:])}', file=sys.stderr)
                raise SystemExit(128 + stop.signum)
    log.close()
    save(out / 'finetuned.pt', dict(model=model.state_dict(), config=dict(model=asdict(mcfg), finetune=asdict(cfg)), classes=classes))
    held_out = MicroBatches(test_set, [list(range(i, min(i + 64, len(test_set)))) for i in range(0, len(test_set), 64)],
                            partial(to_batch, train=False), strict=cfg.strict_data, fill=False)   # no repeats in the metrics
    metrics, examples, n_test = evaluate(model, torch.utils.data.DataLoader(held_out, batch_size=None, num_workers=cfg.workers),
                                         cfg, classes, device, autocast)
    name = 'wer' if cfg.task == 'ctc' else 'accuracy'
    result = dict(modality=cfg.modality, task=cfg.task, metric=name, value=metrics[name], metrics=metrics, init=init,
                  linear_probe=cfg.linear_probe, steps=cfg.steps, labeled=len(train_set), test_examples=n_test,
                  test_unreadable=len(test_set) - n_test + len(test_skipped), skipped_updates=skipped, bad_samples=bad,
                  seed=cfg.seed, config=asdict(cfg), seconds=time.time() - t0)
    (out / 'metrics.json').write_text(json.dumps(result, indent=2))
    ckpt_path.unlink(missing_ok=True)                                         # finished: finetuned.pt holds the result
    for ref, hyp in examples:
        print(f'  ref: {ref}\n  hyp: {hyp}')
    print(f'{cfg.modality} {cfg.task} | {name} {metrics[name]:.4f} | ' + ' '.join(f'{k} {v:.4f}' for k, v in metrics.items() if k != name)
          + f' | init {"scratch" if ckpt is None else "pretrained"}{" (probe)" if cfg.linear_probe else ""} | {len(train_set)} '
          f'labelled | {cfg.steps} steps | seed {cfg.seed} | {time.time() - t0:.0f} s → {out}/metrics.json')


if __name__ == '__main__':
    try:
        main()
    except (DataError, CheckpointError) as e:
        sys.exit(f'finetune.py: error: {str(e).strip().splitlines()[-1].removeprefix("data.DataError: ")}')

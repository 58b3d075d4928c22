"""data2vec fine-tuning: does the pretrained encoder help a downstream task with few labels?

    python finetune.py --modality speech --init runs/speech/checkpoint.pt           # letter CTC on the embedded speech: WER, CER
    python finetune.py --modality speech --task classify --data DIR --init CKPT     # DIR/<label>/<clip>.wav (Speech Commands)
    python finetune.py --modality vision --init runs/vision/checkpoint.pt --linear-probe
    python finetune.py --modality text --init CKPT --data trec/train.txt --test-data trec/test.txt --encoding latin-1
    python finetune.py --modality text --init scratch                               # the same architecture, random weights
    torchrun --nproc_per_node 8 finetune.py --modality vision --preset base --init CKPT --data DIR --micro-batch-size 32

--batch-size is one update's examples (vision base: 1024) whatever the number of processes: each of the `world`
processes (torchrun; DDP averages their gradients) accumulates batch / (micro-batch × world) micro-batches of
--micro-batch-size examples (default batch / world: no accumulation), its share of one stream of micro-batches
(data.batches), so 8 GPUs make the update that one process accumulating all of them would (tests/test_finetune_ddp.py).
Above: 1024 = 32 × 4 accumulation × 8 GPUs. Rank 0 alone prints, evaluates and writes the outputs.

The heads are the papers' (HEADS): speech CTC = Linear on the last block, per frame (wav2vec 2.0); speech classify =
mean over the valid frames → BatchNorm (no affine) → Linear; vision = mean of the last block's patch tokens → LayerNorm
→ Linear (BEiT use_mean_pooling); text = RoBERTa's classification head on <s>: Dropout → Linear → tanh → Dropout → Linear
(--pool mean: speech classify's head on the mean over the tokens instead, a linear probe).
Flags and recipes are in config.py; each modality's labelled data and batches in data/<modality>.py.
Outputs in --out: metrics.json, log.jsonl, finetuned.pt.
"""
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from checkpoint import (CheckpointError, RunState, StopSignal, ignore_stop_signals, load, resume_changes, save, seed_all,
                        update_is_finite)
from config import PRESETS, FinetuneConfig, ModelConfig, fill_recipe, lr_at, parse_finetune_args, pick_device, to_device  # noqa: F401
from data import DataError, MicroBatches, batches
from data.labelled import load_data
from data.speech import CTC_VOCAB
from model import build_student, trunc_normal_
from released import is_released, load_released
from teacher import Teacher

RECIPE_OF = {'large': 'base', 'small': 'tiny'}                     # the fine-tuning recipe of a pretraining preset
# what a resumed run may change (checkpoint.resume_changes)
RESUMABLE = ('steps', 'out', 'test_data', 'device', 'workers', 'log_every', 'ckpt_every', 'max_bad_steps', 'strict_data')

# -------------------------------------------------------------------------------------------- the encoder


def load_encoder(cfg):
    """(ModelConfig, checkpoint dict or None, recipe preset). From a train.py checkpoint, a released model's folder
    (released.py: the checkpoint dict then holds `released`, with its head), or randomly initialised (--init scratch)
    with the preset's architecture."""
    if is_released(cfg.init):
        if cfg.use_teacher:
            raise DataError(f'--use-teacher: {cfg.init} is a released model, which has no teacher')
        rel = load_released(cfg.init)
        if rel.mcfg.modality != cfg.modality:
            raise DataError(f'--init {cfg.init}: a {rel.mcfg.modality} model; --modality is {cfg.modality}')
        return rel.mcfg, dict(student=rel.encoder, step='released', released=rel), cfg.preset or 'base'
    if cfg.init == 'scratch' and cfg.use_teacher:
        raise DataError('--use-teacher needs a checkpoint, not --init scratch')
    if cfg.init == 'scratch' and cfg.arch:                          # a train.py run's architecture, random weights
        try:
            saved = json.loads(Path(cfg.arch).read_text())
            mcfg = ModelConfig(**saved['model'])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f'--arch {cfg.arch}: not a train.py config.json ({type(e).__name__}: {str(e)[:200]})') from None
        if mcfg.modality != cfg.modality:
            raise DataError(f'--arch {cfg.arch}: a {mcfg.modality} architecture; --modality is {cfg.modality}')
        return mcfg, None, cfg.preset or RECIPE_OF.get(saved['train']['preset'], saved['train']['preset'])
    if cfg.init == 'scratch':
        preset = cfg.preset or 'tiny'
        arch = {k: v for k, v in PRESETS[cfg.modality][preset].items() if k in ModelConfig.__dataclass_fields__}
        return ModelConfig(**{**arch, 'modality': cfg.modality, **({'image_size': cfg.image_size} if cfg.image_size else {})}), None, preset
    path = Path(cfg.init)
    if not path.is_file():
        raise DataError(f'--init {path}: no such file (a train.py checkpoint.pt, a released model\'s folder, or scratch)')
    try:
        ckpt = load(path)                                                 # weights_only: tensors and plain types, runs no code
        saved, mcfg, _ = ckpt['config'], ModelConfig(**ckpt['config']['model']), ckpt['student']
    except (CheckpointError, KeyError, TypeError) as e:
        raise DataError(f'--init {path}: not a train.py checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:300]})') from None
    if mcfg.modality != cfg.modality:
        raise DataError(f'--init {path}: a {mcfg.modality} checkpoint; --modality is {cfg.modality}')
    if not any(k.startswith('front_end.') for k in ckpt['student']):
        raise DataError(f'--init {path}: written before the front-end layout of 2026-11-30 (its weights are named '
                        f'{next(iter(ckpt["student"]))}, …, not front_end.…); pretrain again with this version')
    if cfg.image_size and cfg.image_size != mcfg.image_size:
        raise DataError(f'--image-size {cfg.image_size}: --init {path} was pretrained on {mcfg.image_size}² images '
                        '(the relative position table fixes the grid); leave --image-size out')
    return mcfg, ckpt, cfg.preset or RECIPE_OF.get(saved['train']['preset'], saved['train']['preset'])


def build_backbone(mcfg, ckpt, cfg):
    """The student without its regression head, with the fine-tuning dropouts, and the checkpoint's weights (the
    EMA teacher's for the parts it averages, with --use-teacher: its keys are the student's)."""
    mcfg.drop_path = cfg.drop_path if cfg.drop_path >= 0 else mcfg.drop_path
    mcfg.layerdrop = cfg.layerdrop if cfg.layerdrop >= 0 else mcfg.layerdrop
    model = build_student(mcfg)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt['student'], strict='released' not in ckpt)   # released: checked by released.py
            if cfg.use_teacher:
                expected = list(Teacher.averaged_part(model).state_dict())
                if sorted(ckpt['teacher']) != sorted(expected):
                    raise DataError(f'--init {cfg.init}: its teacher holds {len(ckpt["teacher"])} tensors, the '
                                    f'architecture averages {len(expected)} ({sorted(set(expected) ^ set(ckpt["teacher"]))[:3]} …)')
                model.load_state_dict(ckpt['teacher'], strict=False)         # the EMA's part; the rest stays the student's
        except RuntimeError as e:
            raise DataError(f'--init {cfg.init}: the weights do not fit the architecture in its config '
                            f'({str(e).splitlines()[1].strip()[:200]})') from None
    delattr(model, model.head)                                                # pretraining only: the head or decoder
    return model


def masked_mean(x, padding_mask):
    """Mean over the valid steps: x (B, T, D), padding_mask (B, T) True = padding, or None → (B, D)."""
    if padding_mask is None:
        return x.mean(1)
    x = x.masked_fill(padding_mask[..., None], 0.0)                           # (B, T, D)
    return x.sum(1) / (~padding_mask).sum(1, keepdim=True).clamp(min=1)


class CTCHead(nn.Module):
    """wav2vec 2.0: a Linear per frame → letter logits (B, T, V), and the frame padding."""

    def __init__(self, cfg, n_out):
        super().__init__()
        self.proj = nn.Linear(cfg.dim, n_out)

    def forward(self, x, padding_mask):
        return self.proj(x), padding_mask


class PooledHead(nn.Module):
    """Clip classification (text: --pool mean): mean over the valid frames or tokens → BatchNorm without affine (MAE's
    linear probe; DEVIATIONS.md) → Linear.

    Under DDP every process normalises its own micro-batch, as one process accumulating micro-batches does (not
    SyncBatchNorm, which would normalise over every rank's and so differ from one process at the same micro-batch).
    The running statistics that evaluation reads are rank 0's: DDP copies rank 0's buffers to the other ranks at the
    first forward pass of every update, so they follow rank 0's micro-batches only."""

    def __init__(self, cfg, n_out):
        super().__init__()
        self.pool_norm, self.proj = nn.BatchNorm1d(cfg.dim, affine=False), nn.Linear(cfg.dim, n_out)

    def forward(self, x, padding_mask):
        return self.proj(self.pool_norm(masked_mean(x, padding_mask))), None  # (B, C)


class BEiTHead(nn.Module):
    """BEiT use_mean_pooling: mean of the patch tokens → fc_norm → Linear, its weights trunc_normal × init_scale 0.001."""

    def __init__(self, cfg, n_out):
        super().__init__()
        self.fc_norm, self.proj = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps or 1e-6), nn.Linear(cfg.dim, n_out)
        trunc_normal_(self.proj.weight)
        self.proj.weight.data.mul_(0.001)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, padding_mask):
        return self.proj(self.fc_norm(x.mean(1))), None                       # (B, C)


class RobertaHead(nn.Module):
    """RobertaClassificationHead on <s>: Dropout → Linear(D, D) → tanh → Dropout → Linear(D, C)."""

    def __init__(self, cfg, n_out):
        super().__init__()
        self.proj = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.dim, cfg.dim), nn.Tanh(), nn.Dropout(cfg.dropout),
                                  nn.Linear(cfg.dim, n_out))

    def forward(self, x, padding_mask):
        return self.proj(x[:, 0]), None                                       # (B, C)


HEADS = {('speech', 'ctc'): CTCHead, ('speech', 'classify'): PooledHead, ('vision', 'classify'): BEiTHead,
         ('text', 'classify'): RobertaHead}


class Finetuner(nn.Module):
    """The pretrained encoder and a task head (HEADS). `frozen`: the encoder runs without gradients (linear probe,
    first updates). The head reads the last block's output (before BEiT's final norm: the head has its own), or
    (`layers`) a mix of every block's output, as SUPERB's probes do:

        last:      h = x_L
        mean:      h = (1/L) Σ_l x_l
        weighted:  h = Σ_l softmax(w)_l · x_l,  w ∈ R^L learned with the head (starts at 0: the mean)
    """

    def __init__(self, backbone, n_out, task, layers='last', head=None):
        super().__init__()
        self.backbone, self.frozen, self.layers = backbone, False, layers
        self.head = (head or HEADS[backbone.cfg.modality, task])(backbone.cfg, n_out)   # head: text --pool mean's PooledHead
        if layers == 'weighted':
            self.layer_weights = nn.Parameter(torch.zeros(backbone.cfg.layers))

    def forward(self, source, padding_mask=None, **extra):
        """→ logits: ctc (B, T, V) and the frame padding (B, T) or None; classify (B, C) and None. extra: speech's
        SpecAugment masks (mask, channel_mask)."""
        with torch.no_grad() if self.frozen else nullcontext():              # the head always trains
            x, padding_mask = self.backbone.encode(source, padding_mask, final_norm=False, blocks=self.layers != 'last',
                                                   **extra)                   # (B, T, D), or every block's (L, B, T, D)
        if self.layers == 'mean':
            x = x.mean(0)                                                     # (B, T, D)
        elif self.layers == 'weighted':
            x = torch.einsum('l,lbtd->btd', self.layer_weights.softmax(0), x)  # (B, T, D)
        return self.head(x, padding_mask)


def layer_decay_groups(model, weight_decay, decay, no_decay_1d=False, head_scale=1.0):
    """BEiT param groups (get_num_layer_for_vit): with L blocks, block i (1-based) trains at lr × decay^(L + 1 − i), the
    front-end (feature encoder, patch embedding and tokens, embeddings) at decay^(L + 1), everything else (norms around
    the blocks, the shared relative position bias) at 1, and the head (with its layer weights) at head_scale.
    no_decay_1d (BEiT): no weight decay on 1-D parameters, the CLS token and the bias table; else everything decays
    (fairseq)."""
    L = len(model.backbone.encoder.layers)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if '.layers.' in name:
            layer = int(name.split('.layers.')[1].split('.')[0]) + 1
        elif name.startswith('backbone.front_end.') and 'rel_pos_bias' not in name:
            layer = 0
        else:
            layer = L + 1
        head = not name.startswith('backbone.')
        no_decay = no_decay_1d and (p.ndim == 1 or 'cls_token' in name or 'rel_pos_bias' in name)
        group = groups.setdefault((layer, no_decay, head), dict(params=[], weight_decay=0.0 if no_decay else weight_decay,
                                                                lr_scale=head_scale if head else decay ** (L + 1 - layer)))
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


def inputs(batch):
    """What the model reads of a labelled batch: everything but the targets."""
    return {k: v for k, v in batch.items() if k not in ('labels', 'lengths')}


def loss_fn(model, batch, cfg, label_smoothing):
    logits, frame_padding = model(**inputs(batch))
    if cfg.task == 'ctc':                                          # fairseq: summed over the batch, / sentences
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)                 # (T, B, V)
        frames = torch.full((len(logits),), logits.shape[1]) if frame_padding is None else (~frame_padding).sum(1)
        return F.ctc_loss(log_probs, batch['labels'], frames, batch['lengths'], blank=0, reduction='sum',
                          zero_infinity=True) / len(logits)
    return F.cross_entropy(logits.float(), batch['labels'], label_smoothing=label_smoothing)


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
        batch = to_device(batch, device)
        with autocast:
            logits, frame_padding = model(**inputs(batch))
        labels = batch['labels'].cpu()
        if cfg.task == 'ctc':
            best = logits.argmax(-1).cpu()                                         # (B, T)
            frames = [best.shape[1]] * len(best) if frame_padding is None else (~frame_padding).sum(1).tolist()
            refs += [''.join(CTC_VOCAB[i] for i in t).replace('|', ' ') for t in labels.split(batch['lengths'].tolist())]
            hyps += [ctc_greedy_decode(b[:n].tolist()) for b, n in zip(best, frames)]
        else:
            refs += labels.tolist()
            hyps += logits.argmax(-1).tolist()
    if cfg.task == 'ctc':
        return dict(wer=error_rate(refs, hyps, 'word'), cer=error_rate(refs, hyps, 'char')), list(zip(refs, hyps))[:3], len(refs)
    return classification_metrics(refs, hyps, len(classes)), [], len(refs)


def main(argv=None):
    cfg = parse_finetune_args(argv)
    ddp = 'RANK' in os.environ                                                # under torchrun
    if ddp:
        dist.init_process_group('nccl' if torch.cuda.is_available() and cfg.device != 'cpu' else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device, cuda, autocast = pick_device(cfg.device, int(os.environ.get('LOCAL_RANK', 0)))
    run = RunState(cfg.out, cfg.resume, rank, world, device)                # --out checked now; an interrupted run's checkpoint
    mcfg, ckpt, preset = load_encoder(cfg)
    released = ckpt.get('released') if ckpt else None
    for note in released.notes if released and run.master else []:
        print(f'{cfg.init}: {note}')
    own_head = cfg.steps == 0 and 'steps' in cfg.given                      # evaluate a released fine-tuned model as it is
    if own_head and not (released and released.task == cfg.task):
        raise DataError(f'--steps 0 scores a released model with its own {cfg.task} head; --init {cfg.init} has none '
                        f'({"a released " + (released.task or "encoder-only") + " model" if released else "not a released model"})')
    if own_head and (cfg.linear_probe or cfg.probe_layers != 'last'):
        raise DataError('--steps 0: the released head reads the last block; leave out --linear-probe and --probe-layers')
    if own_head:                                                              # nothing trains: all of one set is scored
        cfg.data = cfg.test_data = cfg.test_data or cfg.data
    if run.ckpt and 'micro_batch_size' not in cfg.given:                 # resumed, perhaps on another number of processes:
        cfg.micro_batch_size = run.ckpt['config']['finetune'].get('micro_batch_size', 0)   # the same micro-batches
    problem = fill_recipe(cfg, preset, mcfg.version, world)
    if problem:
        raise DataError(problem)
    accum = cfg.batch_size // (cfg.micro_batch_size * world)                 # the global batch does not depend on the GPU count
    changes = run.ckpt and resume_changes(run.ckpt['config']['finetune'], asdict(cfg), RESUMABLE, run.path,
                                          dict(micro_batch_size=cfg.batch_size))   # before the knob: the whole batch at once
    seed_all(cfg.seed)                                                        # the same head (and scratch weights) on every rank
    train_set, test_set, classes = load_data(cfg, mcfg, released.classes if own_head else None)
    model = Finetuner(build_backbone(mcfg, ckpt, cfg), len(CTC_VOCAB) if cfg.task == 'ctc' else len(classes), cfg.task,
                      cfg.probe_layers, PooledHead if cfg.pool == 'mean' else None).to(device)
    if own_head:
        model.head.load_state_dict({k.removeprefix('head.'): v for k, v in released.head.items()})   # strict: all of it
    model.backbone.requires_grad_(not cfg.linear_probe)
    for name in model.backbone.front_end.finetune_frozen:                     # speech: the conv layers (wav2vec 2.0)
        model.backbone.front_end.get_submodule(name).requires_grad_(False)
    optimizer = torch.optim.AdamW(layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay, cfg.no_decay_1d,
                                                     cfg.head_lr / cfg.lr), lr=cfg.lr,
                                  betas=(0.9, cfg.adam_beta2), eps=1e-8, **(dict(fused=True) if cuda else dict(foreach=True)))
    if ddp:
        seed_all(cfg.seed + rank)                          # different dropout on every rank; one process goes on as before

    def restore(state):
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
    resumed = run.restore(cfg.steps, restore)
    if resumed and run.master:
        print(resumed + (f'; changed: {", ".join(changes)}' if changes else ''))
    collate = partial(data.modality(cfg.modality).labelled_collate, cfg=cfg, mcfg=mcfg)
    stream = batches(train_set, partial(collate, train=True), min(cfg.micro_batch_size, len(train_set)), cfg.seed, rank, world,
                     cfg.workers, pin=cuda, start=run.consumed, strict=cfg.strict_data, init_fn=ignore_stop_signals)
    unreadable = getattr(train_set.base, 'unreadable', None) or []          # left out at start-up
    test_skipped = getattr(test_set.base, 'unreadable', None) or [] if test_set.base is not train_set.base else []
    init = ('scratch' if ckpt is None else f'{cfg.init} (released{", its own head" if own_head else ""})' if released else
            f'{cfg.init} ({"teacher" if cfg.use_teacher else "student"}, step {ckpt["step"]})')
    if run.master:
        print(f'{cfg.modality} {cfg.task}{" (linear probe)" if cfg.linear_probe else ""} from {init}: '
              f'{0 if own_head else len(train_set)} labelled training and {len(test_set)} held-out examples{f", {len(classes)} classes" if classes else ""}; '
              f'{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f} M trainable parameters; batch '
              f'{cfg.batch_size} = {cfg.micro_batch_size} × {accum} accumulation × {world} process{"es" if world > 1 else ""}')
        for what, errors in (('training', unreadable), ('held-out', test_skipped)):
            if errors:
                print(f'skipped {len(errors)} unreadable {what} files (--strict-data stops instead), e.g. {errors[0]}')
    # DDP waits for a gradient of every trainable parameter, and some get none: the whole encoder while it is frozen
    # (--freeze-steps: a forward under no_grad), and what fine-tuning never reads (v1 vision: the mask token and BEiT's
    # final LayerNorm, the head pools before it; v1 speech without SpecAugment: the mask embedding). find_unused_parameters
    # finds them in each forward pass's graph (a warning where there are none: text, v2) and leaves their .grad None, as
    # on one process, where AdamW then skips them.
    ddp_model = DDP(model, device_ids=[device.index] if cuda else None, find_unused_parameters=True) if ddp else model
    run.open_log(unreadable)

    def state():                                                              # the whole state, to resume exactly
        return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), classes=classes,
                    config=dict(model=asdict(mcfg), finetune=asdict(cfg)))
    t0 = time.time()
    with StopSignal() as stop, tqdm(total=cfg.steps, initial=run.step, disable=not run.master, desc='fine-tuning',
                                    dynamic_ncols=True) as bar:
        while run.step < cfg.steps:
            model.frozen = cfg.linear_probe or run.step < cfg.freeze_steps
            ddp_model.train()
            if cfg.linear_probe:
                model.backbone.eval()                                         # no dropout in a frozen encoder
            for group in optimizer.param_groups:
                group['lr'] = lr_at(run.step, cfg) * group['lr_scale']
            loss = 0
            for i in range(accum):                                            # as train.train_step
                batch, errors = next(stream)                                  # errors: unreadable samples, replaced
                run.took_batch(errors)
                sync = i == accum - 1 or not ddp                              # DDP averages the gradients over ranks once
                with (nullcontext() if sync else ddp_model.no_sync()), autocast:
                    micro_loss = loss_fn(ddp_model, to_device(batch, device), cfg, cfg.label_smoothing) / accum
                micro_loss.backward()
                loss = loss + micro_loss.detach()                             # this rank's mean over its micro-batches
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None], foreach=True)
            applied = update_is_finite(loss, norm)                            # NaN/Inf on any rank: skip the update
            if applied:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.after_update(applied, loss, norm, cfg.max_bad_steps)
            bar.update(int(applied))
            if run.due(cfg.log_every, cfg.steps, applied):
                loss_sum = run.loss_sum.clone()
                if ddp:
                    dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)           # over the ranks: the whole batches'
                rec = run.log(loss=loss_sum.item() / (run.step - run.last_log), lr=lr_at(run.step - 1, cfg),
                              elapsed_s=time.time() - t0)
                bar.set_postfix(loss=f'{rec["loss"]:.3f}')
            if run.due(cfg.ckpt_every, cfg.steps, applied):                   # the last one: evaluation may be killed
                run.save(state())
            run.stop_if_signalled(stop, cfg.steps, state, 'finetune.py', argv or sys.argv[1:], bar)
    if ddp:                                # every rank reaches the end before any tears gloo down; rank 0 goes on alone
        dist.barrier()
        dist.destroy_process_group()
    if not run.master:
        return
    run.log_file.close()
    save(run.out / 'finetuned.pt', dict(model=model.state_dict(), config=dict(model=asdict(mcfg), finetune=asdict(cfg)),
                                        classes=classes))
    held_out = MicroBatches(test_set, [list(range(i, min(i + 64, len(test_set)))) for i in range(0, len(test_set), 64)],
                            partial(collate, train=False), strict=cfg.strict_data, fill=False)   # no repeats in the metrics
    metrics, examples, n_test = evaluate(model, torch.utils.data.DataLoader(held_out, batch_size=None, num_workers=cfg.workers),
                                         cfg, classes, device, autocast)
    name = 'wer' if cfg.task == 'ctc' else 'accuracy'
    result = dict(modality=cfg.modality, task=cfg.task, metric=name, value=metrics[name], metrics=metrics, init=init,
                  linear_probe=cfg.linear_probe, steps=cfg.steps, labeled=0 if own_head else len(train_set), test_examples=n_test,
                  test_unreadable=len(test_set) - n_test + len(test_skipped), skipped_updates=run.skipped,
                  bad_samples=run.bad_samples, seed=cfg.seed, config=asdict(cfg), seconds=time.time() - t0)
    (run.out / 'metrics.json').write_text(json.dumps(result, indent=2))
    run.path.unlink(missing_ok=True)                                          # finished: finetuned.pt holds the result
    for ref, hyp in examples:
        print(f'  ref: {ref}\n  hyp: {hyp}')
    print(f'{cfg.modality} {cfg.task} | {name} {metrics[name]:.4f} | ' + ' '.join(f'{k} {v:.4f}' for k, v in metrics.items() if k != name)
          + f' | init {"scratch" if ckpt is None else "released" if released else "pretrained"}{" (probe)" if cfg.linear_probe else ""} | '
          f'{0 if own_head else len(train_set)} '
          f'labelled | {cfg.steps} steps | seed {cfg.seed} | {time.time() - t0:.0f} s → {run.out}/metrics.json')


if __name__ == '__main__':
    try:
        main()
    except (DataError, CheckpointError) as e:
        sys.exit(f'finetune.py: error: {str(e).strip().splitlines()[-1].removeprefix("data.DataError: ")}')

"""data2vec pretraining, one flat script (read top to bottom, like nanoGPT's train.py).

    python train.py --modality speech                     # or vision, text: tiny preset, CPU, embedded data, ≤ 5 min
    torchrun --nproc_per_node 8 train.py --modality speech --preset base --data /path/to/LibriSpeech --compile

Sections: config → data → the data2vec step → checkpoint and curves → main (device/DDP, models, loop).
Outputs in --out: config.json, log.jsonl, checkpoint.pt, curves.png.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (CheckpointError, StopSignal, check_writable, gather, ignore_stop_signals, open_checkpoint, resume_changes,
                        resume_hint, resume_log, rng_state, save, seed_all, set_rng_state, skipped_update, stop_agreed,
                        too_many_bad_steps, update_is_finite)
from data import DataError, batches
from data.speech import MIN_SECONDS, SR, AudioFolder, SyntheticSpeech, crop_and_pad
from data.text import (SPECIALS, SyntheticText, TokenBlocks, ordinary_ids, pack_blocks, read_corpus, read_tokenizer,
                       tokenizer_cache_path, train_tokenizer)
from data.vision import ImageFolder, SyntheticImages, augment
from encoders import conv_output_length
from masking import block_mask, span_mask, token_mask
from model import TAPS, Data2Vec, ModelConfig, regression_loss
from teacher import ema_decay_at, ema_update_, make_teacher, teacher_targets

# -------------------------------------------------------------------------------------------- config


def knob(default, help):
    return field(default=default, metadata=dict(help=help))


@dataclass
class TrainConfig:
    """Everything but the architecture. Defaults are data2vec Base for speech (paper + fairseq base_librispeech.yaml)."""
    preset: str = knob('tiny', "tiny: CPU, embedded data, ≤ 5 min | base | large: the paper's models")
    data: str = knob('', 'speech: folder of .wav/.flac (LibriSpeech layout); vision: ImageFolder tree (<class>/<image>.png|jpg); '
                         'text: a .txt file or folder (a document per paragraph); empty: the embedded synthetic set')
    encoding: str = knob('utf-8', 'text: the encoding of --data files')
    tokenizer: str = knob('', 'text: a GPT-2/RoBERTa vocab.json + merges.txt folder, or a tokenizer.json; empty: train a BPE')
    out: str = knob('', 'output folder (default runs/<modality>)')
    device: str = knob('auto', 'auto | cpu | cuda')
    compile: bool = knob(False, 'torch.compile the student and the teacher')
    seed: int = knob(0, 'random seed')
    # targets and loss: the paper's ablation axes
    top_k: int = knob(8, 'K: average the top-K teacher blocks (Figure 2)')
    target_layer: str = knob('ffn', 'which tensor of each teacher block: ' + ' | '.join(TAPS) + ' (Table 5)')
    target_norm: str = knob('instance', 'per-block normalisation of targets: instance (over time) | layer | none')
    target_post_norm: str = knob('none', 'normalisation of the average of the K blocks: none | layer | instance')
    teacher_context: int = knob(0, 'W: the teacher attends to ±W frames only; 0 = the whole input (Figure 3)')
    loss_beta: float = knob(0.0, 'β: 0 = L2, > 0 = Smooth L1 with this β (Table 7)')
    loss_scale: float = knob(0.0, 'multiplies the per-step loss summed over channels; 0 = 1/√D (fairseq), -1 = 1/D (a mean: BEiT)')
    # masking
    mask_prob: float = knob(0.65, 'speech: fairseq mask_prob, span starts are p = mask_prob / mask_length of the frames '
                                  '(Table 8); vision: the fraction of patches masked')
    mask_length: int = knob(10, 'speech: frames per masked span (Table 8); vision: fewest patches per masked block')
    min_crop_scale: float = knob(0.08, 'vision: random resized crops cover this fraction of the image or more')
    text_mask: str = knob('bert', 'text: bert (15%: 80% <mask>, 10% random, 10% kept; the paper) | span (0.35 × 4 tokens, all '
                                  '<mask>; the fairseq config). Sets --mask-prob/--mask-length unless given')
    block_size: int = knob(512, 'text: tokens per training sequence, <s> and </s> included')
    # teacher EMA: τ goes linearly τ0 → τe over τn updates, then stays
    ema_start: float = knob(0.999, 'τ0')
    ema_end: float = knob(0.9999, 'τe')
    ema_anneal_steps: int = knob(30_000, 'τn')
    # optimisation: Adam with decoupled weight decay
    schedule: str = knob('tri_stage', 'learning-rate schedule: tri_stage (fairseq) | cosine (BEiT)')
    lr: float = knob(5e-4, 'peak learning rate')
    min_lr: float = knob(1e-5, 'cosine: the final learning rate')
    weight_decay: float = knob(0.01, 'decoupled weight decay')
    adam_beta2: float = knob(0.98, 'Adam β2 (β1 = 0.9)')
    adam_eps: float = knob(1e-6, 'Adam ε')
    warmup: float = knob(0.03, 'fraction of steps warming up linearly (tri-stage: from lr/100; cosine: from 0)')
    hold: float = knob(0.9, 'tri-stage: fraction held at lr; the rest decays exponentially to lr/100')
    clip: float = knob(0.0, 'gradient-norm clipping; 0 = off (fairseq speech)')
    steps: int = knob(400_000, 'optimizer updates')
    batch_size: int = knob(320, 'samples per update over all GPUs and accumulation steps (speech: 320 × 12.3 s LibriSpeech mean ≈ 63 min)')
    micro_batch_size: int = knob(10, 'samples per forward pass on one device (speech: 10 × ≤ 20 s ≤ fairseq 3.8M samples); '
                                     'accumulation does the rest')
    crop: int = knob(320_000, 'longest waveform in samples; longer ones are cropped at random (fairseq max_sample_size)')
    pad: bool = knob(False, 'speech: crop each clip to at most --crop and pad to the longest of its micro-batch (a padding mask); '
                            'default: crop every clip to the shortest one, as fairseq does, so nothing is padded')
    crop_step: int = knob(16_000, 'speech: the shortest clip\'s length is rounded down to a multiple of this (1 s), so that '
                                  'torch.compile meets at most --crop / --crop-step shapes')
    workers: int = knob(4, 'data-loader worker processes')
    log_every: int = knob(200, 'steps between log lines')
    ckpt_every: int = knob(25_000, 'steps between checkpoints (one is always written at the end)')
    # surviving failures (README, "Resuming and failures")
    resume: bool = knob(False, 'continue from --out/checkpoint.pt exactly (weights, teacher, optimizer, step, RNG, data position); '
                               'without one, start. Without --resume an existing checkpoint.pt is an error, never overwritten')
    max_bad_steps: int = knob(10, 'stop after this many consecutive updates skipped for a NaN/Inf loss or gradient')
    strict_data: bool = knob(False, 'stop at the first unreadable sample instead of skipping it and logging its file')


# data2vec vision v1 (data2vec_vision/beit README command; paper where the two differ, README Deviations)
VISION_BASE = dict(dropout=0.0, attn_dropout=0.05, layerdrop=0.0, drop_path=0.2, layer_scale=1e-4,
                   top_k=6, target_layer='block', target_norm='layer', target_post_norm='layer', loss_beta=2.0, loss_scale=-1,
                   mask_prob=120 / 196, mask_length=16, ema_start=0.9998, ema_end=0.9998, ema_anneal_steps=0,  # τ constant
                   schedule='cosine', lr=2e-3, min_lr=1e-5, weight_decay=0.05, adam_beta2=0.999, adam_eps=1e-8, clip=3.0,
                   warmup=0.05, steps=500_000, batch_size=2048, micro_batch_size=128, workers=10, log_every=500,
                   ckpt_every=10_000)  # 800 epochs of ImageNet-1k at 2048 = 625 updates each, 40 of them warm-up

# data2vec text v1 (paper; fairseq config text/pretraining/base.yaml where the paper is silent, README Deviations)
TEXT_BASE = dict(vocab_size=50_000, layerdrop=0.0, top_k=10, target_layer='ffn', target_norm='layer', loss_beta=4.0, loss_scale=1.0,
                 text_mask='bert', mask_prob=0.15, mask_length=1, ema_anneal_steps=100_000, lr=2e-4, warmup=0.05, hold=0.8,
                 clip=5.0, steps=1_000_000, batch_size=256, micro_batch_size=16, block_size=512, workers=2, log_every=500,
                 ckpt_every=25_000)   # 256 blocks of 512 tokens per update; Adam (0.9, 0.98), ε 1e-6, wd 0.01 as speech

PRESETS = {
    'speech': {
        # tiny: ~1 M parameters, ≤ 5 min on 2 CPU cores. 1 s crops of the 1–4 s corpus need no padding, so every row is masked ≈ 49%.
        'tiny': dict(dim=128, layers=4, heads=4, ffn_dim=512, conv_dim=32, layerdrop=0.0, top_k=3, lr=2e-3, warmup=0.1, hold=0.4,
                     steps=400, batch_size=16, micro_batch_size=16, crop=16_000, ema_anneal_steps=400, workers=0,
                     log_every=10, ckpt_every=100),
        'base': dict(),                                                # the dataclass defaults
        'large': dict(dim=1024, layers=24, heads=16, ffn_dim=4096),
    },
    'vision': {
        # tiny: 32² images in 4² patches (an 8 × 8 grid, 39 of 64 masked in blocks of ≥ 5), ≤ 5 min on 2 CPU cores
        'tiny': dict(VISION_BASE, image_size=32, patch_size=4, dim=128, layers=4, heads=4, ffn_dim=512, drop_path=0.1, top_k=3,
                     mask_length=5, ema_start=0.995, ema_end=0.995, min_crop_scale=0.35, steps=300, batch_size=64,
                     micro_batch_size=64, warmup=0.1, workers=0, log_every=10, ckpt_every=100),
        'base': VISION_BASE,                                           # ViT-B/16
        'large': dict(VISION_BASE, dim=1024, layers=24, heads=16, ffn_dim=4096),  # ViT-L/16
    },
    'text': {
        # tiny: a 1,500-token BPE on the embedded grammar corpus, blocks of 64 tokens, ≤ 5 min on 2 CPU cores
        'tiny': dict(TEXT_BASE, vocab_size=1500, max_tokens=64, block_size=64, dim=128, layers=4, heads=4, ffn_dim=512, top_k=3,
                     ema_anneal_steps=300, lr=1e-3, warmup=0.1, hold=0.4, steps=300, batch_size=32, micro_batch_size=32,
                     workers=0, log_every=10, ckpt_every=100),
        'base': TEXT_BASE,                                             # RoBERTa-base
        'large': dict(TEXT_BASE, dim=1024, layers=24, heads=16, ffn_dim=4096),
    },
}


ONLY = {'speech': ('crop', 'pad', 'crop_step', 'conv_dim', 'pos_conv_depth', 'pos_conv_kernel', 'pos_conv_groups', 'layerdrop',
                   'teacher_context'),
        'vision': ('image_size', 'patch_size', 'layer_scale', 'drop_path', 'min_crop_scale'),
        'text': ('encoding', 'tokenizer', 'text_mask', 'block_size', 'vocab_size', 'max_tokens', 'pad_id', 'layerdrop',
                 'teacher_context')}


def parse_args(argv=None):
    """Flags are generated from the two dataclasses, so every knob is written once. Order: defaults < preset < flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--modality', default='speech')
    modality = pre.parse_known_args(argv)[0].modality
    presets = PRESETS.get(modality, PRESETS['speech'])
    p = argparse.ArgumentParser(description=f'data2vec pretraining. Every flag defaults to its --preset value (tiny unless '
                                            f'given); [base …, tiny …] shows them for --modality {modality}.')
    for f in fields(ModelConfig) + fields(TrainConfig):
        kind = type(f.default) if f.default is not MISSING else str
        kw = dict(action=argparse.BooleanOptionalAction) if kind is bool else dict(type=kind)
        base, tiny = presets['base'].get(f.name, f.default), presets['tiny'].get(f.name, f.default)
        shown = f'[base {base!r}' + (f', tiny {tiny!r}]' if tiny != base else ']')
        shown = '' if f.name in ('modality', 'preset', 'data', 'out', 'device', 'compile', 'seed', 'resume', 'strict_data', 'pad') else shown
        text = f"{f.metadata.get('help', 'architecture')} {shown}".replace('%', '%%')   # argparse formats help with %
        p.add_argument('--' + f.name.replace('_', '-'), default=None, help=text, **kw)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    preset = args.get('preset', 'tiny')
    if modality not in PRESETS:
        p.error(f'--modality {modality}: choose from {", ".join(PRESETS)}')
    if preset not in presets:
        p.error(f'--preset {preset}: choose from {", ".join(presets)}')
    for other, names in ONLY.items():
        for name in set(names) & set(args) - set(ONLY[modality]):
            p.error(f'--{name.replace("_", "-")} is for --modality {other}; it does nothing for {modality}')
    values = {**presets[preset], **args}
    if values.get('text_mask') == 'span':                              # fairseq's config: 0.35, spans of 4
        values.update(mask_prob=args.get('mask_prob', 0.35), mask_length=args.get('mask_length', 4))
    mcfg = ModelConfig(**{k: v for k, v in values.items() if k in ModelConfig.__dataclass_fields__})
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in TrainConfig.__dataclass_fields__})
    cfg.out = cfg.out or f'runs/{mcfg.modality}'
    try:
        check_config(mcfg, cfg, world=int(os.environ.get('WORLD_SIZE', 1)))
    except ValueError as e:
        p.error(str(e))
    return mcfg, cfg


def check_config(mcfg, cfg, world=1):
    """Out-of-range flags fail here with the flag's name, not deep inside torch."""
    counts = dict(steps=cfg.steps, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size, layers=mcfg.layers,
                  dim=mcfg.dim, heads=mcfg.heads, ffn_dim=mcfg.ffn_dim, conv_dim=mcfg.conv_dim, pos_conv_depth=mcfg.pos_conv_depth,
                  pos_conv_kernel=mcfg.pos_conv_kernel, pos_conv_groups=mcfg.pos_conv_groups, log_every=cfg.log_every,
                  ckpt_every=cfg.ckpt_every, mask_length=cfg.mask_length, image_size=mcfg.image_size, patch_size=mcfg.patch_size)
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f'--{name.replace("_", "-")} {value} must be ≥ 1')
    checks = [
        (1 <= cfg.top_k <= mcfg.layers, f'--top-k {cfg.top_k} must be between 1 and --layers ({mcfg.layers})'),
        (cfg.target_layer in TAPS, f'--target-layer {cfg.target_layer}: choose from {", ".join(TAPS)}'),
        (cfg.target_norm in ('instance', 'layer', 'none'), f'--target-norm {cfg.target_norm}: choose instance, layer or none'),
        (cfg.target_post_norm in ('instance', 'layer', 'none'), f'--target-post-norm {cfg.target_post_norm}: choose instance, layer or none'),
        (cfg.loss_scale > 0 or cfg.loss_scale in (0, -1), f'--loss-scale {cfg.loss_scale}: a positive number, 0 (1/√D) or -1 (1/D)'),
        (cfg.schedule in ('tri_stage', 'cosine'), f'--schedule {cfg.schedule}: choose tri_stage or cosine'),
        (cfg.teacher_context >= 0, f'--teacher-context {cfg.teacher_context} must be ≥ 0'),
        (cfg.loss_beta >= 0, f'--loss-beta {cfg.loss_beta} must be ≥ 0'),
        (0 <= cfg.mask_prob <= 1, f'--mask-prob {cfg.mask_prob} must be in [0, 1]'),
        (all(0 <= t <= 1 for t in (cfg.ema_start, cfg.ema_end)), '--ema-start and --ema-end must be in [0, 1]'),
        (cfg.ema_anneal_steps >= 0, '--ema-anneal-steps must be ≥ 0'),
        (cfg.lr > 0, f'--lr {cfg.lr} must be > 0'),
        (0 <= cfg.warmup <= 1 and (cfg.schedule != 'tri_stage' or 0 <= cfg.hold <= 1 - cfg.warmup),
         '--warmup must be in [0, 1] and, for tri_stage, --hold ≥ 0 with a sum ≤ 1'),
        (cfg.batch_size % (cfg.micro_batch_size * world) == 0,
         f'--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size × devices ({cfg.micro_batch_size} × {world})'),
        (mcfg.modality != 'speech' or cfg.crop >= 16_000, f'--crop {cfg.crop} must be ≥ 16000 samples (1 s)'),
        (cfg.crop_step >= 1, f'--crop-step {cfg.crop_step} must be ≥ 1'),
        (cfg.device in ('auto', 'cpu', 'cuda'), f'--device {cfg.device}: choose auto, cpu or cuda'),
        (cfg.device != 'cuda' or torch.cuda.is_available(), '--device cuda: no CUDA device is available'),
        (mcfg.dim % mcfg.heads == 0, f'--dim {mcfg.dim} must be divisible by --heads {mcfg.heads}'),
        (mcfg.dim % mcfg.pos_conv_groups == 0, f'--dim {mcfg.dim} must be divisible by --pos-conv-groups {mcfg.pos_conv_groups}'),
        (all(0 <= p < 1 for p in (mcfg.dropout, mcfg.attn_dropout, mcfg.layerdrop)), 'dropouts must be in [0, 1)'),
        (cfg.workers >= 0, f'--workers {cfg.workers} must be ≥ 0'),
        (cfg.seed >= 0, f'--seed {cfg.seed} must be ≥ 0'),
        (cfg.max_bad_steps >= 1, f'--max-bad-steps {cfg.max_bad_steps} must be ≥ 1'),
    ]
    if mcfg.modality == 'text':
        checks += [
            (3 <= cfg.block_size <= mcfg.max_tokens, f'--block-size {cfg.block_size} must be in [3, --max-tokens {mcfg.max_tokens}]'),
            (cfg.text_mask in ('bert', 'span'), f'--text-mask {cfg.text_mask}: choose bert or span'),
            (mcfg.vocab_size >= 256 + len(SPECIALS), f'--vocab-size {mcfg.vocab_size} must be ≥ {256 + len(SPECIALS)}: 256 bytes + specials'),
        ]
    if mcfg.modality == 'vision':
        grid, count = patch_mask_size(mcfg, cfg)
        checks += [
            (mcfg.image_size % mcfg.patch_size == 0, f'--image-size {mcfg.image_size} must be divisible by --patch-size {mcfg.patch_size}'),
            (grid >= 2, f'--image-size {mcfg.image_size} / --patch-size {mcfg.patch_size} must give a grid of at least 2 × 2 patches'),
            (0 < cfg.mask_prob <= 1, f'--mask-prob {cfg.mask_prob}: the fraction of patches masked must be in (0, 1]'),
            (cfg.mask_length <= min(count, (grid - 1) ** 2), f'--mask-length {cfg.mask_length}: a block cannot exceed the '
             f'{count} masked patches or the {(grid - 1) ** 2} a block may cover on a {grid} × {grid} grid'),
            (0 < cfg.min_crop_scale <= 1, f'--min-crop-scale {cfg.min_crop_scale} must be in (0, 1]'),
            (0 <= mcfg.drop_path < 1, f'--drop-path {mcfg.drop_path} must be in [0, 1)'),
        ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def patch_mask_size(mcfg, cfg):
    """Vision: the patch grid side and the patches masked per image, round(mask_prob · N) (BEiT: 120 of 196)."""
    grid = mcfg.image_size // mcfg.patch_size
    return grid, round(cfg.mask_prob * grid ** 2)


def lr_at(step, cfg):
    """tri_stage (fairseq): linear warm-up from lr/100, hold at lr, exponential decay to lr/100, then lr/100.
    cosine (BEiT cosine_scheduler): linear warm-up from 0, then min_lr + ½(lr − min_lr)(1 + cos(π·progress))."""
    warm, hold = int(cfg.warmup * cfg.steps), int(cfg.hold * cfg.steps)
    if cfg.schedule == 'cosine':
        if step < warm:
            return cfg.lr * step / warm
        progress = (step - warm) / max(cfg.steps - warm, 1)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay = cfg.steps - warm - hold
    if step < warm:
        return cfg.lr * (0.01 + 0.99 * step / warm)
    if step < warm + hold:
        return cfg.lr
    if step < warm + hold + decay:
        return cfg.lr * math.exp(math.log(0.01) * (step - warm - hold) / decay)
    return cfg.lr * 0.01

# -------------------------------------------------------------------------------------------- data


def make_dataset(mcfg, cfg, tokenizer=''):
    """The embedded synthetic set, or --data; files that cannot be read at start-up are listed in `unreadable` (or an
    error, --strict-data). Text: also the tokenizer (`tokenizer`: a resumed run's), which sets mcfg.vocab_size."""
    unreadable = None if cfg.strict_data else []
    if mcfg.modality == 'text':
        documents = read_corpus(cfg.data, cfg.encoding, unreadable) if cfg.data else SyntheticText(seed=0).documents()
        tokenizer = (read_tokenizer(tokenizer or cfg.tokenizer) if tokenizer or cfg.tokenizer else
                     train_tokenizer(documents, mcfg.vocab_size, cfg.data and tokenizer_cache_path(cfg.data, mcfg.vocab_size)))
        mcfg.vocab_size, mcfg.pad_id = tokenizer.get_vocab_size(), tokenizer.token_to_id('<pad>')
        dataset = TokenBlocks(pack_blocks(documents, tokenizer, cfg.block_size))
        dataset.mask_id, dataset.ordinary = tokenizer.token_to_id('<mask>'), ordinary_ids(tokenizer)   # for collate
        dataset.tokenizer, dataset.unreadable = tokenizer, unreadable  # the tokenizer is saved to --out as tokenizer.json
        return dataset
    if mcfg.modality == 'vision':
        return (ImageFolder(cfg.data, min_size=mcfg.image_size, strict=cfg.strict_data) if cfg.data else
                SyntheticImages(seed=0, image_size=mcfg.image_size))
    return AudioFolder(cfg.data, min_samples=int(MIN_SECONDS * SR), strict=cfg.strict_data) if cfg.data else SyntheticSpeech(seed=0)


def collate(items, mcfg, cfg, mask_id=None, ordinary=None, generator=None):
    """Items → source, padding_mask or None, mask (B, T) bool[, original], on the data-loader workers, every random
    draw from `generator`. speech: random crops (B, S) of the shortest clip's length rounded down to --crop-step, or
    ≤ --crop and padded (--pad), span masks. vision: augmented images (B, 3, H, W), block
    masks (B, N) of round(mask_prob · N) patches. text: masked blocks (B, T), the <mask> positions, and the original
    blocks for the teacher."""
    g = generator
    if mcfg.modality == 'text':
        original = torch.stack([block for block, _ in items])                   # (B, T)
        corrupt = (0.1, 0.1) if cfg.text_mask == 'bert' else (0.0, 0.0)          # random, kept
        source, mask = token_mask(original, mask_id, ordinary, cfg.mask_prob, cfg.mask_length, *corrupt, generator=g)
        return source, None, mask, original
    if mcfg.modality == 'vision':
        grid, count = patch_mask_size(mcfg, cfg)
        images = torch.stack([augment(image, mcfg.image_size, cfg.min_crop_scale, g) for image, _ in items])  # (B, 3, H, W)
        return images, None, block_mask(len(items), (grid, grid), count, cfg.mask_length, generator=g)
    waves = [w for w, _ in items]
    shortest = min(len(w) for w in waves)
    longest = cfg.crop if cfg.pad else min(cfg.crop, shortest // cfg.crop_step * cfg.crop_step or shortest)  # fairseq: the shortest
    source, padding_mask = crop_and_pad(waves, longest, g)
    frames = conv_output_length((~padding_mask).sum(1))               # (B,) valid frames
    mask = span_mask(frames, conv_output_length(source.shape[1]), cfg.mask_prob, cfg.mask_length, generator=g)
    return source, (padding_mask if padding_mask.any() else None), mask


# -------------------------------------------------------------------------------------------- the data2vec step


def masked_std(x, mask):
    """fairseq compute_var: std over the masked steps of each channel, averaged over channels. x: (B, T, D)."""
    w = mask[..., None].float()                                        # (B, T, 1)
    n = w.sum()
    mean = (x * w).sum((0, 1)) / n                                     # (D,)
    var = ((x - mean).square() * w).sum((0, 1)) / (n - 1).clamp(min=1)
    return (var + 1e-6).sqrt().mean()


def forward_loss(model, teacher, batch, cfg):
    """The data2vec objective on one micro-batch: the student, fed the masked input, regresses at the
    masked steps the teacher's average of its top-K normalised blocks for the unmasked input."""
    source, padding_mask, mask, *original = batch                                # text: + the uncorrupted tokens
    pred, teacher_input, frame_padding = model(source, padding_mask, mask, *original)   # (B, T, D) each
    y = teacher_targets(teacher, teacher_input, frame_padding, cfg.target_layer, cfg.top_k, cfg.target_norm,
                        cfg.teacher_context, cfg.target_post_norm)                # (B, T, D) fp32, no grad
    scale = {0: None, -1: 1 / pred.shape[-1]}.get(cfg.loss_scale, cfg.loss_scale)  # None: 1/√D
    loss = regression_loss(pred, y, mask, cfg.loss_beta, scale)
    return loss, dict(target_var=masked_std(y, mask), pred_var=masked_std(pred.detach().float(), mask))


def param_groups(model, modality):
    """BEiT leaves 1-D parameters (biases, norms, LayerScale γ) and the CLS token out of weight decay; fairseq decays all."""
    if modality != 'vision':
        return model.parameters()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim == 1 or name.endswith('cls_token') else decay).append(p)
    return [dict(params=decay), dict(params=no_decay, weight_decay=0.0)]


def unwrap(model):
    """The plain module under DDP and torch.compile: the one to EMA, save and evaluate."""
    model = getattr(model, 'module', model)
    return getattr(model, '_orig_mod', model)


def pick_device(choice, local_rank=0):
    """(device, is_cuda, autocast): CUDA if asked for or available, with bf16 autocast and TF32; the CPU stays fp32
    (bf16 autocast on CPU made the conv feature encoder dozens of times slower)."""
    cuda = choice == 'cuda' or (choice == 'auto' and torch.cuda.is_available())
    device = torch.device(f'cuda:{local_rank}' if cuda else 'cpu')
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, cuda, torch.autocast('cuda', dtype=torch.bfloat16) if cuda else nullcontext()


def build(mcfg, cfg, device, cuda):
    """The student (seeded by --seed: the same initial weights on every rank), its EMA teacher, AdamW (Adam with
    decoupled weight decay; fused on CUDA, foreach on the CPU) and the loss function, compiled with --compile.
    train.main and bench.py both build with this."""
    torch.manual_seed(cfg.seed)
    model = Data2Vec(mcfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, mcfg.modality), lr=cfg.lr, betas=(0.9, cfg.adam_beta2), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay, **(dict(fused=True) if cuda else dict(foreach=True)))
    if cfg.compile:                                                    # student, teacher, targets, loss: one graph
        torch._dynamo.config.recompile_limit = max(8, cfg.crop // cfg.crop_step + 2)   # one graph per speech crop length
    loss_fn = torch.compile(forward_loss, dynamic=False) if cfg.compile else forward_loss
    return model, make_teacher(model.encoder), optimizer, loss_fn


def to_device(batch, device):
    """A collated batch's tensors on the device; copies from pinned memory do not block the host."""
    return [t.to(device, non_blocking=True) if t is not None else None for t in batch]


def train_step(model, teacher, optimizer, micro_batches, step, cfg, autocast, loss_fn=forward_loss):
    """One update: accumulate gradients over the micro-batches, clip, Adam step, then the EMA step.

    loss_fn: forward_loss, or torch.compile(forward_loss) (--compile). A NaN/Inf loss or gradient norm skips the Adam
    and EMA steps (under DDP if it happens on any rank): reading that flag is the one host sync per update. Returns
    the loss and stats averaged over the micro-batches, as device tensors, and whether the update was applied.
    """
    for group in optimizer.param_groups:
        group['lr'] = lr_at(step, cfg)
    total = {}
    for i, batch in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1 or not isinstance(model, DDP)
        with (nullcontext() if sync else model.no_sync()), autocast:
            loss, stats = loss_fn(model, teacher, batch, cfg)
        (loss / len(micro_batches)).backward()
        for k, v in dict(stats, loss=loss.detach()).items():
            total[k] = total.get(k, 0) + v / len(micro_batches)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total['grad_norm'] = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip, foreach=True) if cfg.clip > 0 else
                          torch.nn.utils.get_total_norm(grads, foreach=True))
    applied = update_is_finite(total['loss'], total['grad_norm'])
    if applied:
        optimizer.step()
        ema_update_(unwrap(teacher), unwrap(model).encoder, ema_decay_at(step + 1, cfg.ema_start, cfg.ema_end, cfg.ema_anneal_steps))
    optimizer.zero_grad(set_to_none=True)
    return total, applied

# -------------------------------------------------------------------------------------------- checkpoint and curves


# what a resumed run may change: where and how long it runs, not what it trains (checkpoint.resume_changes)
RESUMABLE = ('steps', 'out', 'data', 'device', 'compile', 'workers', 'log_every', 'ckpt_every', 'max_bad_steps', 'strict_data')


def save_checkpoint(path, model, teacher, optimizer, step, mcfg, cfg, rng, data, loop):
    """One dict of tensors and plain types from the unwrapped modules, written atomically (checkpoint.save). Enough to
    resume exactly: `rng` holds every rank's generators, `data` the micro-batches each rank drew, `loop` the log's sums."""
    save(path, dict(student=unwrap(model).state_dict(), teacher=unwrap(teacher).state_dict(), optimizer=optimizer.state_dict(),
                    step=step, config=dict(model=asdict(mcfg), train=asdict(cfg)), rng=rng, data=data, loop=loop))


def plot_curves(records, path, warmup_steps):
    """loss, lr, τ, target/prediction std and throughput against step."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    steps = [r['step'] for r in records]
    panels = [('loss', 'loss'), ('lr', 'learning rate'), ('ema_decay', 'teacher EMA decay τ'),
              ('target_var', 'target std (collapse < 0.1)'), ('pred_var', 'prediction std (collapse < 0.01)'),
              ('samples_per_s', 'samples / s')]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot(steps, [r[key] for r in records], lw=1.5)
        ax.set(title=title, xlabel='step')
        ax.axvline(warmup_steps, color='grey', lw=0.8, ls=':')
        ax.grid(alpha=0.3)
    axes[1, 0].axhline(0.1, color='red', lw=1, ls='--')
    axes[1, 1].axhline(0.01, color='red', lw=1, ls='--')
    fig.suptitle('data2vec pretraining (dotted: end of warm-up)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

# -------------------------------------------------------------------------------------------- main


def main(argv=None):
    mcfg, cfg = parse_args(argv)
    ddp = 'RANK' in os.environ
    if ddp:
        dist.init_process_group('nccl' if torch.cuda.is_available() and cfg.device != 'cpu' else 'gloo')
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    device, cuda, autocast = pick_device(cfg.device, int(os.environ.get('LOCAL_RANK', 0)))
    master = rank == 0
    accum = cfg.batch_size // (cfg.micro_batch_size * world)           # the global batch does not depend on the GPU count

    out, ckpt_path = Path(cfg.out), Path(cfg.out) / 'checkpoint.pt'
    if master:
        check_writable(out)                                            # now, not at the first save hours later
    ckpt = open_checkpoint(ckpt_path, cfg.resume)
    dataset = make_dataset(mcfg, cfg, out / 'tokenizer.json' if ckpt and mcfg.modality == 'text' and not cfg.tokenizer else '')
    if ckpt:                                                           # after make_dataset: the tokenizer sets vocab_size
        changes = resume_changes({**ckpt['config']['model'], **ckpt['config']['train']}, {**asdict(mcfg), **asdict(cfg)},
                                 RESUMABLE, ckpt_path)
    if master:
        (out / 'config.json').write_text(json.dumps(dict(model=asdict(mcfg), train=asdict(cfg)), indent=2))
        if mcfg.modality == 'text' and not ckpt:
            dataset.tokenizer.save(str(out / 'tokenizer.json'))       # to turn the checkpoint's ids back into text
        if getattr(dataset, 'skipped', None):
            print(f'skipped {len(dataset.skipped)} files shorter than {MIN_SECONDS} s, e.g. {dataset.skipped[0]}')
    unreadable = getattr(dataset, 'unreadable', None) or []
    if master and unreadable:
        print(f'skipped {len(unreadable)} unreadable files (--strict-data stops instead), e.g. {unreadable[0]}')

    model, teacher, optimizer, loss_fn = build(mcfg, cfg, device, cuda)
    seed_all(cfg.seed + rank)                                          # different dropout on every rank
    step, consumed, loop = 0, 0, dict(loss_sum=[torch.zeros(())] * world, last_log=0, skipped_updates=0, bad_samples=0, in_a_row=0)
    if ckpt:
        if ckpt['step'] > cfg.steps:
            raise CheckpointError(f'--steps {cfg.steps}: {ckpt_path} is already at step {ckpt["step"]}')
        model.load_state_dict(ckpt['student'])
        teacher.load_state_dict(ckpt['teacher'])                       # the fp32 EMA weights
        optimizer.load_state_dict(ckpt['optimizer'])
        step, loop, saved_world = ckpt['step'], ckpt['loop'], len(ckpt['rng'])
        consumed = ckpt['data']['consumed'] * saved_world // world     # the same share of the data if the GPU count changed
        if saved_world == world:
            set_rng_state(ckpt['rng'][rank], device)
        else:                                                          # every rank's running loss sum: their mean
            loop['loss_sum'] = [sum(loop['loss_sum']) / saved_world] * world
        if master:
            print(f'resuming {ckpt_path} at step {step} of {cfg.steps}' + (f'; changed: {", ".join(changes)}' if changes else '')
                  + ('' if saved_world == world else f'; it was written by {saved_world} processes, this run has {world}: the '
                     'data and masks continue where they stopped, dropout\'s random streams start afresh'))
    to_batch = partial(collate, mcfg=mcfg, cfg=cfg, mask_id=getattr(dataset, 'mask_id', None), ordinary=getattr(dataset, 'ordinary', None))
    data = batches(dataset, to_batch, cfg.micro_batch_size, cfg.seed, rank, world, cfg.workers, pin=cuda, start=consumed,
                   strict=cfg.strict_data, init_fn=ignore_stop_signals)
    if master:
        print(f'torch {torch.__version__} on {device} × {world}; {len(dataset)} {mcfg.modality} samples '
              f'({cfg.data or "embedded synthetic set"}); batch {cfg.batch_size} = {cfg.micro_batch_size} × {accum} accumulation × {world}')
        print(f'student: {model.num_params() / 1e6:.2f} M parameters + regression head {(model.num_params(True) - model.num_params()) / 1e6:.2f} M; '
              f'teacher (EMA of model.encoder): {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M')
    if ddp:
        model = DDP(model, device_ids=[device.index] if cuda else None)

    log_file, records = resume_log(out / 'log.jsonl', step, ckpt) if master else (None, [])
    loss_sum, last_log, last_ckpt = loop['loss_sum'][rank].to(device), loop['last_log'], step if ckpt else 0
    skipped, bad, in_a_row, t0, t_start = loop['skipped_updates'], loop['bad_samples'], loop['in_a_row'], time.time(), time.time()
    data_s = 0.0                                                       # time spent waiting for data since the last log line
    bad_new = list(unreadable) if master and not ckpt else []         # logged once, by rank 0
    warmup_steps = int(cfg.warmup * cfg.steps)
    guard_from = max(warmup_steps, 10)                # collapse guard: a fresh vision student predicts alike at every masked patch

    def log_bad_samples():                                             # every rank's unreadable samples, logged by rank 0
        nonlocal bad, bad_new
        errors, bad_new = sum(gather(bad_new), []), []
        bad += len(errors)
        if master:
            log_file.writelines(json.dumps(dict(step=step, event='bad sample', error=e)) + '\n' for e in errors)
            log_file.flush()

    def checkpoint_now():                                              # every rank's RNG states and loss sums; rank 0 writes
        log_bad_samples()
        states, sums = gather(rng_state(device)), gather(loss_sum.cpu())
        if master:
            save_checkpoint(ckpt_path, model, teacher, optimizer, step, mcfg, cfg, states, dict(consumed=consumed),
                            dict(loss_sum=sums, last_log=last_log, skipped_updates=skipped, bad_samples=bad, in_a_row=in_a_row))

    bar = dict(total=cfg.steps, initial=step, disable=not master, desc='pretraining', dynamic_ncols=True)
    with StopSignal() as stop, tqdm(**bar) as pbar:                   # the bar closes before an error's message
        while step < cfg.steps:
            micro, t_wait = [], time.time()
            for _ in range(accum):
                batch, errors = next(data)                             # errors: samples that could not be read, replaced
                consumed, bad_new = consumed + 1, bad_new + errors
                micro.append(to_device(batch, device))
                for e in errors:
                    tqdm.write(f'skipped an unreadable sample (--strict-data stops instead): {e}')
            data_s += time.time() - t_wait                             # waiting for the loader (and the copies' launch)
            stats, applied = train_step(model, teacher, optimizer, micro, step, cfg, autocast, loss_fn)
            if applied:
                step, in_a_row = step + 1, 0
                loss_sum += stats['loss']
                pbar.update()
            else:                                                      # every rank agrees: train_step all-reduces the flag
                skipped, in_a_row = skipped + 1, in_a_row + 1
                event, message = skipped_update(step + 1, stats['loss'], stats['grad_norm'], in_a_row, skipped, cfg.max_bad_steps)
                if master:
                    tqdm.write(message)
                    log_file.write(json.dumps(event) + '\n')
                    log_file.flush()
            log_now = applied and (step % cfg.log_every == 0 or step == cfg.steps)
            if log_now or in_a_row >= cfg.max_bad_steps:               # bad samples of every rank reach the log here
                log_bad_samples()
            if log_now:                                                # the only other host syncs, once per log interval
                logged = torch.stack([loss_sum / (step - last_log), stats['target_var'], stats['pred_var']])
                if ddp:
                    dist.all_reduce(logged, op=dist.ReduceOp.AVG)      # every rank takes the same collapse decision
                loss_avg, target_var, pred_var = logged.tolist()
                rec = dict(step=step, loss=loss_avg, lr=lr_at(step - 1, cfg),
                           ema_decay=ema_decay_at(step, cfg.ema_start, cfg.ema_end, cfg.ema_anneal_steps),
                           target_var=target_var, pred_var=pred_var, skipped_updates=skipped, bad_samples=bad,
                           samples_per_s=(step - last_log) * cfg.batch_size / (time.time() - t0),
                           data_frac=data_s / (time.time() - t0), elapsed_s=time.time() - t_start)
                loss_sum.zero_()
                last_log, t0, data_s = step, time.time(), 0.0
                records.append(rec)
                if master:
                    log_file.write(json.dumps(rec) + '\n')
                    log_file.flush()
                    pbar.set_postfix(loss=f'{rec["loss"]:.3f}', tgt_std=f'{rec["target_var"]:.3f}', pred_std=f'{rec["pred_var"]:.3f}')
                if step > guard_from and (rec['target_var'] < 0.1 or rec['pred_var'] < 0.01):
                    if master:
                        plot_curves(records, out / 'curves.png', warmup_steps)
                    saved = f'{ckpt_path} is from step {last_ckpt}' if last_ckpt else 'no checkpoint was written yet'
                    raise SystemExit(f'collapse at step {step}: target std {rec["target_var"]:.4f} (min 0.1), prediction std '
                                     f'{rec["pred_var"]:.4f} (min 0.01). The paper lists too high a learning rate, too short a '
                                     f'warm-up and too low a τ as causes; {saved}.')
            if in_a_row >= cfg.max_bad_steps:
                log_file and log_file.flush()
                raise too_many_bad_steps(in_a_row, cfg.max_bad_steps, ckpt_path, last_ckpt)
            if applied and (step % cfg.ckpt_every == 0 or step == cfg.steps):
                checkpoint_now()
                last_ckpt = step
            if stop_agreed(stop, device) and step < cfg.steps:         # SIGTERM/SIGINT: save at this step boundary
                if last_ckpt != step:
                    checkpoint_now()
                pbar.close()
                if master:
                    log_file.close()
                    print(f'{stop.name or "a signal on another rank"}: saved {ckpt_path} at step {step} of {cfg.steps}. '
                          f'To continue: {resume_hint("train.py", argv or sys.argv[1:])}', file=sys.stderr)
                raise SystemExit(128 + (stop.signum if stop.name else signal.SIGTERM))
    if master and records:
        log_file.close()
        plot_curves(records, out / 'curves.png', warmup_steps)
        first, last = records[0], records[-1]
        print(f'done: {cfg.steps} steps in {time.time() - t_start:.0f} s; loss {first["loss"]:.3f} → {last["loss"]:.3f}; '
              f'target std {last["target_var"]:.3f}, prediction std {last["pred_var"]:.3f}; wrote {out}/'
              '{config.json, log.jsonl, checkpoint.pt, curves.png}')
    if ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    try:
        main()
    except (DataError, CheckpointError) as e:                          # one line naming the file, no traceback
        line = str(e).strip().splitlines()[-1]                         # from a loader worker, the message ends with the original
        sys.exit(f'train.py: error: {line.removeprefix("data.DataError: ")}')

"""Configuration: the dataclasses, the presets and recipes, which flags belong to which modality, and the checks.

    ModelConfig     the architecture (model.py, encoders.py)
    TrainConfig     everything else of pretraining (train.py, bench.py)
    FinetuneConfig  fine-tuning and linear probes (finetune.py)
    PRESETS         per modality: tiny (CPU, ≤ 5 min), base and large (the paper's models: the released commands and
                    configs; speech and text large take base's optimisation, which the reference notes do not give)
    RECIPES         per modality: fine-tuning recipes, tiny and base
    parse_train_args, parse_finetune_args   flags → configs, out-of-range values refused with the flag's name

and what both scripts derive from a config: the learning rate at a step (`lr_at`) and the device (`pick_device`).
Flags are generated from the dataclass fields, so every knob is written once. Order: field default < preset < flag.
"""
import argparse
import math
import os
from contextlib import nullcontext
from dataclasses import MISSING, dataclass, field, fields

import torch

# knobs added since checkpoints were first written whose default is exactly what the older code did: a checkpoint
# without them resumes (checkpoint.resume_changes); any other missing knob is refused by name
UNCHANGED_DEFAULTS = dict(rel_pos_bias='shared', layer_norm_eps=0.0, pos_conv_zero='every', init='', version=1, decoder_dim=384,
                          decoder_layers=4, decoder_kernel=7, decoder_groups=16, mask_noise_std=0.01, decoder_dropout=0.1, clones=8,
                          mask_adjust=0.05, cls_loss=0.01, cls_rows=256, color_jitter=True,
                          collapse_check_from=0, decoder_residual=True, decoder_projection_layers=1)
TAPS = ('attention', 'ffn', 'ffn_residual', 'block')  # which tensor of a block the teacher's targets use (model.Block)
N_SPECIALS = 5                                         # <s> <pad> </s> <unk> <mask> (data.text.SPECIALS)


def knob(default, help):
    return field(default=default, metadata=dict(help=help))


@dataclass
class ModelConfig:
    """Architecture. Defaults are data2vec Base for speech (fairseq base_librispeech.yaml); PRESETS has the others."""
    modality: str = knob('speech', 'speech | vision | text')
    version: int = knob(1, 'data2vec version: 1 (2022) | 2 (data2vec 2.0, 2023: visible steps only, a conv decoder, M masks '
                           'per sample)')
    dim: int = knob(768, 'D: model width')
    layers: int = knob(12, 'L: Transformer blocks')
    heads: int = knob(12, 'attention heads')
    ffn_dim: int = knob(3072, 'FFN hidden width')
    dropout: float = knob(0.1, 'dropout')
    attn_dropout: float = knob(0.1, 'attention dropout')
    layerdrop: float = knob(0.05, 'probability of skipping a whole block while training the student (LayerDrop)')
    conv_dim: int = knob(512, 'speech: channels of the 7 conv layers of the feature encoder')
    pos_conv_depth: int = knob(5, 'speech: conv layers of the positional encoder')
    pos_conv_kernel: int = knob(19, 'speech: their kernel (fairseq: conv_pos 95 // depth 5)')
    pos_conv_groups: int = knob(16, 'speech: their groups')
    pos_conv_zero: str = knob('every', 'speech: padded frames are zeroed before every positional conv layer (DEVIATIONS.md 3) | '
                                       "first: before the first only (fairseq, HF: how the released models were trained)")
    ema_front_end: bool = knob(False, 'speech: the teacher averages the feature and positional encoders too and reads the '
                                      'waveform (fairseq ema_transformer_only False); default: shared with the student (paper)')
    feature_grad_mult: float = knob(1.0, "speech: scales the conv feature encoder's gradient (wav2vec 2.0: 0.1; data2vec: 1)")
    image_size: int = knob(224, 'vision: square input images, H = W')
    patch_size: int = knob(16, 'vision: P; N = (image_size / P)² patches')
    layer_scale: float = knob(1e-4, 'vision: LayerScale γ init (BEiT layer_scale_init_value)')
    rel_pos_bias: str = knob('shared', 'vision: shared (one relative position bias for every block: data2vec pretraining) | '
                                       'layer (one per block: BEiT fine-tuning, released ft1k models)')
    drop_path: float = knob(0.0, 'vision: stochastic depth of the last block, rising linearly from 0 (paper: 0.2; v2: 0)')
    vocab_size: int = knob(50_000, 'text: BPE vocabulary (set from the tokenizer)')
    max_tokens: int = knob(512, 'text: rows of the learned position table, minus RoBERTa\'s offset of 2')
    pad_id: int = knob(1, 'text: the tokenizer\'s <pad> (set from the tokenizer)')
    decoder_dim: int = knob(384, 'data2vec 2.0: C, the conv decoder\'s channels')
    decoder_layers: int = knob(4, 'data2vec 2.0: the conv decoder\'s layers')
    decoder_kernel: int = knob(7, 'data2vec 2.0: their kernel')
    decoder_groups: int = knob(16, 'data2vec 2.0: their groups')
    decoder_residual: bool = knob(True, "data2vec 2.0: a residual around each decoder layer (text: none, fairseq decoder_residual)")
    decoder_projection_layers: int = knob(1, "data2vec 2.0: the decoder's output projection: 1 (a Linear C → D) | 2 (C → 2C → "
                                             "GELU → D: text)")
    mask_noise_std: float = knob(0.01, 'data2vec 2.0: σ of the Gaussian noise the decoder reads at masked steps (fairseq mask_noise_std)')
    decoder_dropout: float = knob(0.1, "data2vec 2.0: dropout on the decoder's input (fairseq decoder.input_dropout)")
    layer_norm_eps: float = knob(0.0, 'ε of the LayerNorms in and around the blocks; 0 = the released code\'s: 1e-5 (speech, '
                                      'text), 1e-6 (vision, BEiT). A released model\'s config.json sets its own (released.py)')


@dataclass
class TrainConfig:
    """Everything but the architecture. Defaults are data2vec Base for speech (paper + fairseq base_librispeech.yaml)."""
    preset: str = knob('tiny', "tiny: CPU, embedded data, ≤ 5 min | small: CPU, the real-data ablations' setting (README) | "
                               "base | large: the paper's models (speech and text large: "
                               "base's optimisation)")
    data: str = knob('', 'speech: folder of .wav/.flac (LibriSpeech layout); vision: ImageFolder tree (<class>/<image>.png|jpg); '
                         'text: a .txt file or folder (a document per paragraph); empty: the embedded synthetic set')
    encoding: str = knob('utf-8', 'text: the encoding of --data files')
    tokenizer: str = knob('', 'text: a GPT-2/RoBERTa vocab.json + merges.txt folder, or a tokenizer.json; empty: train a BPE '
                              '(with --init: the released model\'s)')
    init: str = knob('', "a released model's folder (HF format, released.py): pretrain further from its encoder, with its "
                         'architecture (model flags are ignored); the regression head is fresh, the teacher a copy')
    out: str = knob('', 'output folder (default runs/<modality>)')
    device: str = knob('auto', 'auto | cpu | cuda')
    compile: bool = knob(False, 'torch.compile the student and the teacher')
    seed: int = knob(0, 'random seed')
    # targets and loss: the paper's ablation axes
    top_k: int = knob(8, 'K: average the top-K teacher blocks (Figure 2)')
    target_layer: str = knob('ffn', 'which tensor of each teacher block: ' + ' | '.join(TAPS) + ' (Table 5)')
    target_norm: str = knob('instance', 'per-block normalisation of targets: instance (over time) | layer | none')
    target_post_norm: str = knob('none', 'normalisation of the average of the K blocks: none | layer | instance')
    teacher_context: int = knob(0, 'W: the teacher attends to ±W steps only (vision: a (2W+1)² square of patches); '
                                   '0 = the whole input (Figure 3)')
    loss_beta: float = knob(0.0, 'β: 0 = L2, > 0 = Smooth L1 with this β (Table 7)')
    loss_scale: float = knob(0.0, 'multiplies the per-step loss summed over channels; 0 = 1/√D (fairseq), -1 = 1/D (a mean: BEiT)')
    # masking
    mask_prob: float = knob(0.65, 'speech: fairseq mask_prob, span starts are p = mask_prob / mask_length of the frames '
                                  '(Table 8); vision: the fraction of patches masked')
    mask_length: int = knob(10, 'speech: frames per masked span (Table 8); vision: fewest patches per masked block')
    mask_adjust: float = knob(0.05, 'data2vec 2.0: A, extra block centres for overlaps (fairseq mask_prob_adjust). speech: '
                                    'int(T·(p + A)/B) centres, then exactly int(T·p) masked; vision: int(N·((1 − p) + A)/B²) '
                                    'centres of B × B kept blocks, then exactly int(N·(1 − p)) kept (masking.py)')
    clones: int = knob(8, 'data2vec 2.0: M, masked copies of each sample, one teacher pass for all (multi-mask)')
    cls_loss: float = knob(0.01, "data2vec 2.0 vision: the CLS loss's weight (model.cls_loss); 0 = off")
    cls_rows: int = knob(256, 'data2vec 2.0 vision: the rows (images × M) whose CLS losses are summed, fairseq: one GPU\'s '
                              'micro-batch (base 16 × 16, large 8 × 16); fixed here, so --micro-batch-size stays a memory setting')
    min_crop_scale: float = knob(0.08, 'vision: random resized crops cover this fraction of the image or more')
    color_jitter: bool = knob(True, "vision: BEiT's colour jitter (0.4, 0.4, 0.4) after the crop and flip (data2vec 2.0: "
                                    "MAE's crops and flips only)")
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
    no_decay_1d: bool = knob(False, 'no weight decay on 1-D parameters (biases, norms, LayerScale) and the CLS token (BEiT); '
                                    'off: every parameter decays (fairseq)')
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
    collapse_check_from: int = knob(0, 'a collapse (target std < 0.1 or prediction std < 0.01) stops the run after this '
                                       'update; 0: after the warm-up (at least 10). A v1 student on MNIST predicts alike '
                                       'for its first ~200 updates (LOG.md 2026-12-01)')


# data2vec vision v1 ViT-B/16: data2vec_vision/beit/README.md's command; the paper where the two differ (DEVIATIONS.md)
VISION_BASE = dict(dropout=0.0, attn_dropout=0.05, layerdrop=0.0, drop_path=0.2, layer_scale=1e-4,
                   top_k=6, target_layer='block', target_norm='layer', target_post_norm='layer', loss_beta=2.0, loss_scale=-1,
                   mask_prob=120 / 196, mask_length=16, ema_start=0.9998, ema_end=0.9998, ema_anneal_steps=0,  # τ constant
                   schedule='cosine', lr=2e-3, min_lr=1e-5, weight_decay=0.05, no_decay_1d=True, adam_beta2=0.999, adam_eps=1e-8,
                   clip=3.0, warmup=0.05, steps=500_000, batch_size=2048, micro_batch_size=128, workers=10, log_every=500,
                   ckpt_every=10_000)  # 800 epochs of ImageNet-1k at 2048 = 625 updates each, 40 of them warm-up

# data2vec vision v1 ViT-L/16: the README's first ViT-L command (run_cyclical.py, 64 GPUs × 64 images, 800 epochs):
# γ 1e-5, lr 1e-3, 80 warm-up epochs, drop path 0.2, attention dropout 0.15, τ 0.9998 constant; the rest run_cyclical's
# defaults (wd 0.05, AdamW (0.9, 0.999), ε 1e-8, min lr 1e-5). 1,281,167 // 4096 = 312 updates an epoch.
VISION_LARGE = dict(VISION_BASE, dim=1024, layers=24, heads=16, ffn_dim=4096, layer_scale=1e-5, lr=1e-3, drop_path=0.2,
                    attn_dropout=0.15, steps=800 * 312, warmup=80 / 800, batch_size=64 * 64, micro_batch_size=64)

# data2vec text v1 (paper; fairseq config text/pretraining/base.yaml where the paper is silent, DEVIATIONS.md)
TEXT_BASE = dict(vocab_size=50_000, layerdrop=0.0, top_k=10, target_layer='ffn', target_norm='layer', loss_beta=4.0, loss_scale=1.0,
                 text_mask='bert', mask_prob=0.15, mask_length=1, ema_anneal_steps=100_000, lr=2e-4, warmup=0.05, hold=0.8,
                 clip=5.0, steps=1_000_000, batch_size=256, micro_batch_size=16, block_size=512, workers=2, log_every=500,
                 ckpt_every=25_000)   # 256 blocks of 512 tokens per update; Adam (0.9, 0.98), ε 1e-6, wd 0.01 as speech

# tiny: ~1 M parameters, ≤ 5 min on 2 CPU cores. 1 s crops of the 1–4 s corpus need no padding, so every row is masked ≈ 49%.
SPEECH_TINY = dict(dim=128, layers=4, heads=4, ffn_dim=512, conv_dim=32, layerdrop=0.0, top_k=3, lr=2e-3, warmup=0.1, hold=0.4,
                   steps=400, batch_size=16, micro_batch_size=16, crop=16_000, ema_anneal_steps=400, workers=0,
                   log_every=10, ckpt_every=100)
# tiny: 32² images in 4² patches (an 8 × 8 grid, 39 of 64 masked in blocks of ≥ 5), ≤ 5 min on 2 CPU cores
VISION_TINY = dict(VISION_BASE, image_size=32, patch_size=4, dim=128, layers=4, heads=4, ffn_dim=512, drop_path=0.1, top_k=3,
                   mask_length=5, ema_start=0.995, ema_end=0.995, min_crop_scale=0.35, steps=300, batch_size=64,
                   micro_batch_size=64, warmup=0.1, workers=0, log_every=10, ckpt_every=100)
# tiny: a 1,500-token BPE on the embedded grammar corpus, blocks of 64 tokens, ≤ 5 min on 2 CPU cores
TEXT_TINY = dict(TEXT_BASE, vocab_size=1500, max_tokens=64, block_size=64, dim=128, layers=4, heads=4, ffn_dim=512, top_k=3,
                 ema_anneal_steps=300, lr=1e-3, warmup=0.1, hold=0.4, steps=300, batch_size=32, micro_batch_size=32,
                 workers=0, log_every=10, ckpt_every=100)

PRESETS = {
    'speech': {
        'tiny': SPEECH_TINY,
        # small: tiny's model with a 1-layer positional conv (reach ±9 frames: a 1 s crop is 49; DEVIATIONS.md 40),
        # 1500 steps, τ annealed over the run: the ablations' setting on the spoken digits (README)
        'small': dict(SPEECH_TINY, pos_conv_depth=1, steps=1500, ema_anneal_steps=1500, log_every=25, ckpt_every=500),
        'base': dict(),                                                # the dataclass defaults
        'large': dict(dim=1024, layers=24, heads=16, ffn_dim=4096),
    },
    'vision': {
        'tiny': VISION_TINY,
        # small: 28² images (MNIST), 1200 steps, a quarter of them warming up (LOG.md 2026-11-23: 10% collapsed on MNIST)
        'small': dict(VISION_TINY, image_size=28, steps=1200, warmup=0.25, log_every=25, ckpt_every=400),
        'base': VISION_BASE,                                           # ViT-B/16
        'large': VISION_LARGE,                                         # ViT-L/16
    },
    'text': {
        'tiny': TEXT_TINY,
        # small: 2500 steps, τ annealed over the run (LOG.md 2026-11-23: WikiText-2 + Tiny Shakespeare → TREC)
        'small': dict(TEXT_TINY, steps=2500, ema_anneal_steps=2500, log_every=25, ckpt_every=500),
        'base': TEXT_BASE,                                             # RoBERTa-base
        'large': dict(TEXT_BASE, dim=1024, layers=24, heads=16, ffn_dim=4096),
    },
}

# data2vec 2.0 speech (fairseq examples/data2vec/config/v2/base_audio_only_task.yaml; README "data2vec 2.0"). The batch:
# 8 GPUs × 1M samples ≈ 8 × 5 LibriSpeech clips (mean 12.3 s) = 40 clips an update, × M = 8 masked copies
SPEECH2_BASE = dict(version=2, layerdrop=0.05, top_k=8, target_layer='ffn', target_norm='instance', target_post_norm='none',
                    mask_prob=0.5, mask_length=5, mask_adjust=0.05, clones=8, decoder_dim=384, decoder_layers=4,
                    decoder_kernel=7, decoder_groups=16, ema_start=0.999, ema_end=0.99999, ema_anneal_steps=75_000,
                    schedule='cosine', lr=7.5e-4, min_lr=0.0, weight_decay=0.01, adam_beta2=0.98, adam_eps=1e-6,
                    warmup=8_000 / 400_000, steps=400_000, batch_size=40, micro_batch_size=5)
# large (large_audio_only_task.yaml): 24 blocks (fairseq: 8 in the front-end + 16 shared, K 16 of the shared ones), M 12,
# p 0.55, A 0.1, decoder C 768, no LayerDrop, τ 0.9997 → 1 over 300k, lr 4e-4, 10k warm-up, 600k updates, clip 1; its
# composite optimizer applies optim_overrides: no weight decay on 1-D parameters (biases, norms, ALiBi scales)
SPEECH2_LARGE = dict(SPEECH2_BASE, dim=1024, layers=24, heads=16, ffn_dim=4096, top_k=16, layerdrop=0.0, clones=12,
                     mask_prob=0.55, mask_adjust=0.1, decoder_dim=768, ema_start=0.9997, ema_end=1.0, ema_anneal_steps=300_000,
                     lr=4e-4, steps=600_000, warmup=10_000 / 600_000, clip=1.0, no_decay_1d=True)
# tiny: SPEECH_TINY's model and data, base's mechanism: ≤ 5 min on 2 CPU cores
SPEECH2_TINY = dict(SPEECH_TINY, **{k: SPEECH2_BASE[k] for k in ('version', 'target_post_norm', 'mask_prob', 'mask_length',
                                                                  'mask_adjust', 'schedule', 'min_lr', 'adam_beta2', 'adam_eps')},
                    decoder_dim=64, decoder_layers=4, decoder_kernel=7, decoder_groups=16, clones=8, ema_end=0.9999)
# data2vec 2.0 vision ViT-B/16 (fairseq examples/data2vec/config/v2/base_images_only_task.yaml): 2 prenet + 10 shared
# post-LN blocks (one stack here: encoders.ImageFrontEnd), K 10 of the shared ones, IN → average → LN targets of the FFN
# outputs, inverse block masks (R 0.8, 3 × 3, A 0.07), M 16, a 2-D decoder, the CLS loss, no dropout of any kind;
# Adam (0.9, 0.95) ε 1e-8 wd 0.05 without decay on 1-D parameters (composite optimizer: optim_overrides), lr 1e-3,
# cosine from 50,040 warm-up updates to 0 at 375,300, clip 4; 16 GPUs × 16 images; MAE's crops (scale 0.2–1) and flips
VISION2_BASE = dict(version=2, dropout=0.0, attn_dropout=0.0, layerdrop=0.0, drop_path=0.0, layers=12, top_k=10,
                    target_layer='ffn', target_norm='instance', target_post_norm='layer', loss_beta=0.0, loss_scale=0.0,
                    cls_loss=0.01, cls_rows=16 * 16, mask_prob=0.8, mask_length=3, mask_adjust=0.07, clones=16, decoder_dim=768,
                    decoder_layers=6, decoder_kernel=3, decoder_groups=16, decoder_dropout=0.0, mask_noise_std=0.01,
                    ema_start=0.9998, ema_end=0.99999, ema_anneal_steps=100_000, schedule='cosine', lr=1e-3, min_lr=0.0,
                    weight_decay=0.05, no_decay_1d=True, adam_beta2=0.95, adam_eps=1e-8, clip=4.0,
                    warmup=50_040 / 375_300, steps=375_300, batch_size=256, micro_batch_size=16, min_crop_scale=0.2,
                    color_jitter=False, workers=10, log_every=200, ckpt_every=25_000)
# large (large_images_only_task.yaml): 24 blocks (no prenet), K 18, R 0.75, A 0.1, a 3-layer decoder of C 1024, kernel 5,
# τ → 0.99999 over 150k (the secondary notes' Table 8: τe 1.0 over 500k; DEVIATIONS.md 46), lr 4e-4, 16 GPUs × 8 images
VISION2_LARGE = dict(VISION2_BASE, dim=1024, layers=24, heads=16, ffn_dim=4096, top_k=18, mask_prob=0.75, mask_adjust=0.1,
                     decoder_dim=1024, decoder_layers=3, decoder_kernel=5, ema_anneal_steps=150_000, lr=4e-4,
                     batch_size=128, micro_batch_size=8, cls_rows=8 * 16)
# tiny: VISION_TINY's model and images (32², 4² patches: 12 of 64 kept), base's mechanism; 16 images × M 16 = 256 rows
# per micro-batch, base's per-GPU shape. ≤ 5 min on 2 CPU cores
VISION2_TINY = dict(VISION2_BASE, **{k: VISION_TINY[k] for k in ('image_size', 'patch_size', 'dim', 'layers', 'heads', 'ffn_dim',
                                                                  'workers', 'log_every', 'ckpt_every')},
                    top_k=3, decoder_dim=128, ema_start=0.995, ema_end=0.9999, ema_anneal_steps=300, lr=1e-3, warmup=0.1,
                    steps=300, batch_size=16, micro_batch_size=16, min_crop_scale=0.35)
# data2vec 2.0 text (fairseq examples/data2vec/config/v2/base_text_only_task.yaml): RoBERTa-base's embeddings and 12
# post-LN blocks, random masks of p 0.48 (MAE's argsort of noise; never a special token, DEVIATIONS.md 49), the student
# reads the visible tokens only, M 8, a 1-D decoder of 5 layers C 768, kernel 9, 1 group, no residual, a 2-layer
# projection (C → 2C → GELU → D); IN per block → the average of all 12 FFN outputs, no final norm; L2 × loss_scale 1;
# the teacher averages the blocks only (ema_encoder_only) and reads the student's embedding; τ 0.9999 → 0.99999 over
# 100k; Adam (0.9, 0.98) ε 1e-6 wd 0.01, no decay on 1-D parameters (composite optimizer: optim_overrides), lr 2e-4,
# cosine after 4k warm-up to 0 at 1M updates, clip 1; 16 GPUs × 4 blocks of 512 tokens (sample_break_mode none)
TEXT2_BASE = dict(TEXT_BASE, version=2, dropout=0.1, attn_dropout=0.1, layerdrop=0.0, top_k=12, target_layer='ffn',
                  target_norm='instance', target_post_norm='none', loss_beta=0.0, loss_scale=1.0, mask_prob=0.48, mask_length=1,
                  clones=8, decoder_dim=768, decoder_layers=5, decoder_kernel=9, decoder_groups=1, decoder_residual=False,
                  decoder_projection_layers=2, decoder_dropout=0.1, mask_noise_std=0.01, ema_start=0.9999, ema_end=0.99999,
                  ema_anneal_steps=100_000, schedule='cosine', lr=2e-4, min_lr=0.0, weight_decay=0.01, no_decay_1d=True,
                  adam_beta2=0.98, adam_eps=1e-6, clip=1.0, warmup=4_000 / 1_000_000, steps=1_000_000, batch_size=64,
                  micro_batch_size=4, log_every=200, ckpt_every=50_000)
# large (large_text_only_task.yaml): 24 blocks of 1024, K 24, LayerNorm per block and instance norm on the average, p 0.5,
# lr 1e-4, 600k updates, 32 GPUs × 2 blocks; the decoder stays C 768
TEXT2_LARGE = dict(TEXT2_BASE, dim=1024, layers=24, heads=16, ffn_dim=4096, top_k=24, target_norm='layer',
                   target_post_norm='instance', mask_prob=0.5, lr=1e-4, steps=600_000, warmup=4_000 / 600_000, micro_batch_size=2)
# tiny: TEXT_TINY's model and blocks of 64 tokens, base's mechanism: K = all 4 blocks (base: all 12), C = D, τ as v1 tiny;
# 8 blocks × M 8 per update, a quarter of v1 tiny's 32 blocks as base's 64 are of v1 base's 256. ≤ 5 min on 2 CPU cores
TEXT2_TINY = dict(TEXT2_BASE, **{k: TEXT_TINY[k] for k in ('vocab_size', 'max_tokens', 'block_size', 'dim', 'layers', 'heads',
                                                           'ffn_dim', 'workers', 'log_every', 'ckpt_every', 'steps')},
                  top_k=4, decoder_dim=64, ema_start=0.999, ema_end=0.9999, ema_anneal_steps=300, lr=1e-3, warmup=0.1,
                  batch_size=8, micro_batch_size=8)
PRESETS_V2 = {'speech': {'tiny': SPEECH2_TINY, 'small': dict(SPEECH2_TINY, **{k: PRESETS['speech']['small'][k] for k in (
    'pos_conv_depth', 'steps', 'ema_anneal_steps', 'log_every', 'ckpt_every')}),   # v1 small's changes to tiny
    'base': SPEECH2_BASE, 'large': SPEECH2_LARGE},
    'vision': {'tiny': VISION2_TINY, 'small': dict(VISION2_TINY, **{k: PRESETS['vision']['small'][k] for k in (
        'image_size', 'steps', 'warmup', 'log_every', 'ckpt_every')}, ema_anneal_steps=1200),   # v1 small's changes to tiny
        'base': VISION2_BASE, 'large': VISION2_LARGE},
    'text': {'tiny': TEXT2_TINY, 'small': dict(TEXT2_TINY, **{k: PRESETS['text']['small'][k] for k in (
        'steps', 'ema_anneal_steps', 'log_every', 'ckpt_every')}),   # v1 small's changes to tiny
        'base': TEXT2_BASE, 'large': TEXT2_LARGE}}
V2_ONLY = ('decoder_dim', 'decoder_layers', 'decoder_kernel', 'decoder_groups', 'decoder_residual', 'decoder_projection_layers',
           'mask_noise_std', 'decoder_dropout', 'clones', 'mask_adjust', 'cls_loss', 'cls_rows')
V1_ONLY = ('pad', 'ema_front_end',                                    # v2 speech: crops to the shortest clip; its teacher split
           'layer_scale', 'rel_pos_bias',                               # v2 vision: post-LN blocks, fixed positions
           'text_mask')                                                 # v2 text: random masks of --mask-prob

# flags that only one or two modalities have: anywhere else they are an error, not silently ignored
ONLY = {'speech': ('crop', 'pad', 'crop_step', 'conv_dim', 'pos_conv_depth', 'pos_conv_kernel', 'pos_conv_groups', 'pos_conv_zero', 'layerdrop',
                   'feature_grad_mult', 'ema_front_end', 'mask_adjust'),          # mask_adjust: v2's block masks
        'vision': ('image_size', 'patch_size', 'layer_scale', 'drop_path', 'min_crop_scale', 'rel_pos_bias', 'cls_loss',
                   'cls_rows', 'color_jitter', 'mask_adjust'),
        'text': ('encoding', 'tokenizer', 'text_mask', 'block_size', 'vocab_size', 'max_tokens', 'pad_id', 'layerdrop')}
SHOWN_WITHOUT_PRESET = ('modality', 'preset', 'data', 'out', 'device', 'compile', 'seed', 'resume', 'strict_data', 'pad', 'init')


def add_flags(parser, dataclasses, defaults=lambda f: None):
    """One --flag per dataclass field (bools as --x/--no-x), with the field's help; `defaults(f)` → (default, shown)."""
    for f in dataclasses:
        kind = type(f.default) if f.default is not MISSING else str
        kw = dict(action=argparse.BooleanOptionalAction) if kind is bool else dict(type=kind)
        default, shown = defaults(f) or (None, '')
        text = f"{f.metadata.get('help', '')} {shown}".strip().replace('%', '%%')   # argparse formats help with %
        parser.add_argument('--' + f.name.replace('_', '-'), default=default, help=text, **kw)


def parse_train_args(argv=None):
    """train.py's flags → (ModelConfig, TrainConfig), the preset filled in, every value checked."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--modality', default='speech')
    pre.add_argument('--version', type=int, default=1)
    known = pre.parse_known_args(argv)[0]
    modality, version = known.modality, known.version
    presets = (PRESETS_V2 if version == 2 else PRESETS).get(modality, PRESETS['speech'])
    p = argparse.ArgumentParser(description=f'data2vec pretraining. Every flag defaults to its --preset value (tiny unless '
                                            f'given); [base …, tiny …] shows them for --modality {modality}.')

    def shown(f):
        base, tiny = presets['base'].get(f.name, f.default), presets['tiny'].get(f.name, f.default)
        return None, '' if f.name in SHOWN_WITHOUT_PRESET else f'[base {base!r}' + (f', tiny {tiny!r}]' if tiny != base else ']')
    add_flags(p, fields(ModelConfig) + fields(TrainConfig), shown)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    preset = args.get('preset', 'tiny')
    if modality not in PRESETS:
        p.error(f'--modality {modality}: choose from {", ".join(PRESETS)}')
    if version not in (1, 2):
        p.error(f'--version {version}: choose 1 or 2')
    if preset not in presets:
        p.error(f'--preset {preset}: choose from {", ".join(presets)}' + (' (data2vec 2.0)' if version == 2 else ''))
    for name in set(V2_ONLY if version == 1 else V1_ONLY) & set(args):
        p.error(f'--{name.replace("_", "-")} is for --version {3 - version}; it does nothing for --version {version}')
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


def patch_mask_size(mcfg, cfg):
    """Vision: the patch grid side and the patches masked per image, round(mask_prob · N) (BEiT: 120 of 196)."""
    grid = mcfg.image_size // mcfg.patch_size
    return grid, round(cfg.mask_prob * grid ** 2)


def random_mask_count(T, mask_prob):
    """data2vec 2.0 text: the tokens masked in each block of T, T − int(T·(1 − p)) (fairseq random_masking keeps int(T·(1 − p)))."""
    return T - int(T * (1 - mask_prob))


def modality_checks(mcfg, cfg):
    """(ok, message) for the flags only one modality has (ONLY); the others' values are never used there."""
    grid, count = patch_mask_size(mcfg, cfg)
    return {
        'speech': [(cfg.crop >= 16_000, f'--crop {cfg.crop} must be ≥ 16000 samples (1 s)'),
                   (mcfg.pos_conv_zero in ('every', 'first'), f'--pos-conv-zero {mcfg.pos_conv_zero}: choose every or first'),
                   (mcfg.dim % mcfg.pos_conv_groups == 0, f'--dim {mcfg.dim} must be divisible by --pos-conv-groups {mcfg.pos_conv_groups}')],
        'vision': [
            (mcfg.image_size % mcfg.patch_size == 0, f'--image-size {mcfg.image_size} must be divisible by --patch-size {mcfg.patch_size}'),
            (grid >= 2, f'--image-size {mcfg.image_size} / --patch-size {mcfg.patch_size} must give a grid of at least 2 × 2 patches'),
            (0 < cfg.mask_prob <= 1, f'--mask-prob {cfg.mask_prob}: the fraction of patches masked must be in (0, 1]'),
            (cfg.mask_length <= min(count, (grid - 1) ** 2), f'--mask-length {cfg.mask_length}: a block cannot exceed the '
             f'{count} masked patches or the {(grid - 1) ** 2} a block may cover on a {grid} × {grid} grid')
            if mcfg.version == 1 else
            (cfg.mask_length <= grid and int(grid * grid * (1 - cfg.mask_prob)) >= 1, f'--mask-length {cfg.mask_length} '
             f'(the side of a kept block) must be ≤ the grid ({grid}) and --mask-prob {cfg.mask_prob} must keep a patch of {grid ** 2}'),
            (mcfg.version == 1 or mcfg.dim % 4 == 0, f'--dim {mcfg.dim} must be divisible by 4 (data2vec 2.0\'s sine-cosine positions)'),
            (cfg.cls_loss >= 0 and cfg.cls_rows >= 1, f'--cls-loss {cfg.cls_loss} must be ≥ 0 and --cls-rows {cfg.cls_rows} ≥ 1'),
            (0 < cfg.min_crop_scale <= 1, f'--min-crop-scale {cfg.min_crop_scale} must be in (0, 1]'),
            (0 <= mcfg.drop_path < 1, f'--drop-path {mcfg.drop_path} must be in [0, 1)'),
            (mcfg.rel_pos_bias in ('shared', 'layer'), f'--rel-pos-bias {mcfg.rel_pos_bias}: choose shared or layer')],
        'text': [
            (3 <= cfg.block_size <= mcfg.max_tokens, f'--block-size {cfg.block_size} must be in [3, --max-tokens {mcfg.max_tokens}]'),
            (cfg.text_mask in ('bert', 'span'), f'--text-mask {cfg.text_mask}: choose bert or span'),
            (mcfg.version == 1 or cfg.mask_length == 1, f'--mask-length {cfg.mask_length}: data2vec 2.0 masks single tokens '
                                                        '(fairseq mask_length 1; its block masks for text are not built)'),
            (mcfg.version == 1 or random_mask_count(cfg.block_size, cfg.mask_prob) <= cfg.block_size - 2,
             f'--mask-prob {cfg.mask_prob} masks {random_mask_count(cfg.block_size, cfg.mask_prob)} of --block-size '
             f'{cfg.block_size} tokens, more than the {cfg.block_size - 2} between <s> and </s>'),
            (mcfg.vocab_size >= 256 + N_SPECIALS, f'--vocab-size {mcfg.vocab_size} must be ≥ {256 + N_SPECIALS}: 256 bytes + specials')],
    }[mcfg.modality]


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
        (cfg.crop_step >= 1, f'--crop-step {cfg.crop_step} must be ≥ 1'),
        (cfg.device in ('auto', 'cpu', 'cuda'), f'--device {cfg.device}: choose auto, cpu or cuda'),
        (cfg.device != 'cuda' or torch.cuda.is_available(), '--device cuda: no CUDA device is available'),
        (mcfg.dim % mcfg.heads == 0, f'--dim {mcfg.dim} must be divisible by --heads {mcfg.heads}'),
        (0 <= mcfg.layer_norm_eps < 1, f'--layer-norm-eps {mcfg.layer_norm_eps} must be in [0, 1)'),
        (mcfg.version == 1 or (cfg.clones >= 1 and mcfg.decoder_layers >= 1 and mcfg.decoder_kernel >= 1 and
                               mcfg.decoder_dim % mcfg.decoder_groups == 0 == mcfg.dim % mcfg.decoder_groups),
         '--clones, --decoder-layers, --decoder-kernel must be ≥ 1 and --decoder-dim, --dim divisible by --decoder-groups'),
        (mcfg.decoder_projection_layers in (1, 2), f'--decoder-projection-layers {mcfg.decoder_projection_layers}: choose 1 or 2'),
        (mcfg.version == 1 or (0 < cfg.mask_prob < 1 and cfg.mask_adjust >= 0),
         f'--mask-prob {cfg.mask_prob} must be in (0, 1) and --mask-adjust {cfg.mask_adjust} ≥ 0 (data2vec 2.0)'),
        (all(0 <= p < 1 for p in (mcfg.dropout, mcfg.attn_dropout, mcfg.layerdrop)), 'dropouts must be in [0, 1)'),
        (cfg.workers >= 0, f'--workers {cfg.workers} must be ≥ 0'),
        (cfg.seed >= 0, f'--seed {cfg.seed} must be ≥ 0'),
        (cfg.max_bad_steps >= 1, f'--max-bad-steps {cfg.max_bad_steps} must be ≥ 1'),
        (cfg.collapse_check_from >= 0, f'--collapse-check-from {cfg.collapse_check_from} must be ≥ 0'),
    ] + modality_checks(mcfg, cfg)
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


# -------------------------------------------------------------------------------------------- fine-tuning


@dataclass
class FinetuneConfig:
    modality: str = knob('speech', 'speech | vision | text')
    init: str = knob('', "a train.py checkpoint.pt, a released model's folder (HF format: released.py), or scratch: the "
                         'same architecture (--preset) with random weights')
    task: str = knob('', 'speech: ctc (letters; WER, CER) | classify (label = the folder name); vision, text: classify')
    data: str = knob('', 'labelled training data; empty: the embedded synthetic set. speech: folder of .wav/.flac with '
                         '*.trans.txt (ctc) or <label>/ folders; vision: <class>/<image>; text: TSV with a header or label-sentence lines')
    test_data: str = knob('', 'held-out data in the same layout; empty: the embedded valid split, or a fixed --holdout of --data')
    holdout: float = knob(0.2, 'fraction of --data held out (seed 0, the same for every --seed) when there is no --test-data')
    labeled: int = knob(0, 'train on N labelled examples only: a fixed (seed 0), class-balanced subset; 0 = all')
    linear_probe: bool = knob(False, 'freeze the encoder (eval mode) and train the head only')
    probe_layers: str = knob('last', "what the head reads: last (the last block's output) | mean (of every block's) | "
                                     "weighted (a learned softmax mix of them, SUPERB)")
    pool: str = knob('cls', "text classify: what the head reads: cls (RoBERTa's head on <s>: Dropout → Linear → tanh → "
                            "Dropout → Linear) | mean (the mean over the tokens → BatchNorm without affine → Linear: a linear "
                            "probe, as speech's)")
    use_teacher: bool = knob(False, "start from the checkpoint's EMA teacher instead of the student (the paper uses the student)")
    preset: str = knob('', "recipe (and, with --init scratch, architecture): tiny | base; default: the checkpoint's, else tiny")
    arch: str = knob('', "--init scratch: a train.py run's config.json whose architecture to use (default: --preset's)")
    image_size: int = knob(0, 'vision, --init scratch: the image size (0 = the preset\'s)')
    encoding: str = knob('utf-8', 'text: the encoding of --data and --test-data')
    tokenizer: str = knob('', 'text: tokenizer.json, or a folder with vocab.json + merges.txt; default: the one beside the '
                              'checkpoint; scratch: a BPE trained on the training texts')
    out: str = knob('', 'output folder (default runs/finetune-<modality>)')
    device: str = knob('auto', 'auto | cpu | cuda')
    seed: int = knob(0, 'random seed: head init, data order, masks (and the weights, for --init scratch)')
    steps: int = knob(0, "updates (default: the recipe's); --steps 0 scores a released fine-tuned model with its own head")
    batch_size: int = knob(0, 'examples per update, over all processes and accumulation steps')
    micro_batch_size: int = knob(0, 'examples per forward pass on one device; accumulation does the rest. 0 = --batch-size / '
                                    'processes (no accumulation)')
    lr: float = knob(0.0, 'peak learning rate (default: the recipe\'s, higher for --linear-probe)')
    head_lr: float = knob(0.0, "the head's peak learning rate (default: the recipe's, else --lr)")
    schedule: str = knob('', 'tri_stage | cosine (config.lr_at)')
    warmup: float = knob(-1.0, 'fraction of the steps warming up')
    hold: float = knob(-1.0, 'tri_stage: fraction of the steps at the peak')
    min_lr: float = knob(0.0, 'cosine: the final learning rate')
    weight_decay: float = knob(-1.0, 'decoupled weight decay')
    adam_beta2: float = knob(0.0, 'Adam β2 (β1 = 0.9)')
    no_decay_1d: bool = knob(False, 'no weight decay on 1-D parameters, the CLS token and the relative position bias (BEiT)')
    layer_decay: float = knob(0.0, 'block i of L gets lr × layer_decay^(L − i); the front end ^(L + 1), the head 1 (BEiT)')
    label_smoothing: float = knob(-1.0, 'classification: label smoothing')
    drop_path: float = knob(-1.0, 'vision: stochastic depth of the last block')
    layerdrop: float = knob(-1.0, 'speech, text: LayerDrop')
    min_crop_scale: float = knob(0.0, 'vision: random resized crops of the training images cover this fraction of the image or more')
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
SPEECH_RECIPE = dict(schedule='tri_stage', weight_decay=0.0, adam_beta2=0.98, layer_decay=1.0, label_smoothing=0.0, freeze_steps=0)
TEXT_RECIPE = dict(schedule='cosine', weight_decay=0.1, adam_beta2=0.98, layer_decay=1.0, label_smoothing=0.0, layerdrop=0.0)
RECIPES = {
    'speech': {'base': dict(SPEECH_RECIPE, steps=80_000, batch_size=128, lr=3e-5, probe_lr=1e-3, warmup=0.1, hold=0.4,
                            layerdrop=0.1, mask_prob=0.65, mask_length=10, mask_channel_prob=0.5, mask_channel_length=64),
               'tiny': dict(SPEECH_RECIPE, steps=400, batch_size=16, lr=3e-4, head_lr=1e-2, probe_lr=3e-3, warmup=0.1, hold=0.4,
                            layerdrop=0.0, mask_prob=0.0, mask_length=5, mask_channel_prob=0.0, mask_channel_length=16)},
    # tiny: no SpecAugment and a faster head (DEVIATIONS.md 38): the CTC loss leaves the blank plateau in 400 updates
    'vision': {'base': dict(steps=125_000, batch_size=1024, lr=4e-3, probe_lr=1e-2, schedule='cosine', warmup=0.2, min_lr=1e-6,
                            weight_decay=0.0, no_decay_1d=True, adam_beta2=0.999, layer_decay=0.65, label_smoothing=0.1,
                            drop_path=0.2, min_crop_scale=0.08),   # BEiT fine-tuning: RandomResizedCrop, scale (0.08, 1)
               'tiny': dict(steps=300, batch_size=64, lr=1e-3, probe_lr=3e-3, schedule='cosine', warmup=0.1, min_lr=1e-6,
                            weight_decay=0.05, no_decay_1d=True, adam_beta2=0.999, layer_decay=0.75, label_smoothing=0.1,
                            drop_path=0.1, min_crop_scale=0.35)},  # the tiny pretraining preset's crops
    'text': {'base': dict(TEXT_RECIPE, steps=10_000, batch_size=32, lr=2e-5, probe_lr=1e-3, warmup=0.06),
             'tiny': dict(TEXT_RECIPE, steps=300, batch_size=32, lr=3e-4, probe_lr=3e-3, warmup=0.1)},
}
# data2vec 2.0 vision base (fairseq config/vision/finetuning/mae_imagenet_clean.yaml): Adam (0.9, 0.95), wd 0.05,
# lr 1e-3 for 512 images, cosine after 16k warm-up, 250,200 updates, layer decay 0.65, drop path 0.1, label smoothing
# 0.1; its mixup and cutmix are not built (DEVIATIONS.md 48). Other (modality, preset) pairs take RECIPES'.
RECIPES_V2 = {('vision', 'base'): dict(RECIPES['vision']['base'], steps=250_200, batch_size=512, lr=1e-3, adam_beta2=0.95,
                                       weight_decay=0.05, warmup=16_000 / 250_200, layer_decay=0.65, drop_path=0.1)}
TASKS = {'speech': ('ctc', 'classify'), 'vision': ('classify',), 'text': ('classify',)}


def parse_finetune_args(argv=None):
    p = argparse.ArgumentParser(description='data2vec fine-tuning and linear probes. Flags not given come from the recipe (RECIPES).')
    add_flags(p, fields(FinetuneConfig), lambda f: (f.default, ''))
    cfg = FinetuneConfig(**vars(p.parse_args(argv)))
    given = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)   # which flags the user gave
    add_flags(given, fields(FinetuneConfig), lambda f: (argparse.SUPPRESS, ''))
    cfg.given = set(vars(given.parse_known_args(argv)[0]))             # not a field: neither saved nor compared on resume
    tasks = TASKS.get(cfg.modality, ('classify',))
    cfg.task = cfg.task or tasks[0]
    cfg.out = cfg.out or f'runs/finetune-{cfg.modality}'
    checks = [(cfg.modality in RECIPES, f'--modality {cfg.modality}: choose speech, vision or text'),
              (cfg.init != '', '--init: a train.py checkpoint.pt, or scratch'),
              (cfg.task in tasks, f'--task {cfg.task}: {cfg.modality} supports {" or ".join(tasks)}'),
              (cfg.preset in ('', 'tiny', 'base'), f'--preset {cfg.preset}: choose tiny or base'),
              (cfg.labeled >= 0 and 0 < cfg.holdout < 1, '--labeled must be ≥ 0 and --holdout in (0, 1)'),
              (cfg.probe_layers in ('last', 'mean', 'weighted'), f'--probe-layers {cfg.probe_layers}: choose last, mean or weighted'),
              (cfg.pool in ('cls', 'mean'), f'--pool {cfg.pool}: choose cls or mean'),
              (cfg.pool == 'cls' or (cfg.modality, cfg.task) == ('text', 'classify'),
               '--pool is for --modality text (speech and vision classify pool the mean already)'),
              (not cfg.arch or cfg.init == 'scratch', '--arch is for --init scratch (a checkpoint has its own architecture)'),
              (cfg.seed >= 0 and cfg.ckpt_every >= 1 and cfg.max_bad_steps >= 1, '--seed ≥ 0, --ckpt-every and --max-bad-steps ≥ 1'),
              (cfg.device in ('auto', 'cpu', 'cuda'), f'--device {cfg.device}: choose auto, cpu or cuda'),
              (cfg.steps >= 0, f'--steps {cfg.steps} must be ≥ 0'),
              (cfg.micro_batch_size >= 0, f'--micro-batch-size {cfg.micro_batch_size} must be ≥ 0 (0: --batch-size / processes)'),
              (not cfg.test_data or cfg.data or (cfg.steps == 0 and 'steps' in cfg.given),
               '--test-data needs --data (except with --steps 0: a released model scored as it is)')]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    return cfg


def fill_recipe(cfg, preset, version=1, world=1):
    """Knobs not given as flags take the recipe's value (the lr: probe_lr under --linear-probe), so --no-no-decay-1d or
    --lr 0 mean what they say; a data2vec 2.0 encoder takes RECIPES_V2's where it has one. --micro-batch-size 0 becomes
    --batch-size / `world` (the number of processes). → None, or the error message of an out-of-range value."""
    v2 = RECIPES_V2.get((cfg.modality, preset)) if version == 2 else None
    recipe = dict(v2 or RECIPES[cfg.modality][preset])
    probe_lr, head_lr = recipe.pop('probe_lr'), recipe.pop('head_lr', 0.0)
    recipe['lr'] = probe_lr if cfg.linear_probe else recipe['lr']
    if cfg.task == 'classify' or cfg.linear_probe:                # SpecAugment is CTC fine-tuning's (DEVIATIONS.md)
        recipe.update(mask_prob=0.0, mask_channel_prob=0.0)
    given = getattr(cfg, 'given', {f.name for f in fields(cfg) if getattr(cfg, f.name) != f.default})
    for name, value in recipe.items():
        if name not in given:
            setattr(cfg, name, value)
    if 'head_lr' not in given:                                    # a probe's head is all that trains: it takes --lr
        cfg.head_lr = head_lr if head_lr and not cfg.linear_probe else cfg.lr
    cfg.micro_batch_size = cfg.micro_batch_size or cfg.batch_size // world     # saved as resolved: resume checks it
    for ok, msg in [(cfg.steps >= 1 or 'steps' in given, '--steps must be ≥ 1 (0: evaluate a released fine-tuned model)'),
                    (cfg.batch_size >= 1, '--batch-size must be ≥ 1'),
                    (cfg.micro_batch_size >= 1 and cfg.batch_size % (cfg.micro_batch_size * world) == 0,
                     f'--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size × processes '
                     f'({cfg.micro_batch_size} × {world})'),
                    (cfg.lr > 0, f'--lr {cfg.lr} must be > 0'),
                    (cfg.head_lr > 0, f'--head-lr {cfg.head_lr} must be > 0'),
                    (cfg.schedule in ('tri_stage', 'cosine'), f'--schedule {cfg.schedule}: choose tri_stage or cosine'),
                    (0 < cfg.layer_decay <= 1, f'--layer-decay {cfg.layer_decay} must be in (0, 1]'),
                    (cfg.modality != 'vision' or 0 < cfg.min_crop_scale <= 1, f'--min-crop-scale {cfg.min_crop_scale} must be in (0, 1]'),
                    (cfg.weight_decay >= 0 and 0 <= cfg.warmup <= 1, '--weight-decay must be ≥ 0 and --warmup in [0, 1]'),
                    (0 < cfg.adam_beta2 < 1 and 0 <= cfg.label_smoothing < 1, '--adam-beta2 must be in (0, 1), --label-smoothing in [0, 1)')]:
        if not ok:
            return msg

# -------------------------------------------------------------------------------------------- derived from a config


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


def pick_device(choice, local_rank=0):
    """(device, is_cuda, autocast): CUDA if asked for or available, with bf16 autocast and TF32; the CPU stays fp32
    (bf16 autocast on CPU made the conv feature encoder dozens of times slower)."""
    cuda = choice == 'cuda' or (choice == 'auto' and torch.cuda.is_available())
    device = torch.device(f'cuda:{local_rank}' if cuda else 'cpu')
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, cuda, torch.autocast('cuda', dtype=torch.bfloat16) if cuda else nullcontext()


def to_device(batch, device):
    """A collated batch (a dict of tensors and Nones) on the device; copies from pinned memory do not block the host."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

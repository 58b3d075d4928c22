"""Modality front-ends: everything between the raw input and the Transformer, one class per modality.

data2vec (paper, 'Model architecture') keeps one learning algorithm for all modalities and puts the modality-specific
work in a front-end ('feature encoder'). Each front-end answers the same questions (`FrontEnd`): how the raw input
becomes tokens (B, T, D) with their padding, how a mask enters, what the teacher reads, where positions enter the
attention, and whether the EMA teacher averages the front-end or shares it with the student.

speech (wav2vec 2.0, data2vec speech v1; `SpeechFrontEnd`):
    waveform (B, S) ─ normalise per utterance ─ 7 × Conv1d (stride 320 in all, ≈ 20 ms frames)
        ─ LayerNorm(C_conv) ─ Linear(C_conv → D) ─→ features (B, T, D)
        ─ [student: masked frames → mask embedding] ─ conv positional encoder: x + g(x) ─→ tokens
    the teacher reads the positional encoder's output for the unmasked features: both encoders are shared

images (BEiT, data2vec vision v1, facebookresearch/data2vec_vision/beit; `ImageFrontEnd`):
    image (B, 3, H, W) ─ ImageNet mean/std ─ Conv2d(3, D, P, stride P) ─→ patches (B, N, D), N = (H/P)(W/P)
        ─ [student: masked patches → mask token] ─ CLS token prepended ─→ tokens (B, 1 + N, D)
    positions: no absolute embedding; one relative position bias shared by all blocks, added to the logits
    the teacher averages the whole front-end (BEiT's EMA of the whole model) and reads the raw image
    data2vec 2.0: + fixed 2-D sine-cosine positions, no mask token (the student reads the visible patches only), no
    relative position bias; post-LN blocks

text (RoBERTa, data2vec text v1; `TextFrontEnd`):
    token ids (B, T), masked in the ids (<mask>) ─ token embedding + learned position embedding (offset pad + 1)
        ─ LayerNorm ─→ tokens (B, T, D); no √D embedding scaling
    the teacher reads the embedding of the original ids through the student's embedding: shared
    data2vec 2.0: the ids unmasked; the student reads the visible tokens' embeddings only

Legend: B batch, S waveform samples, T frames or tokens, C conv channels, D model width, N patches, H heads.
Mask convention (masking.py): mask is bool (B, T), True = masked.
Parameter names follow fairseq/HF closely enough that a plain key map loads released weights (README).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from config import ModelConfig

SAMPLE_RATE = 16_000
# (kernel, stride) of the 7 conv layers of wav2vec 2.0 / data2vec: 5·2⁶ = 320 samples per frame, 400-sample receptive field
CONV_LAYERS = ((10, 5),) + ((3, 2),) * 4 + ((2, 2),) * 2


def conv_output_length(n_samples):
    """Frames the feature encoder makes from n samples: n ← ⌊(n − k)/s⌋ + 1 for each conv (16000 → 49).

    Works on ints and on integer tensors; lengths shorter than the receptive field give 0.
    """
    n = n_samples
    for k, s in CONV_LAYERS:
        n = (n - k) // s + 1
    return n.clamp(min=0) if torch.is_tensor(n) else max(n, 0)


def normalize_waveform(wav, padding_mask=None, eps=1e-5):
    """Per-utterance normalisation (fairseq `task.normalize`): x̂ = (x − mean x) / sqrt(var x + ε).

    wav: (B, S); padding_mask: (B, S) bool, True = padding. Statistics use the valid samples only,
    and padded samples come out as zeros.
    """
    valid = torch.ones_like(wav) if padding_mask is None else (~padding_mask).to(wav.dtype)  # (B, S)
    n = valid.sum(-1, keepdim=True).clamp(min=1)                                           # (B, 1)
    mean = (wav * valid).sum(-1, keepdim=True) / n
    var = ((wav - mean).square() * valid).sum(-1, keepdim=True) / n
    return (wav - mean) * torch.rsqrt(var + eps) * valid


class ConvLayer(nn.Module):
    """Conv1d (no bias) → LayerNorm over channels → GELU (fairseq `extractor_mode: layer_norm`)."""

    def __init__(self, c_in, c_out, kernel, stride):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=False)
        self.layer_norm = nn.LayerNorm(c_out)
        nn.init.kaiming_normal_(self.conv.weight)

    def forward(self, x):                                          # (B, C_in, S_in)
        x = self.conv(x)                                           # (B, C, S_out)
        x = rearrange(self.layer_norm(rearrange(x, 'b c t -> b t c')), 'b t c -> b c t')
        return F.gelu(x)


def scale_grad(x, k):
    """Identity forward, gradient × k backward (fairseq GradMultiply): x̄ + k·(x − x̄), x̄ = x without gradient."""
    return x if k == 1 else x.detach() + (x - x.detach()) * k


class SpeechFeatureEncoder(nn.Module):
    """Waveform → frame features: normalise, 7 conv layers, LayerNorm(C), Linear(C → D).

    In data2vec this module is shared by student and teacher: the teacher reads its output
    for the unmasked input (paper: 'share the parameters of the feature encoder'); --ema-front-end gives the
    teacher its own EMA copy instead.
    grad_mult: the conv layers' gradient is scaled by it (wav2vec 2.0 feature_grad_mult: 0.1; data2vec: 1).
    """

    def __init__(self, conv_dim=512, dim=768, grad_mult=1.0, eps=1e-5):
        super().__init__()
        self.grad_mult = grad_mult
        chans = [1] + [conv_dim] * len(CONV_LAYERS)
        self.conv_layers = nn.ModuleList(ConvLayer(chans[i], chans[i + 1], k, s) for i, (k, s) in enumerate(CONV_LAYERS))
        self.layer_norm = nn.LayerNorm(conv_dim, eps=eps)
        self.projection = nn.Linear(conv_dim, dim)

    def forward(self, wav, padding_mask=None):
        """wav: (B, S); padding_mask: (B, S) bool or None. Returns (B, T, D) and the frame padding mask (B, T) or None."""
        x = self.project(self.convolve(wav, padding_mask))       # (B, T, D)
        if padding_mask is None:
            return x, None
        lengths = conv_output_length((~padding_mask).sum(-1))      # (B,) valid frames
        frame_padding = torch.arange(x.shape[1], device=x.device) >= lengths[:, None]  # (B, T)
        return x, frame_padding

    def convolve(self, wav, padding_mask=None):
        """The conv layers: (B, S) → (B, T, C)."""
        x = rearrange(normalize_waveform(wav, padding_mask), 'b s -> b 1 s')
        for layer in self.conv_layers:
            x = layer(x)                                           # (B, C, S') … (B, C, T)
        return rearrange(scale_grad(x, self.grad_mult), 'b c t -> b t c')

    def project(self, x):
        """LayerNorm(C) → Linear(C → D): (B, T, C) → (B, T, D)."""
        return self.projection(self.layer_norm(x))


class ConvPositionalEncoder(nn.Module):
    """Relative positions from convolution (data2vec speech; fairseq `pos_conv_depth: 5`, `conv_pos: 95`):

        x ← x + g(x),   g = depth × [Conv1d(D, D, k, groups, padding k//2) → LayerNorm (no affine) → GELU]

    with k = 95 // 5 = 19 and 16 groups for the paper's models. Padded frames are zeroed before every
    layer, so valid frames do not depend on padding (fairseq/HF zero them before the first layer only; zero='first'
    does that, for the released models). Shared by student and teacher: the teacher reads it for the unmasked features.
    """

    def __init__(self, dim=768, depth=5, kernel=19, groups=16, zero='every'):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups) for _ in range(depth))
        self.zero_every = zero == 'every'

    def forward(self, x, padding_mask=None):                       # (B, T, D)
        keep = 1.0 if padding_mask is None else rearrange(~padding_mask, 'b t -> b 1 t').to(x.dtype)
        h = rearrange(x, 'b t d -> b d t') * keep
        for conv in self.convs:
            h = conv_ln_gelu(conv, h) * (keep if self.zero_every else 1.0)   # (B, D, T); zero padding after every layer too
        return x + rearrange(h, 'b d t -> b t d')


def conv_ln_gelu(conv, h):
    """One layer of data2vec's conv stacks (the positional encoder; data2vec 2.0's decoders, 1-D and 2-D):
    Conv → LayerNorm over channels, no affine → GELU.  (B, C, T) → (B, C', T), or (B, C, H, W) → (B, C', H, W); an even
    kernel's extra step is dropped (fairseq SamePad, SamePad2d)."""
    h = conv(h)[(..., *(slice(0, n) for n in h.shape[2:]))]      # (B, C', T) or (B, C', H, W)
    return F.gelu(F.layer_norm(h.movedim(1, -1), h.shape[1:2])).movedim(-1, 1)


class ALiBi(nn.Module):
    """data2vec 2.0 speech's attention bias (ALiBi, Press et al. 2022, symmetric), with a learned scale per head:

        logits_hij += −max(s_h, 0) · m_h · |i − j|,   m_h = 2^(−8(h + 1)/H)  for H a power of 2

    (H = 12: the 8 slopes of H = 8, then every other slope of H = 16, as ALiBi's reference code). s_h starts at 1;
    one scale vector for all blocks (fairseq learned_alibi_scale, per head, not per layer).
    forward(positions (…, T) int) → (…, H, T, T): all steps (torch.arange(T)), or each row's visible steps (R, T_keep).
    """

    def __init__(self, heads):
        super().__init__()
        self.register_buffer('slopes', torch.tensor(alibi_slopes(heads)), persistent=False)   # (H,)
        self.scale = nn.Parameter(torch.ones(heads))

    def forward(self, positions):
        t = positions.to(self.slopes.dtype)
        distance = (t[..., None, :, None] - t[..., None, None, :]).abs()                   # (…, 1, T, T)
        return -(self.scale.clamp_min(0) * self.slopes)[:, None, None] * distance         # (…, H, T, T)


def alibi_slopes(heads):
    """ALiBi's head slopes: 2^(−8/H)^(h + 1) for H a power of 2; otherwise those of the power of 2 below, then
    every other slope of the power of 2 above."""
    if heads & (heads - 1) == 0:
        return [2 ** (-8 * (h + 1) / heads) for h in range(heads)]
    below = 1 << (heads.bit_length() - 1)
    return alibi_slopes(below) + alibi_slopes(2 * below)[0::2][:heads - below]


# ImageNet channel statistics (timm IMAGENET_DEFAULT_MEAN/STD, BEiT --imagenet_default_mean_and_std)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PatchEmbed(nn.Module):
    """Image → patch embeddings: normalise with the ImageNet mean/std, Conv2d(3, D, P, stride P).

    image: (B, 3, H, W) floats in [0, 1] → (B, N, D), patches in row-major order (N = H/P · W/P).
    """

    def __init__(self, dim=768, patch_size=16):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)

    def forward(self, image):
        x = self.proj((image - self.mean) / self.std)              # (B, D, H/P, W/P)
        return rearrange(x, 'b d h w -> b (h w) d')                # (B, N, D)


def sincos_positions_2d(dim, side):
    """data2vec 2.0's fixed image positions (MAE get_2d_sincos_pos_embed, not learned): (side², D), patches row-major.

        for patch (y, x) and i < D/4, with ω_i = 10000^(−i/(D/4)):
        p[0 : D/4] = sin(x·ω)   p[D/4 : D/2] = cos(x·ω)   p[D/2 : 3D/4] = sin(y·ω)   p[3D/4 : D] = cos(y·ω)

    (MAE's first half encodes its grid[0], which np.meshgrid(w, h) makes the column x.)"""
    assert dim % 4 == 0, f'sine-cosine positions need D divisible by 4, not {dim}'
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))      # (D/4,)
    y, x = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing='ij')
    angles = [rearrange(c, 'h w -> (h w) 1') * omega for c in (x, y)]                      # (N, D/4) each
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], 1).float()    # (N, D)


class RelativePositionBias(nn.Module):
    """BEiT's relative position bias, one table shared by every block (data2vec vision v1):

        logits_ij += table[index(i, j)]   per head, for the N + 1 tokens (CLS first, then patches)

    Two patches at rows/columns (y_i, x_i), (y_j, x_j) read the row of their offset
    (y_i − y_j, x_i − x_j): (2h − 1)(2w − 1) offsets on an h × w grid. Three more rows hold CLS → patch,
    patch → CLS and CLS → CLS: (2·14 − 1)² + 3 = 732 rows for ViT-B/16 at 224². Zero at init (BEiT).
    forward() → bias (H, N + 1, N + 1).
    """

    def __init__(self, grid, heads):
        super().__init__()
        h, w = self.grid = grid
        offsets = (2 * h - 1) * (2 * w - 1)
        self.table = nn.Parameter(torch.zeros(offsets + 3, heads))
        yx = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')).flatten(1)  # (2, N)
        dy, dx = yx[:, :, None] - yx[:, None, :]                   # (N, N) each, in [−h + 1, h − 1] and [−w + 1, w − 1]
        index = torch.empty(h * w + 1, h * w + 1, dtype=torch.long)
        index[1:, 1:] = (dy + h - 1) * (2 * w - 1) + (dx + w - 1)
        index[0, :] = offsets                                      # CLS → patch
        index[:, 0] = offsets + 1                                  # patch → CLS
        index[0, 0] = offsets + 2                                  # CLS → CLS
        self.register_buffer('index', index, persistent=False)     # a function of the grid; not in checkpoints (as HF)

    def forward(self):
        return rearrange(self.table[self.index], 'i j h -> h i j')  # (H, N + 1, N + 1)


class TextEmbedding(nn.Module):
    """RoBERTa embeddings: x_t = LN(E[token_t] + P[pos_t]), with no √D scaling (fairseq no_scale_embedding).

    Positions count from 2, as fairseq/RoBERTa's LearnedPositionalEmbedding with <pad> = 1 (padding reads
    row 1): 512 tokens need 514 rows. `pad` is the tokenizer's <pad> id (1 for RoBERTa and ours, 50258 for
    GPT-2 with appended specials); the position layout stays RoBERTa's. tokens: (B, T) int64 → (B, T, D).
    """

    def __init__(self, vocab_size, dim=768, max_tokens=512, pad=1, eps=1e-5):
        super().__init__()
        self.pad = pad
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=pad)
        self.positions = nn.Embedding(max_tokens + 2, dim, padding_idx=1)
        self.layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, tokens):
        real = tokens != self.pad                                  # (B, T)
        positions = torch.cumsum(real, dim=1) * real + 1            # 2, 3, … on real tokens; 1 on padding
        return self.layer_norm(self.tokens(tokens) + self.positions(positions))   # (B, T, D)


# ---------------------------------------------------------------------------------------------- the front-ends


def attention_mask(padding_mask, T, window=0, device=None):
    """Boolean SDPA mask of a 1-D sequence (True = may attend), or None when every step sees every step.

    padding_mask (B, T) hides padded keys; window W > 0 lets step t see only steps |t − s| ≤ W
    (the paper's teacher-context ablation, Figure 3). Every step may see itself, so no row is empty
    (a padded step further than W from any valid one would be). Returns (B, 1, T, T), (T, T) or None.
    """
    idx = torch.arange(T, device=device)
    mask = None
    if window > 0:
        mask = (idx[:, None] - idx[None, :]).abs() <= window                 # (T, T)
    if padding_mask is not None:
        keys = rearrange(~padding_mask, 'b s -> b 1 1 s')                     # (B, 1, 1, T)
        mask = keys if mask is None else keys & mask                          # (B, 1, T, T)
        mask = mask | (idx[:, None] == idx[None, :])                          # every step sees itself
    return mask


class FrontEnd(nn.Module):
    """What every modality's front-end answers; the student (model.Data2Vec) and the teacher (teacher.Teacher) ask
    nothing else of a modality.

        forward(source, padding_mask, mask, teacher)  how the raw input becomes tokens (B, T, D) and their padding
                                                      (B, T) or None; how a mask enters (a mask embedding at masked
                                                      steps, or a mask token); with teacher=True, also what the
                                                      teacher reads (else None)
        attention(x, padding_mask, window)            the blocks' SDPA mask or bias for tokens x: padding, positions, and the
                                                      teacher's context window (±W steps; 0 = everything)
        averaged       True: the EMA teacher averages this front-end and reads the raw input through its own copy
                       (the teacher's input is then the keyword arguments of that copy's forward);
                       False: the teacher shares the student's front-end and reads the tokens it made of the
                       unmasked input. Everything else of the teacher is averaged (teacher.Teacher).
        shared         (averaged front-ends) names of submodules the teacher does not copy but shares: data2vec 2.0
                       speech's feature encoder. teacher_tokens(teacher_input) → (tokens, padding) on the teacher's copy
        prefix         tokens the front-end puts before the data (CLS), which get no target
        local, visible data2vec 2.0: local(source) → (features (B, T, D), once per sample; the teacher's input);
                       visible(features (R, T, D), mask, ids_keep) → (the student's tokens of the visible steps, prefix
                       in front (R, P + T_keep, D); their attention bias or None)
        grid           (h, w) of the patches, for data2vec 2.0's 2-D decoder; None: a 1-D sequence
        bert_decoder   data2vec 2.0: the decoder's output projection starts as init_bert_params makes it (text: fairseq
                       initialises the model so and, unlike speech's and images', never resets the text decoder)
        pre_ln, input_norm, head_layers, finetune_frozen, norm_eps, layer_bias   the released model it belongs to
                       (model.Data2Vec, finetune.py); norm_eps: its LayerNorms' ε unless cfg.layer_norm_eps sets one;
                       layer_bias: a relative position bias per block (its grid), or None
    """
    averaged, shared, prefix, grid, bert_decoder = False, (), 0, None, False
    pre_ln, input_norm, head_layers, finetune_frozen, norm_eps, layer_bias = False, True, 1, (), 1e-5, None

    def attention(self, x, padding_mask=None, window=0):
        return attention_mask(padding_mask, x.shape[1], window, x.device)

    def teacher_tokens(self, teacher_input):
        """On the teacher's copy of an averaged front-end: its input (the raw input's keywords) → (tokens, padding)."""
        x, padding, _ = self(**teacher_input)
        return x, padding


class SpeechFrontEnd(FrontEnd):
    """wav2vec 2.0's front-end, data2vec speech v1: feature encoder → mask embedding → conv positional encoder.

    data2vec 2.0 (cfg.version 2, fairseq modalities/audio.py): no mask embedding (masked frames are zeroed: fairseq
    encoder_zero_mask), the student reads the visible frames only (`visible`), and an ALiBi bias with a learned scale
    per head joins the positional conv. The teacher shares the feature encoder (fairseq make_target_model drops the
    local encoder and project_features from its copy) and averages the positional conv and the ALiBi scales: it
    reads the student's features of the unmasked input through its own positional conv (`teacher_tokens`).

    Shared with the teacher (paper: 'share the parameters of the feature encoder and the positional encoder'; fairseq
    `ema_transformer_only`, `ema_layers_only`): the teacher reads the positional encoder's output for the unmasked
    features. With cfg.ema_front_end (fairseq `ema_transformer_only: false`) the teacher averages this front-end too
    and reads the waveform through its own copy. Post-LN blocks after a LayerNorm (fairseq layer_norm_first False). Fine-tuning freezes the conv layers
    (wav2vec 2.0 feature_grad_mult 0).
    """
    finetune_frozen = ('feature_encoder.conv_layers',)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.averaged = cfg.ema_front_end or cfg.version == 2                  # fairseq ema_transformer_only False
        self.shared = ('feature_encoder',) if cfg.version == 2 else ()
        self.feature_encoder = SpeechFeatureEncoder(cfg.conv_dim, cfg.dim, cfg.feature_grad_mult, cfg.layer_norm_eps or self.norm_eps)
        if cfg.version == 1:
            self.mask_emb = nn.Parameter(torch.empty(cfg.dim).uniform_())      # fairseq: uniform_() in [0, 1)
        self.pos_encoder = ConvPositionalEncoder(cfg.dim, cfg.pos_conv_depth, cfg.pos_conv_kernel, cfg.pos_conv_groups,
                                                 cfg.pos_conv_zero)
        self.alibi = ALiBi(cfg.heads) if cfg.version == 2 else None

    def forward(self, source, padding_mask=None, mask=None, teacher=False, channel_mask=None):
        """source (B, S), padding_mask (B, S), mask (B, T) → tokens (B, T, D), frame padding (B, T) or None, and the
        teacher's input: the unmasked tokens (B, T, D), or (averaged) the waveform for its own copy of this front-end.
        channel_mask (B, D): fine-tuning's zeroed feature channels (wav2vec 2.0 mask_channel)."""
        x, padding = self.feature_encoder(source, padding_mask)               # (B, T, D)
        with torch.no_grad():                                                 # the teacher's view: unmasked, no gradient
            teacher_input = None if not teacher else dict(source=source, padding_mask=padding_mask) if self.averaged else \
                self.pos_encoder(x, padding)
        if channel_mask is not None:
            x = x.masked_fill(channel_mask[:, None, :], 0.0)
        if mask is not None:                                                  # masked frames → the mask embedding (v2: 0)
            x = torch.where(mask[..., None], self.mask_emb.to(x.dtype) if self.alibi is None else 0.0, x)
        return self.pos_encoder(x, padding), padding, teacher_input

    def attention(self, x, padding_mask=None, window=0):
        """v1: the boolean mask of padding and window. v2: the ALiBi bias (H, T, T), −∞ where that mask hides a key."""
        allowed = attention_mask(padding_mask, x.shape[1], window, x.device)  # (B, 1, T, T), (T, T) or None
        if self.alibi is None:
            return allowed
        bias = self.alibi(torch.arange(x.shape[1], device=x.device))         # (H, T, T)
        return bias if allowed is None else bias.masked_fill(~allowed, float('-inf'))

    def local(self, source):
        """data2vec 2.0: the features (B, T, D), once for all M copies, and the teacher's input: the same features, which
        it reads through its own positional conv (the feature encoder is shared)."""
        features, _ = self.feature_encoder(source)
        return features, features.detach()

    def visible(self, features, mask, ids_keep):
        """data2vec 2.0's student input (fairseq encoder_zero_mask): masked frames zeroed, the positional conv over the
        whole length, then the visible frames only, with the ALiBi bias between them.
        features (R, T, D), mask (R, T), ids_keep (R, T_keep) → tokens (R, T_keep, D), bias (R, H, T_keep, T_keep)."""
        x = self.pos_encoder(features.masked_fill(mask[..., None], 0.0))      # (R, T, D): x + g(x), g sees no masked frame
        x = x.gather(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))      # (R, T_keep, D)
        bias = self.alibi(ids_keep)                                           # (R, H, T_keep, T_keep): true distances
        if torch.is_autocast_enabled(x.device.type):                          # cast once here, not in every block
            bias = bias.to(torch.get_autocast_dtype(x.device.type))           # (fairseq adds it in fp32: DEVIATIONS.md 44)
        return x, bias

    def teacher_tokens(self, teacher_input):
        """v2, on the teacher's copy: the student's features of the unmasked input (B, T, D) → its own positional conv."""
        if self.alibi is None:
            return super().teacher_tokens(teacher_input)
        return self.pos_encoder(teacher_input), None


class ImageFrontEnd(FrontEnd):
    """BEiT's front-end, data2vec vision v1: patch embedding → mask token → [CLS; patches]; relative position bias.

    Averaged by the teacher (BEiT's ModelEmaV2 copies the whole model), which reads the same augmented image, unmasked.
    Pre-LN blocks with LayerScale and a LayerNorm after the last (BEiT); BEiT initialises the patch embedding, the
    blocks and the tokens together (model.init_beit_).

    data2vec 2.0 (cfg.version 2, fairseq modalities/images.py): patch embedding + fixed sine-cosine positions
    (sincos_positions_2d), the visible patches only (`visible`), a CLS token in front with no position; no mask token,
    no relative position bias. Post-LN blocks after a LayerNorm, ε 1e-6, initialised as fairseq does (init_bert_params;
    the patch embedding xavier_uniform, the CLS token N(0, 1)). The teacher averages all of it, the patch embedding
    included (fairseq ema_local_encoder), and reads the raw image. fairseq's prenet_depth blocks (base: 2, then 10
    shared) are here the first of cfg.layers: the teacher averages both kinds and the targets are the top K ≤ 10, so
    one stack of 12 is the same model.
    """
    averaged, prefix, pre_ln, input_norm, norm_eps = True, 1, True, False, 1e-6

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.grid = (cfg.image_size // cfg.patch_size,) * 2
        self.patch_embed = PatchEmbed(cfg.dim, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.register_buffer('positions', sincos_positions_2d(cfg.dim, self.grid[0]) if cfg.version == 2 else None,
                             persistent=False)                                # v2's fixed positions (N, D): not saved
        if cfg.version == 2:
            self.pre_ln, self.input_norm = False, True
            w = self.patch_embed.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))                  # fairseq: as a Linear (D, 3·P²)
            nn.init.normal_(self.cls_token)                                  # init_extra_token_zero false: N(0, 1)
            return
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        if cfg.rel_pos_bias == 'layer':                                       # BEiT fine-tuning: a table in every block
            self.layer_bias = self.grid
        else:
            self.rel_pos_bias = RelativePositionBias(self.grid, cfg.heads)

    def forward(self, source, padding_mask=None, mask=None, teacher=False):
        """source (B, 3, H, W), mask (B, N) → tokens (B, 1 + N, D), None (images are never padded), and the teacher's
        input: the image itself, for its own copy of this front-end. v2: masked patches are zeros (fairseq
        encoder_zero_mask; the student proper reads the visible ones only)."""
        x = self.patch_embed(source)                                          # (B, N, D)
        if self.positions is not None:
            x = x + self.positions                                            # v2: fixed positions, before masking
        if mask is not None:                                                  # BEiT: x·(1 − w) + mask_token·w
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype) if self.positions is None else 0.0, x)
        return self.with_cls(x), None, dict(source=source) if teacher else None

    def with_cls(self, x):
        """(B, T, D) → (B, 1 + T, D): the CLS token in front."""
        return torch.cat([self.cls_token.expand(len(x), -1, -1).to(x.dtype), x], dim=1)

    def local(self, source):
        """data2vec 2.0: the patch embeddings with their positions (B, N, D), once for all M copies; the teacher's input."""
        return self.patch_embed(source) + self.positions, dict(source=source)

    def visible(self, x, mask, ids_keep):
        """data2vec 2.0's student input: x (R, N, D) → the visible patches (R, 1 + N_keep, D) behind the CLS token, and
        no attention bias (the positions are in the tokens)."""
        return self.with_cls(x.gather(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))), None

    def attention(self, x, padding_mask=None, window=0):
        """The shared relative position bias (H, 1 + N, 1 + N), added to the logits of every block (with a bias per
        block, or v2: nothing, or the window's −∞ (1 + N, 1 + N)). With a teacher
        context W > 0 (Figure 3), patch i sees only the patches j within a (2W + 1) × (2W + 1) square around it,
        max(|y_i − y_j|, |x_i − x_j|) ≤ W on the grid, and not the CLS token; the CLS token sees everything. So a
        patch's output after L blocks depends on the patches within L·W of it only (DEVIATIONS.md 36)."""
        h, w = self.grid
        bias = self.rel_pos_bias() if hasattr(self, 'rel_pos_bias') else None
        if window == 0:
            return bias
        yx = torch.stack(torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device),
                                        indexing='ij')).flatten(1)           # (2, N): row, column of each patch
        near = (yx[:, :, None] - yx[:, None, :]).abs().amax(0) <= window      # (N, N)
        sees = torch.ones(1 + h * w, 1 + h * w, dtype=torch.bool, device=x.device)
        sees[1:, 1:], sees[1:, 0] = near, False                               # patches: their square, no CLS
        bias = x.new_zeros(1 + h * w, 1 + h * w, dtype=torch.float) if bias is None else bias
        return bias.masked_fill(~sees, float('-inf'))


class TextFrontEnd(FrontEnd):
    """RoBERTa's embeddings, data2vec text v1. The mask is in the ids already (masking.token_mask puts <mask> there).

    Shared with the teacher (fairseq `ema_transformer_layers_only`): the teacher reads the embedding of the ORIGINAL
    ids through the student's embedding (the paper; fairseq feeds it the masked ids only, issue #4881). Post-LN
    blocks, no LayerNorm before them (the embedding ends in one); head_layers 2 (fairseq data2vec_text).

    data2vec 2.0 (cfg.version 2, fairseq modalities/text.py): the same embedding, once per block (`local`); the
    student reads the visible tokens' embeddings only (`visible`), no <mask> id. The teacher still averages the blocks
    only (ema_encoder_only) and reads the student's embedding of the unmasked ids, without its dropout (fairseq
    reads the dropped-out local features: DEVIATIONS.md 50).
    """
    input_norm, head_layers, bert_decoder = False, 2, True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = TextEmbedding(cfg.vocab_size, cfg.dim, cfg.max_tokens, cfg.pad_id, cfg.layer_norm_eps or self.norm_eps)
        self.embed.apply(init_bert_params)

    def forward(self, source, padding_mask=None, mask=None, teacher=False, original=None):
        """source: masked ids (B, T), original: the uncorrupted ids (B, T) → tokens (B, T, D), padding, teacher's input."""
        with torch.no_grad():
            teacher_input = self.embed(original) if teacher else None        # (B, T, D)
        return self.embed(source), padding_mask, teacher_input

    def local(self, source):
        """data2vec 2.0: the embeddings of the (unmasked) ids (B, T, D), once for all M copies; the teacher reads them."""
        x = self.embed(source)                                                # (B, T, D)
        return x, x.detach()

    def visible(self, x, mask, ids_keep):
        """data2vec 2.0's student input: x (R, T, D) → the visible tokens (R, T_keep, D); no bias (positions are in the
        embeddings, and pretraining blocks have no padding)."""
        return x.gather(1, ids_keep[..., None].expand(-1, -1, x.shape[-1])), None


FRONT_ENDS = dict(speech=SpeechFrontEnd, vision=ImageFrontEnd, text=TextFrontEnd)


def init_bert_params(module):
    """fairseq init_bert_params: Linear and Embedding weights ~ N(0, 0.02), biases and the padding row 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear):
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        nn.init.zeros_(module.weight[module.padding_idx])

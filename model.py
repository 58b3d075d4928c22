"""The data2vec student: front-end → Transformer → regression head; and the loss.

Paper: Baevski et al., "data2vec: A General Framework for Self-supervised Learning in Speech,
Vision and Language" (2022). A student encodes a masked input and, at the masked time steps,
regresses targets built by an EMA teacher from the unmasked input (teacher.py).

The modality lives in the front-end (encoders.py); this file has no modality branch. What the student sees:

    speech  a waveform → 20 ms frames, the masked ones replaced by a learned mask embedding (spans of 10 frames)
    vision  an image → 16 × 16 patches, the masked ones replaced by a learned mask token, a CLS token in front
    text    token ids in which the masked ones already are <mask> (BERT's 80/10/10), → token embeddings

The blocks are the released models': post-LN for speech and text (wav2vec 2.0 / fairseq, RoBERTa), BEiT's
pre-LN blocks with LayerScale for vision (data2vec vision v1). All expose the same block taps.

data2vec 2.0 (Baevski et al., 2023; --version 2) is Data2Vec2: the same front-ends and blocks, but the blocks see the
visible steps only, of M masked copies of each sample, and a ConvDecoder replaces the regression head; images add a
CLS loss (cls_loss).

Legend:  B batch · S waveform samples · T time steps (frames, tokens, or image patches N) · D model width
         H heads · L blocks · K top-K target blocks · M masked steps.
Mask convention (masking.py): mask is bool (B, T), True = masked.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from config import TAPS, ModelConfig  # noqa: F401  (TAPS, ModelConfig: re-exported for readers of this file)
from encoders import FRONT_ENDS, RelativePositionBias, attention_mask, conv_ln_gelu, init_bert_params  # noqa: F401


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (fairseq/HF layout), via SDPA.

    attn_mask: bool (True = may attend) or a float bias added to the logits (vision), broadcast to (B, H, T, T).
    BEiT's key projection has no bias (k_bias=False): a key bias adds the same logit to every key of a query.
    """

    def __init__(self, dim, heads, dropout=0.0, k_bias=True):
        super().__init__()
        assert dim % heads == 0, f'dim {dim} is not divisible by heads {heads}'
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=k_bias)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):                                     # (B, T, D)
        q, k, v = (rearrange(p(x), 'b t (h d) -> b h t d', h=self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        if attn_mask is not None and attn_mask.is_floating_point():
            # an fp32 bias under bf16 autocast; and contiguous: a permuted bias (RelativePositionBias) sends SDPA to its
            # math kernel, 31% of a vision base step on an H200 (PERF.md 2026-11-30)
            attn_mask = attn_mask.to(q.dtype).contiguous()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, D/H)
        return self.out_proj(rearrange(o, 'b h t d -> b t (h d)'))            # (B, T, D)


class Block(nn.Module):
    """Post-LN Transformer block (fairseq TransformerSentenceEncoderLayer, HF Data2VecAudioEncoderLayer).

        a  = SelfAttention(x)                      tap 'attention'
        r  = LN₁(x + DropPath(Dropout(a)))
        f  = fc₂(GELU(fc₁(r)))                     tap 'ffn'           ← the paper's target: FFN output before the last residual
        s  = r + DropPath(Dropout(f))              tap 'ffn_residual'
        x' = LN₂(s)                                tap 'block'         (end of block)

    DropPath (stochastic depth, drop_path): 0 in pretraining; data2vec 2.0 vision fine-tuning (fairseq AltBlock).
    """

    def __init__(self, dim, heads, ffn_dim, dropout=0.1, attn_dropout=0.1, eps=1e-5, drop_path=0.0):
        super().__init__()
        self.self_attn = SelfAttention(dim, heads, attn_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.fc1, self.fc2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout, self.drop_path = nn.Dropout(dropout), drop_path

    def forward(self, x, attn_mask=None, tap=None):
        """x: (B, T, D) → (x', the chosen tap (B, T, D) or None)."""
        a = self.self_attn(x, attn_mask)
        r = self.self_attn_layer_norm(x + drop_path(self.dropout(a), self.drop_path, self.training))
        f = self.fc2(F.gelu(self.fc1(r)))                                     # (B, T, ffn_dim) → (B, T, D)
        s = r + drop_path(self.dropout(f), self.drop_path, self.training)
        out = self.final_layer_norm(s)
        return out, dict(attention=a, ffn=f, ffn_residual=s, block=out).get(tap)


def drop_path(x, p, training):
    """Stochastic depth (Huang et al. 2016; timm DropPath): drop a whole residual branch per sample, x: (B, T, D)."""
    if p == 0 or not training:
        return x
    keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= p                 # (B, 1, 1)
    return x * keep / (1 - p)


class PreLNBlock(nn.Module):
    """Pre-LN block with LayerScale and stochastic depth (BEiT, data2vec vision v1; HF Data2VecVisionLayer).

        a  = γ₁ ⊙ SelfAttention(LN₁(x), bias)      tap 'attention'
        h  = x + DropPath(a)
        f  = γ₂ ⊙ fc₂(GELU(fc₁(LN₂(h))))           tap 'ffn'           (FFN output before the last residual)
        x' = h + DropPath(f)                       taps 'ffn_residual' = 'block' (end of block: data2vec vision's target)

    γ₁, γ₂ ∈ R^D start at `layer_scale` (1e-4), so every block starts close to the identity. With `grid`, the block has
    its own relative position bias (BEiT fine-tuning), added to attn_bias (which then holds only a context window).
    """

    def __init__(self, dim, heads, ffn_dim, attn_dropout=0.0, drop_path=0.0, layer_scale=1e-4, dropout=0.0, eps=1e-6,
                 grid=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = SelfAttention(dim, heads, attn_dropout, k_bias=False)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1, self.fc2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.gamma_1 = nn.Parameter(torch.full((dim,), layer_scale))
        self.gamma_2 = nn.Parameter(torch.full((dim,), layer_scale))
        self.dropout, self.drop_path = nn.Dropout(dropout), drop_path
        if grid is not None:
            self.rel_pos_bias = RelativePositionBias(grid, heads)

    def forward(self, x, attn_bias=None, tap=None):
        """x: (B, T, D), attn_bias: (H, T, T) → (x', the chosen tap (B, T, D) or None)."""
        if hasattr(self, 'rel_pos_bias'):
            attn_bias = self.rel_pos_bias() if attn_bias is None else self.rel_pos_bias() + attn_bias   # (H, T, T)
        a = self.gamma_1 * self.dropout(self.self_attn(self.norm1(x), attn_bias))
        h = x + drop_path(a, self.drop_path, self.training)
        f = self.gamma_2 * self.dropout(self.fc2(F.gelu(self.fc1(self.norm2(h)))))  # (B, T, ffn_dim) → (B, T, D)
        out = h + drop_path(f, self.drop_path, self.training)
        return out, dict(attention=a, ffn=f, ffn_residual=out, block=out).get(tap)


def trunc_normal_(t, std=0.02):
    """BEiT's trunc_normal_: N(0, std²) cut at ±std (timm's with a = −std, b = std), so the actual std is ≈ 0.54·std."""
    return nn.init.trunc_normal_(t, std=std, a=-std, b=std)


def init_vit_params(module):
    """BEiT _init_weights: Linear and Conv2d weights ~ trunc_normal_(0.02), biases 0; LayerNorm keeps PyTorch's (1, 0)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Transformer(nn.Module):
    """L blocks, the part of the student that every modality shares (the teacher's EMA always covers it).

        post-LN (pre_ln False: fairseq wav2vec 2.0, RoBERTa):  [LayerNorm] → Dropout → L × Block, LayerDrop while training
        pre-LN (pre_ln True: BEiT):                             L × PreLNBlock (stochastic depth 0 → drop_path) → LayerNorm

    forward(x, attn_mask, tap, final_norm) → (output (B, T, D), [tap of every block (B, T, D)]).
    attn_mask: the front-end's (encoders.FrontEnd.attention): bool (True = may attend) or a float bias on the logits.
    """

    def __init__(self, cfg: ModelConfig, pre_ln=False, input_norm=True, eps=1e-5, layer_bias=None):
        super().__init__()
        self.pre_ln = pre_ln
        rates = [cfg.drop_path * i / max(cfg.layers - 1, 1) for i in range(cfg.layers)]      # linear 0 → drop_path
        if pre_ln:
            self.layers = nn.ModuleList(PreLNBlock(cfg.dim, cfg.heads, cfg.ffn_dim, cfg.attn_dropout, rate, cfg.layer_scale,
                                                   cfg.dropout, eps, layer_bias) for rate in rates)
            self.norm = nn.LayerNorm(cfg.dim, eps=eps)                       # BEiT's final norm
            self.layerdrop = 0.0                                               # BEiT drops paths inside the blocks instead
        else:
            self.layer_norm = nn.LayerNorm(cfg.dim, eps=eps) if input_norm else nn.Identity()   # text: the embedding's LN
            self.dropout = nn.Dropout(cfg.dropout)
            self.layers = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.ffn_dim, cfg.dropout, cfg.attn_dropout, eps, rate)
                                        for rate in rates)
            self.norm = nn.Identity()
            self.layerdrop = cfg.layerdrop
            self.apply(init_bert_params)                                       # BEiT's init is init_beit_, with the front-end

    def forward(self, x, attn_mask=None, tap=None, final_norm=True):
        if not self.pre_ln:
            x = self.dropout(self.layer_norm(x))                               # (B, T, D)
        taps = []
        for block in self.layers:
            y, t = block(x, attn_mask, tap)
            if self.training and self.layerdrop > 0:
                # LayerDrop (fairseq encoder_layerdrop) as a select on a random scalar rather than a Python `if`:
                # same output and gradients as skipping the block, but one static graph for torch.compile and DDP.
                y = torch.where(torch.rand((), device=x.device) < self.layerdrop, x, y)
            x = y
            if tap is not None:
                taps.append(y if tap == 'block' else t)                        # 'block' is the output: a dropped block's is x
        return self.norm(x) if final_norm else x, taps


def init_beit_(front_end, encoder):
    """BEiT's initialisation, in its order: trunc_normal_(0.02) for every Linear and Conv2d of the front-end and the
    blocks (one pass), then the front-end's own parameters (CLS and mask tokens), then fix_init_weight: block l's
    output projections divided by √(2l), so that deeper blocks add less."""
    for module in (front_end, encoder):
        module.apply(init_vit_params)
    for token in front_end.parameters(recurse=False):
        trunc_normal_(token)
    for depth, block in enumerate(encoder.layers, start=1):
        block.self_attn.out_proj.weight.data.div_(math.sqrt(2 * depth))
        block.fc2.weight.data.div_(math.sqrt(2 * depth))


class Data2Vec(nn.Module):
    """The student: front-end → Transformer → regression head.

        source ─ front_end: tokens, masked steps replaced ─ encoder: L blocks ─ drop the prefix (CLS) ─ regression_head

    The front-end (encoders.FRONT_ENDS[modality]) also makes what the teacher reads and states what the teacher's EMA
    covers (teacher.Teacher). Heads: one Linear (fairseq final_proj, BEiT lm_head, #4199), or D → 2D → GELU → D
    (fairseq data2vec_text head_layers 2). Initialisation is the released code's: fairseq's per module (speech: PyTorch's
    defaults for the convolutions and the head; text: init_bert_params everywhere), BEiT's in one pass (init_beit_).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.modality not in FRONT_ENDS:
            raise ValueError(f"unknown modality {cfg.modality!r} ({', '.join(FRONT_ENDS)})")
        self.cfg = cfg
        self.front_end = FRONT_ENDS[cfg.modality](cfg)
        self.encoder = Transformer(cfg, self.front_end.pre_ln, self.front_end.input_norm,
                                   cfg.layer_norm_eps or self.front_end.norm_eps, self.front_end.layer_bias)
        if self.front_end.pre_ln:
            init_beit_(self.front_end, self.encoder)
        self.make_head(cfg)

    head = 'regression_head'                                                     # pretraining only (finetune.py drops it)

    def make_head(self, cfg):
        if self.front_end.head_layers == 2:
            self.regression_head = nn.Sequential(nn.Linear(cfg.dim, 2 * cfg.dim), nn.GELU(), nn.Linear(2 * cfg.dim, cfg.dim))
            self.regression_head.apply(init_bert_params)
        else:
            self.regression_head = nn.Linear(cfg.dim, cfg.dim)
            if self.front_end.pre_ln:
                init_vit_params(self.regression_head)

    def encode(self, source, padding_mask=None, mask=None, final_norm=True, blocks=False, **extra):
        """The student's output (B, T, D) without the prefix, and the padding (B, T) or None; no teacher input.
        final_norm=False: the last block's output before BEiT's final LayerNorm (fine-tuning pools it).
        blocks=True: every block's output instead, (L, B, T, D) (the 'block' tap: a probe mixes them)."""
        x, padding, _ = self.front_end(source, padding_mask, mask, **extra)
        x, taps = self.encoder(x, self.front_end.attention(x, padding), tap='block' if blocks else None, final_norm=final_norm)
        x = torch.stack(taps) if blocks else x                                   # (L, B, T', D) or (B, T', D)
        return x[..., self.front_end.prefix:, :], padding

    def forward(self, source, padding_mask=None, mask=None, **extra):
        """source (B, S | 3, H, W | T), padding_mask, mask (B, T) → pred (B, T, D), teacher_input, padding (B, T) or None,
        and None (data2vec 2.0 returns its CLS output there).
        extra: what one front-end also reads (text: original, the uncorrupted ids for the teacher).

        The head runs on every step (cheap, and shapes stay static); the loss keeps the masked ones.
        """
        x, padding, teacher_input = self.front_end(source, padding_mask, mask, teacher=True, **extra)   # (B, T', D)
        x, _ = self.encoder(x, self.front_end.attention(x, padding))
        return self.regression_head(x[:, self.front_end.prefix:]), teacher_input, padding, None

    def num_params(self, head=False):
        return sum(p.numel() for n, p in self.named_parameters() if head or not n.startswith(self.head + '.'))


class ConvDecoder(nn.Module):
    """data2vec 2.0's decoder (fairseq Decoder1d, Decoder2d): from the student's output at the visible steps, a
    prediction at every step.

        x₀ = restore([Dropout(student output at the visible steps), ε at the masked steps]),  ε ~ N(0, σ²), σ = 0.01
        xₗ = conv_ln_gelu(convₗ, xₗ₋₁) + xₗ₋₁     (the residual when the shapes match: not after a first layer D → C)
        ŷ  = proj(x_L)                            (one Linear C → D, or C → 2C → GELU → D with projection_layers 2)

    The convolutions run along time (Conv1d), or with `grid` (h, w) on the patch grid (Conv2d, images).
    speech base: 4 layers, C = 384, kernel 7, 16 groups, input dropout 0.1. images base: 6 layers, C = 768, kernel 3,
    16 groups, no input dropout. Both residual. text base: 5 layers, C = 768, kernel 9, 1 group, input dropout 0.1, no
    residual (xₗ = conv_ln_gelu(convₗ, xₗ₋₁)), projection_layers 2. The loss keeps the masked steps.
    forward(x (R, T_keep, D), ids_restore (R, T)) → (R, T, D).
    """

    def __init__(self, dim, decoder_dim=384, layers=4, kernel=7, groups=16, residual=True, projection_layers=1,
                 input_dropout=0.1, noise_std=0.01, grid=None):
        super().__init__()
        conv = nn.Conv1d if grid is None else nn.Conv2d
        self.convs = nn.ModuleList(conv(dim if i == 0 else decoder_dim, decoder_dim, kernel, padding=kernel // 2,
                                        groups=groups) for i in range(layers))
        self.residual, self.input_dropout, self.noise_std, self.grid = residual, input_dropout, noise_std, grid
        self.proj = (nn.Linear(decoder_dim, dim) if projection_layers == 1 else
                     nn.Sequential(nn.Linear(decoder_dim, 2 * decoder_dim), nn.GELU(), nn.Linear(2 * decoder_dim, dim)))

    def forward(self, x, ids_restore):
        x = F.dropout(x, self.input_dropout, self.training)                     # (R, T_keep, D)
        R, T, D = ids_restore.shape + x.shape[-1:]
        noise = torch.randn(R, T - x.shape[1], D, device=x.device, dtype=x.dtype) * self.noise_std
        x = torch.cat([x, noise], 1).gather(1, ids_restore[..., None].expand(R, T, D))   # (R, T, D), in time order
        h = rearrange(x, 'r t d -> r d t') if self.grid is None else rearrange(x, 'r (h w) d -> r d h w', h=self.grid[0])
        for conv in self.convs:
            y = conv_ln_gelu(conv, h)                                            # (R, C, T) or (R, C, h, w)
            h = y + h if self.residual and y.shape == h.shape else y
        return self.proj(rearrange(h, 'r c ... -> r (...) c'))                # (R, T, D)


class Data2Vec2(Data2Vec):
    """data2vec 2.0's student (Baevski et al., 2023; fairseq data2vec2.py): M masked copies of each sample, the blocks
    on the visible steps only, a conv decoder in place of the regression head.

        source ─ front_end.local: features (B, T, D), once per sample ─ × M (R = B·M rows)
               ─ front_end.visible: masked steps dropped, [CLS] in front ─ encoder: L blocks on P + T_keep steps
               ─ decoder: the visible outputs, noise at the masked steps → a prediction at every step (R, T, D)

        speech  local = the feature encoder; visible = zeroed masked frames → positional conv → the kept frames, ALiBi
        images  local = patch embedding + fixed positions; visible = the kept patches behind a CLS token
        text    local = token + position embeddings → LayerNorm; visible = the kept tokens

    The teacher reads the unmasked input once per sample (train.forward_loss repeats its targets M times): the
    student's features (speech, text) or the image (images). encode() is Data2Vec's: the whole input, for fine-tuning.
    """
    head = 'decoder'

    def make_head(self, cfg):
        self.decoder = ConvDecoder(cfg.dim, cfg.decoder_dim, cfg.decoder_layers, cfg.decoder_kernel, cfg.decoder_groups,
                                   cfg.decoder_residual, cfg.decoder_projection_layers, cfg.decoder_dropout,
                                   cfg.mask_noise_std, self.front_end.grid)
        if self.front_end.bert_decoder:                                          # text: N(0, 0.02²) weights, zero biases
            self.decoder.proj.apply(init_bert_params)

    def forward(self, source, mask, ids_keep, ids_restore, padding_mask=None):
        """source (B, S | 3, H, W | T), mask (R, T) bool with rows b·M … b·M + M − 1 for sample b, ids_keep (R, T_keep),
        ids_restore (R, T) (masking.visible_order) → pred (R, T, D), the teacher's input, padding None, and the final
        output at the prefix (R, D) (images: the CLS token's, for the CLS loss) or None."""
        features, teacher_input = self.front_end.local(source)                 # (B, T, D): one pass for all M copies
        x = features.repeat_interleave(mask.shape[0] // features.shape[0], 0)   # (R, T, D)
        x, bias = self.front_end.visible(x, mask, ids_keep)                      # (R, P + T_keep, D), bias or None
        x, _ = self.encoder(x, bias)                                             # (R, P + T_keep, D)
        P = self.front_end.prefix
        return self.decoder(x[:, P:], ids_restore), teacher_input, None, x[:, 0] if P else None   # (R, T, D), (R, D)


def build_student(cfg: ModelConfig):
    """The student of cfg.version: Data2Vec (1) or Data2Vec2 (2)."""
    return (Data2Vec2 if cfg.version == 2 else Data2Vec)(cfg)


def regression_loss(pred, target, mask, beta=0.0, scale=None):
    """data2vec objective (paper, 'Objective'), averaged over the M masked steps:

        L = (1/M) Σ_{t masked} scale · Σ_d ℓ_β(f_t(x)_d − y_t,d)
        ℓ_β(e) = e²                      if β = 0  (fairseq loss_beta 0: 'a simple L2 loss')
               = ½e²/β  if |e| ≤ β, else |e| − ½β   (Smooth L1)
        scale  = 1/√D by default (fairseq loss_scale null); the paper's vision/text runs use 1/D and 1.

    pred, target: (B, T, D); mask: (B, T) bool, True = masked. Computed in fp32.
    """
    assert mask.dtype == torch.bool and mask.shape == pred.shape[:2], f'mask must be bool (B, T), got {mask.dtype} {tuple(mask.shape)}'
    pred, target = pred.float(), target.float()
    if beta == 0:
        per_elem = (pred - target).square()
    else:
        per_elem = F.smooth_l1_loss(pred, target, reduction='none', beta=beta)
    scale = 1 / math.sqrt(pred.shape[-1]) if scale is None else scale
    per_step = per_elem.sum(-1) * scale                                      # (B, T)
    return (per_step * mask).sum() / mask.sum()


def cls_loss(cls, target, weight, rows, beta=0.0, scale=None):
    """data2vec 2.0 images (fairseq cls_loss): the student's final CLS output regresses the mean over patches of its
    sample's targets, one term per row (copy):

        L_cls = weight · rows · (1/R) Σ_r ℓ(cls_r, ȳ_r),   ȳ_r = (1/T) Σ_t y_r,t

    ℓ is regression_loss's per-step term. fairseq adds weight · n_masked · Σ_r ℓ to the summed regression loss and
    divides everything by n_masked, per GPU: the CLS term is weight · Σ_r ℓ over one GPU's R rows (base: 16 images × M
    16 = 256). Here `rows` (--cls-rows) is that R, so the result is the same at any --micro-batch-size.
    cls (R, D), target (R, D).
    """
    every = torch.ones(cls.shape[0], 1, dtype=torch.bool, device=cls.device)          # (R, 1): each row one "step"
    return weight * rows * regression_loss(cls[:, None], target[:, None], every, beta, scale)   # the mean over rows × rows

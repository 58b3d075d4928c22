"""The data2vec student: Transformer encoder, mask embedding, regression head and loss.

Paper: Baevski et al., "data2vec: A General Framework for Self-supervised Learning in Speech,
Vision and Language" (2022). A student encodes a masked input and, at the masked time steps,
regresses targets built by an EMA teacher from the unmasked input (teacher.py).

Speech uses post-LN blocks (wav2vec 2.0 / fairseq); vision uses BEiT's pre-LN blocks with LayerScale
and a shared relative position bias (data2vec vision v1). Both expose the same block taps.

Legend:  B batch · S waveform samples · T time steps (frames, or image patches N) · D model width
         H heads · L blocks · K top-K target blocks · M masked steps.
Mask convention (masking.py): mask is bool (B, T), True = masked.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from encoders import ConvPositionalEncoder, PatchEmbed, RelativePositionBias, SpeechFeatureEncoder, TextEmbedding

TAPS = ('attention', 'ffn', 'ffn_residual', 'block')  # which tensor of a block the teacher's targets use


@dataclass
class ModelConfig:
    """Architecture. Defaults are data2vec Base for speech (fairseq base_librispeech.yaml); train.PRESETS has vision's."""
    modality: str = field(default='speech', metadata=dict(help='speech | vision | text'))
    dim: int = 768               # D
    layers: int = 12             # L
    heads: int = 12
    ffn_dim: int = 3072
    dropout: float = 0.1
    attn_dropout: float = 0.1
    layerdrop: float = 0.05      # probability of skipping a whole block while training the student
    conv_dim: int = 512          # channels of the 7 conv layers of the speech feature encoder
    pos_conv_depth: int = 5
    pos_conv_kernel: int = 19    # fairseq: conv_pos 95 // depth 5
    pos_conv_groups: int = 16
    image_size: int = 224        # vision: square input images, H = W
    patch_size: int = 16         # vision: P; N = (image_size / P)² patches
    layer_scale: float = 1e-4    # vision: LayerScale γ init (BEiT layer_scale_init_value)
    drop_path: float = 0.0       # vision: stochastic depth of the last block, rising linearly from 0 (paper: 0.2)
    vocab_size: int = 50_000     # text: BPE vocabulary (set from the tokenizer)
    max_tokens: int = 512        # text: rows of the learned position table, minus RoBERTa's offset of 2
    pad_id: int = 1              # text: the tokenizer's <pad> (set from the tokenizer)


def attention_mask(padding_mask, T, window=0, device=None):
    """Boolean SDPA mask (True = may attend), or None when every step sees every step.

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
            attn_mask = attn_mask.to(q.dtype)                                 # an fp32 bias under bf16 autocast
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, D/H)
        return self.out_proj(rearrange(o, 'b h t d -> b t (h d)'))            # (B, T, D)


class Block(nn.Module):
    """Post-LN Transformer block (fairseq TransformerSentenceEncoderLayer, HF Data2VecAudioEncoderLayer).

        a  = SelfAttention(x)                      tap 'attention'
        r  = LN₁(x + Dropout(a))
        f  = fc₂(GELU(fc₁(r)))                     tap 'ffn'           ← the paper's target: FFN output before the last residual
        s  = r + Dropout(f)                        tap 'ffn_residual'
        x' = LN₂(s)                                tap 'block'         (end of block)
    """

    def __init__(self, dim, heads, ffn_dim, dropout=0.1, attn_dropout=0.1):
        super().__init__()
        self.self_attn = SelfAttention(dim, heads, attn_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, attn_mask=None, tap=None):
        """x: (B, T, D) → (x', the chosen tap (B, T, D) or None)."""
        a = self.self_attn(x, attn_mask)
        r = self.self_attn_layer_norm(x + self.dropout(a))
        f = self.fc2(F.gelu(self.fc1(r)))                                     # (B, T, ffn_dim) → (B, T, D)
        s = r + self.dropout(f)
        out = self.final_layer_norm(s)
        return out, dict(attention=a, ffn=f, ffn_residual=s, block=out).get(tap)


class Transformer(nn.Module):
    """Post-LN encoder: LayerNorm → Dropout → L blocks, with LayerDrop while training.

    forward(x, padding_mask, tap, window) → (output (B, T, D), [tap of every block]).
    """

    def __init__(self, cfg: ModelConfig, input_norm=True):
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.dim) if input_norm else nn.Identity()   # text: the embedding's LN instead
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.ffn_dim, cfg.dropout, cfg.attn_dropout)
                                    for _ in range(cfg.layers))
        self.layerdrop = cfg.layerdrop
        self.apply(init_bert_params)

    def forward(self, x, padding_mask=None, tap=None, window=0):
        x = self.dropout(self.layer_norm(x))                                  # (B, T, D)
        attn_mask = attention_mask(padding_mask, x.shape[1], window, x.device)
        taps = []
        for block in self.layers:
            y, t = block(x, attn_mask, tap)
            if self.training and self.layerdrop > 0:
                # LayerDrop (fairseq encoder_layerdrop) as a select on a random scalar rather than a Python `if`:
                # same output and gradients as skipping the block, but one static graph for torch.compile and DDP.
                y = torch.where(torch.rand((), device=x.device) < self.layerdrop, x, y)
            x = y
            if tap is not None:
                taps.append(t)
        return x, taps


def init_bert_params(module):
    """fairseq init_bert_params: Linear and Embedding weights ~ N(0, 0.02), biases and the padding row 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear):
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        nn.init.zeros_(module.weight[module.padding_idx])


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

    γ₁, γ₂ ∈ R^D start at `layer_scale` (1e-4), so every block starts close to the identity.
    """

    def __init__(self, dim, heads, ffn_dim, attn_dropout=0.0, drop_path=0.0, layer_scale=1e-4, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn = SelfAttention(dim, heads, attn_dropout, k_bias=False)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.gamma_1 = nn.Parameter(torch.full((dim,), layer_scale))
        self.gamma_2 = nn.Parameter(torch.full((dim,), layer_scale))
        self.dropout, self.drop_path = nn.Dropout(dropout), drop_path

    def forward(self, x, attn_bias=None, tap=None):
        """x: (B, T, D), attn_bias: (H, T, T) → (x', the chosen tap (B, T, D) or None)."""
        a = self.gamma_1 * self.dropout(self.self_attn(self.norm1(x), attn_bias))
        h = x + drop_path(a, self.drop_path, self.training)
        f = self.gamma_2 * self.dropout(self.fc2(F.gelu(self.fc1(self.norm2(h)))))  # (B, T, ffn_dim) → (B, T, D)
        out = h + drop_path(f, self.drop_path, self.training)
        return out, dict(attention=a, ffn=f, ffn_residual=out, block=out).get(tap)


class VisionTransformer(nn.Module):
    """BEiT's ViT as data2vec vision v1 trains it; the teacher is an EMA copy of all of it.

        image ─ PatchEmbed ─ masked patches → mask token ─ [CLS; patches] (B, 1 + N, D)
              ─ L pre-LN blocks, each adding the one shared relative position bias ─ LayerNorm ─ drop CLS

    No absolute position embedding. Stochastic depth rises linearly from 0 to `drop_path` over the blocks.
    forward(image, padding_mask=None, tap, window=0, mask) → (output (B, N, D), [tap of every block (B, N, D)]).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.dim, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.rel_pos_bias = RelativePositionBias((grid, grid), cfg.heads)
        rates = [cfg.drop_path * i / max(cfg.layers - 1, 1) for i in range(cfg.layers)]  # linear 0 → drop_path
        self.layers = nn.ModuleList(PreLNBlock(cfg.dim, cfg.heads, cfg.ffn_dim, cfg.attn_dropout, rate, cfg.layer_scale,
                                               cfg.dropout) for rate in rates)
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.apply(init_vit_params)
        trunc_normal_(self.cls_token)
        trunc_normal_(self.mask_token)
        for depth, block in enumerate(self.layers, start=1):                 # BEiT fix_init_weight: deeper blocks add less
            block.self_attn.out_proj.weight.data.div_(math.sqrt(2 * depth))
            block.fc2.weight.data.div_(math.sqrt(2 * depth))

    def forward(self, image, padding_mask=None, tap=None, window=0, mask=None):
        assert padding_mask is None and window == 0, 'images are never padded, and --teacher-context is for speech'
        x = self.patch_embed(image)                                           # (B, N, D)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)  # BEiT: x·(1 − w) + mask_token·w
        x = torch.cat([self.cls_token.expand(len(x), -1, -1).to(x.dtype), x], dim=1)  # (B, 1 + N, D)
        bias = self.rel_pos_bias()                                            # (H, 1 + N, 1 + N)
        taps = []
        for block in self.layers:
            x, t = block(x, bias, tap)
            if tap is not None:
                taps.append(t[:, 1:])                                         # (B, N, D): targets have no CLS
        return self.norm(x)[:, 1:], taps


def trunc_normal_(t, std=0.02):
    """BEiT's trunc_normal_: N(0, std²) cut at ±std (timm's with a = −std, b = std), so the actual std is ≈ 0.54·std."""
    return nn.init.trunc_normal_(t, std=std, a=-std, b=std)


def init_vit_params(module):
    """BEiT _init_weights: Linear and Conv2d weights ~ trunc_normal_(0.02), biases 0; LayerNorm keeps PyTorch's (1, 0)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Data2Vec(nn.Module):
    """The student: [modality front-end] → `encoder` → regression head. The teacher is an EMA copy of `encoder`.

    speech: feature encoder → mask embedding → positional encoder → Transformer. `encoder` is the Transformer
            only: the teacher reads `teacher_input`, the unmasked features passed through the student's own
            feature and positional encoders (fairseq `ema_transformer_only`, `ema_layers_only`; paper: 'share
            the parameters of the feature encoder and the positional encoder').
    vision: `encoder` is the whole VisionTransformer, patch embedding and relative position bias included
            (BEiT ModelEmaV2 of the whole model); `teacher_input` is the same augmented image, unmasked.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.modality == 'speech':
            self.feature_encoder = SpeechFeatureEncoder(cfg.conv_dim, cfg.dim)
            self.mask_emb = nn.Parameter(torch.empty(cfg.dim).uniform_())      # fairseq: uniform_() in [0, 1)
            self.pos_encoder = ConvPositionalEncoder(cfg.dim, cfg.pos_conv_depth, cfg.pos_conv_kernel, cfg.pos_conv_groups)
            self.encoder = Transformer(cfg)
        elif cfg.modality == 'vision':
            self.encoder = VisionTransformer(cfg)                             # holds the mask token
        elif cfg.modality == 'text':
            self.embed = TextEmbedding(cfg.vocab_size, cfg.dim, cfg.max_tokens, cfg.pad_id)
            self.embed.apply(init_bert_params)
            self.encoder = Transformer(cfg, input_norm=False)                # blocks only: the EMA skips the embeddings
        else:
            raise ValueError(f"unknown modality {cfg.modality!r} (speech, vision, text)")
        if cfg.modality == 'text':                            # fairseq data2vec_text head_layers 2: D → 2D → GELU → D
            self.regression_head = nn.Sequential(nn.Linear(cfg.dim, 2 * cfg.dim), nn.GELU(), nn.Linear(2 * cfg.dim, cfg.dim))
            self.regression_head.apply(init_bert_params)     # fairseq: apply(init_bert_params) over the whole model
        else:
            self.regression_head = nn.Linear(cfg.dim, cfg.dim)   # fairseq final_proj, BEiT lm_head: one Linear (#4199)
        if cfg.modality == 'vision':
            init_vit_params(self.regression_head)

    def encode(self, x, padding_mask=None, mask=None):
        """Features x (B, T, D) → student output (B, T, D); masked steps see the mask embedding."""
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)    # (B, T, D)
        x, _ = self.encoder(self.pos_encoder(x, padding_mask), padding_mask)
        return x

    def forward(self, source, padding_mask=None, mask=None, original=None):
        """source (B, S), padding_mask (B, S), mask (B, T) → pred (B, T, D), teacher_input (B, T, D), frame padding (B, T).
        vision: source (B, 3, H, W), no padding, mask (B, N) → pred (B, N, D), teacher_input = source, None.
        text: source = masked token ids (B, T), original = the uncorrupted ids (B, T) → pred (B, T, D), teacher_input
              = the shared embedding of the original tokens (the paper; fairseq feeds the teacher masked tokens only,
              issue #4881), padding (B, T) or None. The mask is already in the ids (masking.token_mask).

        The head runs on every step (cheap, and shapes stay static); the loss keeps the masked ones.
        """
        if self.cfg.modality == 'vision':
            x, _ = self.encoder(source, mask=mask)                            # (B, N, D)
            return self.regression_head(x), source, None
        if self.cfg.modality == 'text':
            with torch.no_grad():
                teacher_input = self.embed(original)                          # (B, T, D)
            x, _ = self.encoder(self.embed(source), padding_mask)             # (B, T, D)
            return self.regression_head(x), teacher_input, padding_mask
        x, frame_padding = self.feature_encoder(source, padding_mask)         # (B, T, D)
        with torch.no_grad():                                                 # the teacher's view: unmasked, no gradient
            teacher_input = self.pos_encoder(x, frame_padding)
        pred = self.regression_head(self.encode(x, frame_padding, mask))      # (B, T, D)
        return pred, teacher_input, frame_padding

    def num_params(self, head=False):
        return sum(p.numel() for n, p in self.named_parameters() if head or not n.startswith('regression_head'))


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

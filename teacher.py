"""The EMA teacher and the targets it builds (paper, 'Teacher parameterization' and 'Targets').

    teacher weights   Δ ← τ Δ + (1 − τ) θ            after every student update θ
    decay schedule    τ: τ₀ → τₑ linearly over τₙ updates, then τₑ
    targets           y_t = post((1/K) Σ_{l = L−K+1..L} norm(a_t^l))

a_t^l is a chosen tensor ('tap', model.Block) of teacher block l at step t for the unmasked input;
norm and post are parameter-free. Per modality (config.PRESETS):

    speech  the FFN output before the last residual, K 8; norm = instance norm over time, post = none (fairseq v1);
            the teacher averages the Transformer and shares the feature and positional encoders
    vision  the end-of-block output, K 6; norm = layer norm over channels, post = layer norm (data2vec_vision
            post_target_layer_norm); the teacher averages everything, the patch embedding included
    text    the FFN output before the last residual, K 10; norm = layer norm over channels, post = none (fairseq
            data2vec_text); the teacher averages the blocks and shares the embeddings, reading the original tokens

Which parts the teacher averages is the front-end's to say (encoders.FrontEnd.averaged). Legend as in model.py.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


class Teacher(nn.Module):
    """The EMA teacher: a frozen copy, made right after the student is initialised, of the parts the EMA averages.

    It always averages the student's Transformer. It averages the front-end too where the front-end says so
    (`averaged`: vision, BEiT's EMA of the whole model; speech with --ema-front-end) and then reads the raw input
    through its own copy, less the parts the front-end shares (`shared`: data2vec 2.0 speech's feature encoder,
    whose features it reads). Otherwise
    the front-end is shared (speech: the feature and positional encoders, paper; text: the embeddings, fairseq): the
    teacher reads the tokens the student's front-end made of the unmasked input, and is handed that front-end when
    it runs (`front_end=`) for where positions enter the attention. Its state dict's keys are the student's.
    """

    def __init__(self, student):
        super().__init__()
        self.front_end = None
        if student.front_end.averaged:
            self.front_end = make_teacher(student.front_end)
            for name in student.front_end.shared:                              # data2vec 2.0 speech: the feature encoder
                parent, _, child = name.rpartition('.')
                delattr(self.front_end.get_submodule(parent), child)
        self.encoder = make_teacher(student.encoder)
        assert list(self.state_dict()) == list(self.averaged_part(student).state_dict()), 'teacher and student must pair up'

    @staticmethod
    def averaged_part(student):
        """The student modules this teacher follows, under the same names and in the same order (ema_update_)."""
        front_end = without(student.front_end, student.front_end.shared)
        parts = dict(front_end=front_end) if student.front_end.averaged else {}
        return nn.ModuleDict(dict(parts, encoder=student.encoder))


    def forward(self, x, padding_mask=None, tap='ffn', window=0, front_end=None):
        """x: the raw input as keywords of the front-end's forward (averaged front-end: dict(source=…)) or, for a
        shared one, the tokens (B, T, D) that the student's
        `front_end` made of the unmasked input → the chosen tap of every block, (B, T, D) each, without the prefix (CLS)."""
        if self.front_end is not None:
            front_end = self.front_end
            x, padding_mask = front_end.teacher_tokens(x)                     # its own copy → (B, T', D)
        _, taps = self.encoder(x, front_end.attention(x, padding_mask, window), tap)
        return [t[:, front_end.prefix:] for t in taps]


def without(module, names):
    """A view of `module` (the same parameter and buffer tensors, the same names) less the submodules `names`
    ('feature_encoder', or a dotted path): what the teacher's pruned copy pairs up with, key for key."""
    if not names:
        return module
    view = nn.Module()
    for n, p in module.named_parameters(recurse=False):
        view.register_parameter(n, p)
    for n, b in module.named_buffers(recurse=False):
        view.register_buffer(n, b, persistent=n not in module._non_persistent_buffers_set)
    for n, child in module.named_children():
        if n not in names:
            view.add_module(n, without(child, [x.split('.', 1)[1] for x in names if x.startswith(n + '.')]))
    return view


def make_teacher(module):
    """A frozen copy of a module, in eval mode: no gradient, no dropout."""
    teacher = copy.deepcopy(module)
    teacher.requires_grad_(False)
    return teacher.eval()


def ema_decay_at(step, start=0.999, end=0.9999, anneal_steps=30_000):
    """τ after `step` updates: τₑ − (τₑ − τ₀)(1 − step/τₙ) for step < τₙ, then τₑ (fairseq get_annealed_rate)."""
    if step >= anneal_steps:
        return end
    return end - (end - start) * (1 - step / anneal_steps)


@torch.no_grad()
def ema_update_(teacher, student, decay):
    """Δ ← τΔ + (1 − τ)θ for every parameter, in fp32, as one foreach op; buffers are copied."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    assert len(t_params) == len(s_params) and all(p.dtype == torch.float32 for p in t_params), 'EMA needs fp32 twins'
    torch._foreach_lerp_(t_params, s_params, 1.0 - decay)                     # Δ + (1 − τ)(θ − Δ)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


def normalize(a, kind, padding_mask=None, eps=1e-5):
    """Parameter-free normalisation of one block's output a: (B, T, D), in fp32.

    'instance': per utterance and channel, over time (F.instance_norm on (B, D, T)); padded steps are
                left out of the statistics (fairseq includes them; DEVIATIONS.md 3).
    'layer':    per step, over channels (F.layer_norm).   'none': unchanged.
    """
    a = a.float()
    if kind == 'instance':
        w = torch.ones_like(a[..., :1]) if padding_mask is None else (~padding_mask)[..., None].float()  # (B, T, 1)
        n = w.sum(1, keepdim=True).clamp(min=1)                                # (B, 1, 1)
        mean = (a * w).sum(1, keepdim=True) / n                                # (B, 1, D)
        var = ((a - mean).square() * w).sum(1, keepdim=True) / n
        return (a - mean) * torch.rsqrt(var + eps)
    if kind == 'layer':
        return F.layer_norm(a, a.shape[-1:], eps=eps)
    if kind == 'none':
        return a
    raise ValueError(f'unknown target norm {kind!r}')


def make_targets(layer_outputs, kind='instance', padding_mask=None, post='none'):
    """y = post((1/K) Σ_l norm(a^l)) over the K given block outputs, each (B, T, D). Returns (B, T, D) fp32."""
    y = sum(normalize(a, kind, padding_mask) for a in layer_outputs) / len(layer_outputs)
    return normalize(y, post, padding_mask)


@torch.no_grad()
def teacher_targets(teacher, teacher_input, padding_mask=None, tap='ffn', top_k=8, norm='instance', window=0, post='none',
                    front_end=None):
    """Run the teacher on the unmasked input and average its top-K taps. window: teacher context ±W (0 = all);
    front_end: the student's, which a teacher that does not average its own shares."""
    taps = teacher(teacher_input, padding_mask, tap=tap, window=window, front_end=front_end)
    return make_targets(taps[-top_k:], norm, padding_mask, post)

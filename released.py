"""Released weights: the published data2vec models, in HuggingFace's format, loaded into this code.

    huggingface-cli download facebook/data2vec-audio-base-960h --local-dir models/data2vec-audio-base-960h
    python finetune.py --modality speech --init models/data2vec-audio-base-960h --steps 0 --data DIR   # its own CTC head
    python finetune.py --modality speech --init models/data2vec-audio-base --data DIR                  # fine-tune the encoder
    python train.py --modality speech --init models/data2vec-audio-base --data DIR                     # pretrain further

A model folder holds config.json and model.safetensors or pytorch_model.bin (or their sharded .index.json). Nothing is
downloaded here. `load_released(folder)`:

    1. config.json → our ModelConfig (ARCH_KEYS), refusing with one line what this code does not build;
    2. every tensor renamed HF → ours with one table per modality (KEY_MAPS: full-match patterns, first match wins);
       every key is used once and every shape checked against the architecture; the keys left out are listed by name
       (DROPPED), and the one folded in is said (the text token-type row, added to every position row: HF adds row 0
       of it to every token, and its conversion of data2vec text zeroes it);
    3. a task head, where the folder has one: CTC letters (its vocab.json rows put in our CTC_VOCAB order),
       image classification (BEiT's mean pooling → fc_norm → Linear), text classification (RoBERTa's head on <s>).

Not loadable: fairseq .pt checkpoints and the data2vec 2.0 weights (released only in fairseq's format).
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from config import ModelConfig
from data import DataError
from data.speech import CTC_VOCAB
from encoders import CONV_LAYERS
from model import Data2Vec

MODALITY = {'data2vec-audio': 'speech', 'data2vec-vision': 'vision', 'data2vec-text': 'text'}   # HF model_type →
BASE_PREFIX = {'speech': 'data2vec_audio.', 'vision': 'data2vec_vision.', 'text': 'data2vec_text.'}  # in task models
TASK = {'Data2VecAudioForCTC': 'ctc', 'Data2VecVisionForImageClassification': 'classify',
        'Data2VecTextForSequenceClassification': 'classify'}   # HF architectures whose head we keep; others: encoder only

L = r'encoder\.layers?\.(\d+)\.'                                 # HF's block prefix: encoder.layers.i (audio), encoder.layer.i
KEY_MAPS = {                                                     # HF name (full match) → ours
    'speech': [
        (r'feature_extractor\.conv_layers\.(\d+)\.(conv\.weight|layer_norm\.weight|layer_norm\.bias)',
         r'front_end.feature_encoder.conv_layers.\1.\2'),
        (r'feature_projection\.(layer_norm|projection)\.(weight|bias)', r'front_end.feature_encoder.\1.\2'),
        (r'masked_spec_embed', 'front_end.mask_emb'),
        (r'encoder\.pos_conv_embed\.layers\.(\d+)\.conv\.(weight|bias)', r'front_end.pos_encoder.convs.\1.\2'),
        (r'encoder\.layer_norm\.(weight|bias)', r'encoder.layer_norm.\1'),
        (L + r'attention\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)', r'encoder.layers.\1.self_attn.\2.\3'),
        (L + r'layer_norm\.(weight|bias)', r'encoder.layers.\1.self_attn_layer_norm.\2'),
        (L + r'feed_forward\.intermediate_dense\.(weight|bias)', r'encoder.layers.\1.fc1.\2'),
        (L + r'feed_forward\.output_dense\.(weight|bias)', r'encoder.layers.\1.fc2.\2'),
        (L + r'final_layer_norm\.(weight|bias)', r'encoder.layers.\1.final_layer_norm.\2'),
        (r'lm_head\.(weight|bias)', r'head.proj.\1'),                                          # Data2VecAudioForCTC
    ],
    'vision': [
        (r'embeddings\.(cls_token|mask_token)', r'front_end.\1'),
        (r'embeddings\.patch_embeddings\.projection\.(weight|bias)', r'front_end.patch_embed.proj.\1'),
        (r'encoder\.relative_position_bias\.relative_position_bias_table', 'front_end.rel_pos_bias.table'),   # shared
        (L + r'attention\.attention\.relative_position_bias\.relative_position_bias_table',
         r'encoder.layers.\1.rel_pos_bias.table'),                                              # one per block (ft1k)
        (L + r'attention\.attention\.query\.(weight|bias)', r'encoder.layers.\1.self_attn.q_proj.\2'),
        (L + r'attention\.attention\.key\.weight', r'encoder.layers.\1.self_attn.k_proj.weight'),   # BEiT: no key bias
        (L + r'attention\.attention\.value\.(weight|bias)', r'encoder.layers.\1.self_attn.v_proj.\2'),
        (L + r'attention\.output\.dense\.(weight|bias)', r'encoder.layers.\1.self_attn.out_proj.\2'),
        (L + r'layernorm_before\.(weight|bias)', r'encoder.layers.\1.norm1.\2'),
        (L + r'layernorm_after\.(weight|bias)', r'encoder.layers.\1.norm2.\2'),
        (L + r'intermediate\.dense\.(weight|bias)', r'encoder.layers.\1.fc1.\2'),
        (L + r'output\.dense\.(weight|bias)', r'encoder.layers.\1.fc2.\2'),
        (L + r'lambda_(1|2)', r'encoder.layers.\1.gamma_\2'),                                   # LayerScale γ
        (r'layernorm\.(weight|bias)', r'encoder.norm.\1'),                                      # no mean pooling
        (r'pooler\.layernorm\.(weight|bias)', r'head.fc_norm.\1'),                              # mean pooling: fc_norm
        (r'classifier\.(weight|bias)', r'head.proj.\1'),
    ],
    'text': [
        (r'embeddings\.word_embeddings\.weight', 'front_end.embed.tokens.weight'),
        (r'embeddings\.position_embeddings\.weight', 'front_end.embed.positions.weight'),
        (r'embeddings\.LayerNorm\.(weight|bias)', r'front_end.embed.layer_norm.\1'),
        (L + r'attention\.self\.query\.(weight|bias)', r'encoder.layers.\1.self_attn.q_proj.\2'),
        (L + r'attention\.self\.key\.(weight|bias)', r'encoder.layers.\1.self_attn.k_proj.\2'),
        (L + r'attention\.self\.value\.(weight|bias)', r'encoder.layers.\1.self_attn.v_proj.\2'),
        (L + r'attention\.output\.dense\.(weight|bias)', r'encoder.layers.\1.self_attn.out_proj.\2'),
        (L + r'attention\.output\.LayerNorm\.(weight|bias)', r'encoder.layers.\1.self_attn_layer_norm.\2'),
        (L + r'intermediate\.dense\.(weight|bias)', r'encoder.layers.\1.fc1.\2'),
        (L + r'output\.dense\.(weight|bias)', r'encoder.layers.\1.fc2.\2'),
        (L + r'output\.LayerNorm\.(weight|bias)', r'encoder.layers.\1.final_layer_norm.\2'),
        (r'classifier\.dense\.(weight|bias)', r'head.proj.1.\1'),                               # RoBERTa's head:
        (r'classifier\.out_proj\.(weight|bias)', r'head.proj.4.\1'),                            # Linear → tanh → Linear
    ],
}
DROPPED = {                                                      # HF keys left out on purpose, and why
    'speech': [],
    'vision': [(r'.*relative_position_index', 'a function of the grid (recomputed)')],
    'text': [(r'pooler\.dense\.(weight|bias)', "BERT's pooler: data2vec's heads do not use it"),
             (r'embeddings\.position_ids|embeddings\.token_type_ids', 'a buffer of 0, 1, …'),
             (r'lm_head\..*', 'the masked-LM head (not data2vec\'s)')],
}
TOKEN_TYPES = 'embeddings.token_type_embeddings.weight'         # text: folded into the position rows


def rename(modality, hf_key):
    """Our name of an HF key (its task-model prefix removed), or None."""
    for pattern, ours in KEY_MAPS[modality]:
        if re.fullmatch(pattern, hf_key):
            return re.sub(pattern, ours, hf_key)
    return None


# ---------------------------------------------------------------------------------------------- config.json → ModelConfig
def _need(cfg, path, key, ok, why):
    """Refuse a config value this code does not build: one line naming the file, the key and its value."""
    if not ok(cfg.get(key)):
        raise DataError(f'{path}: {key} = {json.dumps(cfg.get(key))} is not supported ({why})')


def speech_sizes(path, cfg):
    for key, ok, why in [('conv_dim', lambda v: v is None or (len(v) == len(CONV_LAYERS) and len(set(v)) == 1), '7 conv layers of one width'),
                         ('conv_kernel', lambda v: v is None or tuple(v) == tuple(k for k, _ in CONV_LAYERS), f'kernels {[k for k, _ in CONV_LAYERS]}'),
                         ('conv_stride', lambda v: v is None or tuple(v) == tuple(s for _, s in CONV_LAYERS), f'strides {[s for _, s in CONV_LAYERS]}'),
                         ('conv_bias', lambda v: not v, 'the conv layers have no bias'),
                         ('feat_extract_activation', lambda v: v in (None, 'gelu'), 'GELU after every conv layer'),
                         ('add_adapter', lambda v: not v, 'no adapter layers')]:
        _need(cfg, path, key, ok, why)
    return dict(conv_dim=cfg.get('conv_dim', [512])[0], pos_conv_depth=cfg.get('num_conv_pos_embeddings', 5),
                pos_conv_kernel=cfg.get('conv_pos_kernel_size', 19), pos_conv_groups=cfg.get('num_conv_pos_embedding_groups', 16),
                pos_conv_zero='first', layer_norm_eps=cfg.get('layer_norm_eps', 1e-5), layerdrop=cfg.get('layerdrop', 0.1),
                dropout=cfg.get('hidden_dropout', 0.1), attn_dropout=cfg.get('attention_dropout', 0.1))


def square(v):
    """HF sizes are an int or [h, w]; ours are square."""
    return v if isinstance(v, int) else v[0] if isinstance(v, (list, tuple)) and len(set(v)) == 1 else None


def vision_sizes(path, cfg):
    shared = cfg.get('use_shared_relative_position_bias')
    for key, ok, why in [('use_absolute_position_embeddings', lambda v: not v, 'positions are relative position biases'),
                         ('num_channels', lambda v: v in (None, 3), 'RGB images'),
                         ('layer_scale_init_value', lambda v: v is None or v > 0, 'blocks with LayerScale'),
                         ('image_size', lambda v: v is None or square(v) is not None, 'square images'),
                         ('patch_size', lambda v: v is None or square(v) is not None, 'square patches'),
                         ('use_mean_pooling', lambda v: v is not False or 'Data2VecVisionModel' in (cfg.get('architectures') or []),
                          "a classifier reads the mean of the patch tokens (BEiT's fine-tuning), not the CLS token"),
                         ('use_relative_position_bias', lambda v: bool(v) != bool(shared),
                          'one relative position bias: shared (use_shared_relative_position_bias) or one per block')]:
        _need(cfg, path, key, ok, why)
    return dict(image_size=square(cfg.get('image_size', 224)), patch_size=square(cfg.get('patch_size', 16)),
                layer_scale=cfg.get('layer_scale_init_value', 0.1), rel_pos_bias='shared' if shared else 'layer',
                layer_norm_eps=cfg.get('layer_norm_eps', 1e-12), drop_path=cfg.get('drop_path_rate', 0.1),
                dropout=cfg.get('hidden_dropout_prob', 0.0), attn_dropout=cfg.get('attention_probs_dropout_prob', 0.0))


def text_sizes(path, cfg):
    for key, ok, why in [('pad_token_id', lambda v: v in (None, 1), "RoBERTa's layout: <pad> = 1, positions from 2"),
                         ('position_embedding_type', lambda v: v in (None, 'absolute'), 'learned absolute positions'),
                         ('is_decoder', lambda v: not v, 'an encoder')]:
        _need(cfg, path, key, ok, why)
    return dict(vocab_size=cfg.get('vocab_size', 30_522), max_tokens=cfg.get('max_position_embeddings', 512) - 2, pad_id=1,
                layer_norm_eps=cfg.get('layer_norm_eps', 1e-12), dropout=cfg.get('hidden_dropout_prob', 0.1),
                attn_dropout=cfg.get('attention_probs_dropout_prob', 0.1))


SIZES = dict(speech=speech_sizes, vision=vision_sizes, text=text_sizes)   # each HF config class's keys, with its defaults



def model_config(path, cfg):
    """(ModelConfig, modality) of an HF config.json dict. The dropouts are the config's; fine-tuning may override them."""
    kind = cfg.get('model_type')
    if kind not in MODALITY:
        raise DataError(f'{path}: model_type = {json.dumps(kind)} is not a data2vec model ({", ".join(MODALITY)})')
    modality = MODALITY[kind]
    _need(cfg, path, 'hidden_act', lambda v: v in (None, 'gelu'), 'the blocks use exact GELU')
    sizes = dict(modality=modality, dim=cfg.get('hidden_size', 768), layers=cfg.get('num_hidden_layers', 12),
                 heads=cfg.get('num_attention_heads', 12), ffn_dim=cfg.get('intermediate_size', 3072), layerdrop=0.0)
    return ModelConfig(**{**sizes, **SIZES[modality](path, cfg)}), modality


# ---------------------------------------------------------------------------------------------- reading the weights
def read_weights(folder):
    """({name: tensor}, {name: the file it came from}) of model.safetensors, pytorch_model.bin, or their shards
    (…index.json); one-line errors."""
    folder = Path(folder)
    for index in ('model.safetensors.index.json', 'pytorch_model.bin.index.json'):
        if (folder / index).is_file():
            try:
                files = sorted(set(json.loads((folder / index).read_text())['weight_map'].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise DataError(f'{folder / index}: not a shard index ({type(e).__name__}: {e})') from None
            out, where = {}, {}
            for f in files:
                part = read_file(folder / f)
                out.update(part)
                where.update(dict.fromkeys(part, folder / f))
            return out, where
    for name in ('model.safetensors', 'pytorch_model.bin'):
        if (folder / name).is_file():
            out = read_file(folder / name)
            return out, dict.fromkeys(out, folder / name)
    raise DataError(f'{folder}: no model.safetensors or pytorch_model.bin (huggingface-cli download MODEL --local-dir {folder})')


def read_file(path):
    if not path.is_file():
        raise DataError(f'{path}: no such file (named by the shard index)')
    if path.suffix == '.safetensors':
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise DataError(f'{path}: reading safetensors needs the safetensors package (pip install -r requirements.txt)') from None
        try:
            return load_file(str(path))
        except Exception as e:                                   # SafetensorError, or an OSError on a truncated header
            raise DataError(f'{path}: not a readable safetensors file ({type(e).__name__}: {str(e)[:200]})') from None
    try:
        weights = torch.load(path, map_location='cpu', weights_only=True)   # tensors and plain types only, runs no code
    except Exception as e:
        raise DataError(f'{path}: not a readable PyTorch weights file ({type(e).__name__}: {str(e).splitlines()[0][:200]})') from None
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise DataError(f'{path}: not a state dict of tensors')
    return weights


# ---------------------------------------------------------------------------------------------- the loader
@dataclass
class Released:
    """A released model in our terms: its architecture, the encoder's weights (Data2Vec's names, no regression head),
    the head's (finetune.Finetuner's names, 'head.…') or {}, its task (ctc | classify | None) and class names, and
    what was left out or kept at its init."""
    mcfg: ModelConfig
    encoder: dict
    head: dict = field(default_factory=dict)
    task: str = None
    classes: list = None
    notes: list = field(default_factory=list)


def ctc_rows(folder, cfg):
    """HF vocab.json → the row of the CTC head for each of our CTC_VOCAB letters (blank: HF's pad_token_id, which its
    CTC loss uses as the blank), and the HF tokens we have no letter for (<s>, </s>, <unk>: their rows are dropped)."""
    path = Path(folder) / 'vocab.json'
    try:
        vocab = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f'{path}: a CTC model needs its vocab.json ({type(e).__name__}: {str(e)[:100]})') from None
    blank = cfg.get('pad_token_id', 0)
    missing = [c for c in CTC_VOCAB[1:] if c not in vocab]
    if missing:
        raise DataError(f'{path}: no {" ".join(missing)} in the vocabulary; our CTC letters are {"".join(CTC_VOCAB[1:])}')
    rows = [blank] + [vocab[c] for c in CTC_VOCAB[1:]]
    return rows, sorted((t for t, i in vocab.items() if i not in rows), key=vocab.get)


def load_released(folder):
    """A local HF data2vec folder → Released. Errors name the file and the key, and nothing is half-loaded."""
    folder = Path(folder)
    path = folder / 'config.json'
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f'{path}: not a readable HF config ({type(e).__name__}: {str(e)[:100]})') from None
    mcfg, modality = model_config(path, cfg)
    arch = (cfg.get('architectures') or ['?'])[0]
    task = TASK.get(arch)
    hf, where = read_weights(folder)
    prefix = BASE_PREFIX[modality]
    with torch.device('meta'):
        expected = {k: v.shape for k, v in Data2Vec(mcfg).state_dict().items() if not k.startswith('regression_head.')}
    n_out = None
    if task == 'ctc':
        rows, unused = ctc_rows(folder, cfg)
        n_out = len(CTC_VOCAB)
    elif task == 'classify':
        n_out = cfg.get('num_labels') or len(cfg.get('id2label') or {})
    if task:
        head_shapes = {'ctc': {'head.proj.weight': (n_out, mcfg.dim), 'head.proj.bias': (n_out,)},
                       'vision': {'head.fc_norm.weight': (mcfg.dim,), 'head.fc_norm.bias': (mcfg.dim,),
                                  'head.proj.weight': (n_out, mcfg.dim), 'head.proj.bias': (n_out,)},
                       'text': {'head.proj.1.weight': (mcfg.dim, mcfg.dim), 'head.proj.1.bias': (mcfg.dim,),
                                'head.proj.4.weight': (n_out, mcfg.dim), 'head.proj.4.bias': (n_out,)}}
        expected.update(head_shapes['ctc' if task == 'ctc' else modality])
    ours, notes = {}, []
    task_model = any(k.startswith(prefix) for k in hf)            # a task model: the encoder's keys have the prefix
    for key, tensor in hf.items():
        name = key.removeprefix(prefix)
        target = rename(modality, name)
        if name == TOKEN_TYPES:
            continue
        if (task_model and not key.startswith(prefix) or target and target.startswith('head.')) and \
                not (task and target and target.startswith('head.')):
            notes.append(f'dropped {key}: a head of {arch} that this code does not build')   # e.g. ForXVector, the pooler
            continue
        if target is None:
            why = next((why for pattern, why in DROPPED[modality] if re.fullmatch(pattern, name)), None)
            if why is None:
                raise DataError(f'{where[key]}: {key} has no place in a data2vec {modality} model (KEY_MAPS in released.py)')
            notes.append(f'dropped {key}: {why}')
            continue
        if task == 'ctc' and target.startswith('head.proj.'):
            if tensor.shape[0] != cfg.get('vocab_size', tensor.shape[0]):
                raise DataError(f'{where[key]}: {key} has shape {tuple(tensor.shape)}; config.json vocab_size is {cfg.get("vocab_size")}')
            tensor = tensor[rows]                                # (V_hf, D) → (V_ours, D) in CTC_VOCAB order
        if target in ours:
            raise DataError(f'{where[key]}: {key} and another key both map to {target}')
        if target not in expected:
            raise DataError(f'{where[key]}: {key} → {target}, which the architecture in config.json does not have')
        if tuple(tensor.shape) != tuple(expected[target]):
            raise DataError(f'{where[key]}: {key} has shape {tuple(tensor.shape)}; config.json makes {target} '
                            f'{tuple(expected[target])}')
        ours[target] = tensor.float()
    types = hf.get(prefix + TOKEN_TYPES, hf.get(TOKEN_TYPES))      # text: (type_vocab_size, D); every token has type 0
    if types is not None:
        if 'front_end.embed.positions.weight' in ours:
            ours['front_end.embed.positions.weight'] = ours['front_end.embed.positions.weight'] + types[0].float()
        notes.append(f'folded {TOKEN_TYPES} row 0 into the position rows (every token has type 0)'
                     + (f'; dropped its {len(types) - 1} other rows' if len(types) > 1 else ''))
    if task == 'ctc' and unused:
        notes.append(f'dropped the CTC rows of {" ".join(unused)} (no letter of ours)')
    missing = sorted(set(expected) - set(ours))
    optional = {'front_end.mask_emb', 'front_end.mask_token', 'encoder.norm.weight', 'encoder.norm.bias'}  # HF leaves these out
    if set(missing) - optional:                                  # of models that do not mask, or pool with the head's fc_norm
        raise DataError(f'{next(iter(set(where.values())), folder)}: no weights for {", ".join(sorted(set(missing) - optional)[:4])}'
                        f'{" …" if len(set(missing) - optional) > 4 else ""} ({len(hf)} tensors; config.json: {arch})')
    for name in missing:
        notes.append(f'kept the fresh init of {name}: not in the checkpoint')
    classes = None
    if task == 'classify':
        labels = cfg.get('id2label') or {}
        classes = [labels.get(str(i), str(i)) for i in range(n_out)]
    return Released(mcfg, {k: v for k, v in ours.items() if not k.startswith('head.')},
                    {k: v for k, v in ours.items() if k.startswith('head.')}, task, classes, notes)


def is_released(path):
    """A folder with a config.json: an HF model, not a train.py checkpoint.pt."""
    return Path(path).is_dir() and (Path(path) / 'config.json').is_file()

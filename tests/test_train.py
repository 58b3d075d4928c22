"""train.py from the command line: one step, its outputs, and clear errors.   pytest tests/test_train.py"""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from encoders import conv_output_length

SMALL = ['--dim', '32', '--layers', '2', '--heads', '2', '--ffn-dim', '64', '--conv-dim', '16', '--top-k', '2',
         '--batch-size', '4', '--micro-batch-size', '2', '--crop', '16000', '--workers', '0']


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / 'train.py'), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def two_steps(out, *flags):
    """Run train.py for 2 steps; check it wrote every output; return config.json."""
    r = run('--steps', '2', '--log-every', '1', '--out', str(out), *flags)
    assert r.returncode == 0, r.stderr
    for name in ('config.json', 'log.jsonl', 'checkpoint.pt', 'curves.png'):
        assert (out / name).stat().st_size > 0, name
    return json.loads((out / 'config.json').read_text())


def test_one_step_from_the_command_line(tmp_path):
    r = run('--modality', 'speech', '--steps', '2', '--log-every', '1', '--out', str(tmp_path), *SMALL)
    assert r.returncode == 0, r.stderr
    assert 'M parameters' in r.stdout
    for name in ('config.json', 'log.jsonl', 'checkpoint.pt', 'curves.png'):
        assert (tmp_path / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records] == [1, 2]
    assert {'step', 'loss', 'lr', 'ema_decay', 'target_var', 'pred_var', 'samples_per_s', 'data_frac'} <= set(records[0])
    assert all(0 <= r['data_frac'] < 1 for r in records)
    ckpt = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    assert {'student', 'teacher', 'optimizer', 'step', 'config', 'rng'} <= set(ckpt) and ckpt['step'] == 2
    assert ckpt['config']['model']['dim'] == 32 and ckpt['config']['train']['top_k'] == 2
    assert not any(k.startswith(('_orig_mod', 'module')) for k in ckpt['student'])
    assert set(ckpt['teacher']) == {k for k in ckpt['student'] if k.startswith('encoder.')}   # speech: the Transformer only


def test_ema_front_end_from_the_command_line(tmp_path):
    """--ema-front-end: the teacher's checkpoint holds the feature and positional encoders too, moved by the EMA:
    after 2 updates at τ = 0.9 each of its conv weights is 0.9²·θ₀ + … ≠ θ₀, and not the student's."""
    r = run('--modality', 'speech', '--steps', '2', '--log-every', '1', '--out', str(tmp_path), '--ema-front-end',
            '--ema-start', '0.9', '--ema-end', '0.9', *SMALL)
    assert r.returncode == 0, r.stderr
    assert 'teacher (EMA of the Transformer and the front-end)' in r.stdout
    ckpt = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    assert set(ckpt['teacher']) == {k for k in ckpt['student'] if k.startswith(('encoder.', 'front_end.'))}
    name = 'front_end.feature_encoder.conv_layers.0.conv.weight'
    assert not torch.equal(ckpt['teacher'][name], ckpt['student'][name])


@pytest.mark.parametrize('flag, value, words', [('--top-k', '13', '--top-k 13'), ('--mask-prob', '1.5', '--mask-prob 1.5'),
                                                 ('--target-layer', 'fc3', '--target-layer fc3'), ('--preset', 'huge', '--preset huge'),
                                                 ('--micro-batch-size', '0', '--micro-batch-size 0'), ('--heads', '0', '--heads 0'),
                                                 ('--batch-size', '0', '--batch-size 0')])
def test_out_of_range_flags_fail_with_the_flag_name(flag, value, words):
    r = run(flag, value, '--preset', 'base') if flag != '--preset' else run(flag, value)
    assert r.returncode == 2 and words in r.stderr and 'Traceback' not in r.stderr


def test_bad_data_folder_fails_in_one_line(tmp_path):
    r = run('--data', str(tmp_path / 'missing'), '--out', str(tmp_path / 'out'), *SMALL)
    assert r.returncode == 1 and 'missing: no such directory' in r.stderr and 'Traceback' not in r.stderr
    for i in range(2):
        (tmp_path / f'broken{i}.wav').write_bytes(b'RIFF0000WAVEjunk')
    r = run('--data', str(tmp_path), '--out', str(tmp_path / 'out'), '--steps', '1', *SMALL)
    assert r.returncode == 1 and 'broken' in r.stderr and '.wav: cannot read audio' in r.stderr and 'Traceback' not in r.stderr


def test_tri_stage_schedule():
    from config import TrainConfig, lr_at
    cfg = TrainConfig(lr=1.0, steps=100, warmup=0.1, hold=0.6)
    assert lr_at(0, cfg) == pytest.approx(0.01) and lr_at(5, cfg) == pytest.approx(0.505)
    assert lr_at(10, cfg) == lr_at(69, cfg) == 1.0
    assert lr_at(85, cfg) == pytest.approx(0.1)                       # halfway through the decay: 0.01 ** 0.5
    assert lr_at(100, cfg) == pytest.approx(0.01)


def test_ranks_share_out_each_epoch_without_overlap():
    """Two ranks draw disjoint micro-batches in every epoch, also when the data does not split evenly."""
    import numpy as np
    from config import parse_train_args
    from data import batches
    from data.speech import collate

    class Numbered(torch.utils.data.Dataset):                         # utterance i is the constant i, 1 s long
        lengths = [16000] * 21

        def __len__(self):
            return 21

        def __getitem__(self, i):
            return np.full(16000, float(i), np.float32), ''

    from functools import partial
    mcfg, cfg = parse_train_args(['--micro-batch-size', '2', '--batch-size', '4', '--workers', '0'])
    seen = {}
    for rank in (0, 1):
        it = batches(Numbered(), partial(collate, cfg=cfg), 2, 0, rank, 2)
        ids = [next(it)[0]['source'][:, 0].long().tolist() for _ in range(10)]  # 5 micro-batches per rank and epoch
        seen[rank] = [set(sum(ids[:5], [])), set(sum(ids[5:], []))]
    for epoch in (0, 1):
        assert len(seen[0][epoch]) == len(seen[1][epoch]) == 10 and not seen[0][epoch] & seen[1][epoch]
    assert seen[0][0] != seen[0][1]                                   # reshuffled


VISION_SMALL = ['--modality', 'vision', '--dim', '32', '--layers', '2', '--heads', '2', '--ffn-dim', '64', '--top-k', '2',
                '--batch-size', '4', '--micro-batch-size', '2', '--workers', '0']


def test_one_vision_step_from_the_command_line(tmp_path):
    config = two_steps(tmp_path, *VISION_SMALL)
    assert config['model']['modality'] == 'vision' and config['train']['target_layer'] == 'block'   # the vision preset
    assert config['train']['loss_beta'] == 2.0 and config['train']['target_post_norm'] == 'layer'
    ckpt = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    assert {'front_end.patch_embed.proj.weight', 'front_end.rel_pos_bias.table', 'front_end.cls_token'} <= set(ckpt['teacher'])
    assert set(ckpt['teacher']) == {k for k in ckpt['student'] if not k.startswith('regression_head.')}   # the EMA covers it all
    records = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records] == [1, 2] and all(math.isfinite(r['loss']) for r in records)


@pytest.mark.parametrize('modality, args, words', [
    ('vision', ['--image-size', '30', '--patch-size', '4'], '--image-size 30 must be divisible by --patch-size 4'),
    ('vision', ['--mask-length', '60'], '--mask-length 60'), ('vision', ['--schedule', 'linear'], '--schedule linear'),
    ('vision', ['--crop', '32000'], '--crop is for --modality speech'),
    ('speech', ['--image-size', '64'], '--image-size is for --modality vision')])
def test_bad_vision_flags_fail_with_the_flag_name(modality, args, words):
    r = run('--modality', modality, *args)
    assert r.returncode == 2 and words in r.stderr and 'Traceback' not in r.stderr


def test_cosine_schedule_and_vision_weight_decay_groups():
    from config import TrainConfig, lr_at
    from model import Data2Vec, ModelConfig
    from train import param_groups
    cfg = TrainConfig(schedule='cosine', lr=1.0, min_lr=0.0, warmup=0.1, steps=100, no_decay_1d=True)
    assert lr_at(0, cfg) == 0 and lr_at(5, cfg) == pytest.approx(0.5) and lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.5) and lr_at(100, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(10 + 15, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi / 6)))   # a sixth of the way down
    model = Data2Vec(ModelConfig(modality='vision', dim=16, layers=1, heads=2, ffn_dim=32, image_size=16, patch_size=4))
    decay, no_decay = param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay['weight_decay'] == 0 and 'weight_decay' not in decay
    # BEiT (optim_factory.get_parameter_groups, run by data2vec_vision's run_cyclical.py): no weight decay where
    # len(shape) == 1, the name ends in .bias, or it is in model.no_weight_decay() = {'pos_embed', 'cls_token'}
    # (modeling_cyclical.py). For a 1-block BEiT that is, in BEiT's names → ours:
    beit_no_decay = {'cls_token': 'front_end.cls_token', 'patch_embed.proj.bias': 'front_end.patch_embed.proj.bias',
                     'blocks.0.gamma_1': 'encoder.layers.0.gamma_1', 'blocks.0.gamma_2': 'encoder.layers.0.gamma_2',
                     'blocks.0.norm1.weight': 'encoder.layers.0.norm1.weight', 'blocks.0.norm1.bias': 'encoder.layers.0.norm1.bias',
                     'blocks.0.attn.q_bias': 'encoder.layers.0.self_attn.q_proj.bias',
                     'blocks.0.attn.v_bias': 'encoder.layers.0.self_attn.v_proj.bias',
                     'blocks.0.attn.proj.bias': 'encoder.layers.0.self_attn.out_proj.bias',
                     'blocks.0.norm2.weight': 'encoder.layers.0.norm2.weight', 'blocks.0.norm2.bias': 'encoder.layers.0.norm2.bias',
                     'blocks.0.mlp.fc1.bias': 'encoder.layers.0.fc1.bias', 'blocks.0.mlp.fc2.bias': 'encoder.layers.0.fc2.bias',
                     'norm.weight': 'encoder.norm.weight', 'norm.bias': 'encoder.norm.bias', 'lm_head.bias': 'regression_head.bias'}
    assert {names[id(p)] for p in no_decay['params']} == set(beit_no_decay.values())
    assert {names[id(p)] for p in decay['params']} == {   # 2-D and up decay: the mask token (1, 1, D) and the bias table too
        'front_end.mask_token', 'front_end.patch_embed.proj.weight', 'front_end.rel_pos_bias.table', 'regression_head.weight',
        *(f'encoder.layers.0.{w}.weight' for w in ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj',
                                                   'self_attn.out_proj', 'fc1', 'fc2'))}
    assert [id(p) for p in param_groups(model, TrainConfig())] == list(names)   # fairseq (no --no-decay-1d): all decay


def test_a_truncated_image_found_by_a_loader_worker_fails_in_one_line_with_strict_data(tmp_path):
    import numpy as np
    from PIL import Image
    for i in range(5):
        (tmp_path / 'data' / 'c').mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / 'data' / 'c' / f'{i}.png')
    cut = tmp_path / 'data' / 'c' / '3.png'
    cut.write_bytes(cut.read_bytes()[:600])                           # the header survives, the pixels do not
    r = run('--data', str(tmp_path / 'data'), '--out', str(tmp_path / 'out'), '--steps', '1', *VISION_SMALL,
            '--batch-size', '5', '--micro-batch-size', '5', '--workers', '1', '--strict-data')
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith('train.py: error: ') and '3.png: cannot decode image' in r.stderr


TEXT_SMALL = ['--modality', 'text', '--dim', '32', '--layers', '2', '--heads', '2', '--ffn-dim', '64', '--top-k', '2',
              '--batch-size', '4', '--micro-batch-size', '2', '--workers', '0', '--vocab-size', '5000', '--block-size', '32']


def test_one_text_step_from_the_command_line(tmp_path):
    config = two_steps(tmp_path, *TEXT_SMALL)
    vocab = config['model']['vocab_size']                             # the embedded corpus has fewer merges than 5000
    assert 261 <= vocab < 5000 and config['train']['loss_beta'] == 4.0 and config['train']['loss_scale'] == 1.0
    ckpt = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    assert not any('embed' in k or 'tokens' in k for k in ckpt['teacher'])     # the teacher averages the blocks only
    assert ckpt['student']['front_end.embed.tokens.weight'].shape == (vocab, 32)  # config.json written after the tokenizer
    from tokenizers import Tokenizer
    assert Tokenizer.from_file(str(tmp_path / 'tokenizer.json')).get_vocab_size() == vocab


def test_text_collate_masks_blocks_and_keeps_the_originals():
    from config import parse_train_args
    from data.text import SyntheticText, TokenBlocks, collate, ordinary_ids, pack_blocks, train_tokenizer
    docs = SyntheticText(size=512).documents()
    tok = train_tokenizer(docs, 400)
    ds = TokenBlocks(pack_blocks(docs, tok, 32))
    for mode in ('bert', 'span'):
        mcfg, cfg = parse_train_args(['--modality', 'text', '--text-mask', mode])
        torch.manual_seed(0)
        batch = collate([ds[i] for i in range(64)], cfg, tok.token_to_id('<mask>'), ordinary_ids(tok))
        source, mask, original = batch['source'], batch['mask'], batch['original']
        assert 'padding_mask' not in batch and torch.equal(original, torch.stack([ds[i][0] for i in range(64)]))
        assert torch.equal(mask, source == tok.token_to_id('<mask>'))  # the loss positions are exactly the <mask> tokens
        if mode == 'span':                                              # fairseq's config: every chosen token is <mask>
            assert torch.equal(source != original, mask) and abs(mask.float().mean().item() - 0.306 * 30 / 32) < 0.04
        else:
            assert ((source != original) & ~mask).any() and abs(mask.float().mean().item() - 0.12 * 30 / 32) < 0.02


def test_roberta_and_gpt2_layouts_of_special_tokens():
    from encoders import TextEmbedding
    from masking import token_mask

    class Vocab:                                                      # token_to_id / get_vocab_size, like a tokenizers.Tokenizer
        def __init__(self, ids, size):
            self.ids, self.size = ids, size

        def token_to_id(self, t):
            return self.ids[t]

        def get_vocab_size(self):
            return self.size
    from data.text import ordinary_ids
    roberta = Vocab({'<s>': 0, '<pad>': 1, '</s>': 2, '<unk>': 3, '<mask>': 50264}, 50265)
    gpt2 = Vocab({'<s>': 50257, '<pad>': 50258, '</s>': 50259, '<unk>': 50260, '<mask>': 50261}, 50262)
    assert ordinary_ids(roberta) == (4, 50264) and ordinary_ids(gpt2) == (0, 50257)
    tokens = torch.randint(4, 50264, (64, 64))
    source, mask = token_mask(tokens, 50264, (4, 50264), 0.5, 1, 0.5, 0.0, generator=torch.Generator().manual_seed(0))
    assert ((source == 50264) == mask).all()                          # a random draw is never <mask>, the last id
    emb = TextEmbedding(50262, 8, 16, pad=50258)                       # GPT-2's id 1 is '"', an ordinary token
    quote = torch.tensor([[50257, 1, 1, 7, 50259]])
    assert emb.tokens.weight[1].abs().sum() > 0 and emb.positions.weight.shape[0] == 18
    torch.testing.assert_close(emb(quote)[0, 1], F.layer_norm(emb.tokens.weight[1] + emb.positions.weight[3], (8,),
                                                               emb.layer_norm.weight, emb.layer_norm.bias))


@pytest.mark.parametrize('args, words', [(['--text-mask', 'word'], '--text-mask word'),
                                         (['--block-size', '600'], '--block-size 600 must be in [3, --max-tokens 64]'),
                                         (['--vocab-size', '100'], '--vocab-size 100 must be ≥ 261'),
                                         (['--image-size', '64'], '--image-size is for --modality vision')])
def test_bad_text_flags_fail_with_the_flag_name(args, words):
    r = run('--modality', 'text', *args)
    assert r.returncode == 2 and words in r.stderr and 'Traceback' not in r.stderr


@pytest.mark.parametrize('modality', ['speech', 'vision', 'text'])
def test_help_lists_every_flag(modality):
    """--help prints for every modality (a bare % in a help string once crashed argparse's formatter), flags included."""
    r = run('--modality', modality, '--help')
    assert r.returncode == 0, r.stderr
    assert '--top-k' in r.stdout and '--mask-prob' in r.stdout
    if modality == 'text':
        assert '15%: 80% <mask>' in ' '.join(r.stdout.split())       # the % survives formatting


def test_speech_clips_are_cropped_to_the_shortest_unless_pad():
    """fairseq crops every clip of a batch to the shortest one (nothing padded, no attention mask); here its length is
    rounded down to whole seconds (--crop-step 16000) so that shapes repeat. --pad crops to at most --crop and pads
    to the longest instead. Each crop is a contiguous piece of its clip."""
    import numpy as np
    from config import parse_train_args
    from data.speech import collate
    clips = [np.arange(n, dtype=np.float32) for n in (20_000, 17_000, 30_000)]
    for pad in (False, True):
        mcfg, cfg = parse_train_args(['--crop', '25000'] + (['--pad'] if pad else []))
        batch = collate([(c, '') for c in clips], cfg, generator=torch.Generator().manual_seed(0))
        source, padding, mask = batch['source'], batch['padding_mask'], batch['mask']
        if not pad:
            assert source.shape == (3, 16_000) and padding is None     # the shortest, 17000, rounded down to 1 s
            lengths = [16_000] * 3
        else:
            assert source.shape == (3, 25_000) and padding.sum(1).tolist() == [5_000, 8_000, 0]
            lengths = [20_000, 17_000, 25_000]
        for row, n in zip(source, lengths):
            assert torch.equal(torch.diff(row[:n]), torch.ones(n - 1))   # consecutive samples of the clip
        assert mask.shape == (3, conv_output_length(source.shape[1])) and mask.dtype == torch.bool


def test_compiled_step_meets_one_shape_per_whole_second():
    """torch.compile (dynamic=False, as train.py) of the step on speech micro-batches whose shortest clips are 1.3 s,
    1.7 s, 2.4 s and 1.1 s: crops of 1 s, 1 s, 2 s and 1 s, so dynamo traces exactly 2 graphs, not 4."""
    import numpy as np
    import torch._dynamo
    import torch._dynamo.testing
    from config import parse_train_args
    from data.speech import collate
    from model import Data2Vec
    from teacher import Teacher
    from train import forward_loss
    mcfg, cfg = parse_train_args(['--dim', '32', '--layers', '2', '--heads', '2', '--ffn-dim', '64', '--top-k', '2',
                                  '--conv-dim', '16', '--crop', '320000'])
    torch.manual_seed(0)
    model = Data2Vec(mcfg)
    teacher = Teacher(model)
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    step = torch.compile(forward_loss, backend=counter, dynamic=False)
    for seconds in (1.3, 1.7, 2.4, 1.1):
        clips = [(np.random.randn(int(s * 16_000)).astype(np.float32), '') for s in (seconds, seconds + 0.5)]
        step(model, teacher, collate(clips, cfg, generator=torch.Generator().manual_seed(0)), cfg)
    assert counter.frame_count == 2


# Every base and large preset against its source, the values written out here (not read from config.py). Sources:
# reference.md §1.3 (fairseq base_librispeech.yaml, the paper), §1.4 (fairseq text/pretraining/base.yaml, the paper),
# data2vec_vision/beit/README.md's ViT-B and ViT-L commands with run_cyclical.py's defaults for what they leave out.
# Where the paper and the released command differ, the paper wins and DEVIATIONS.md says so (12, 22); each such
# value carries both here.
SPEECH_BASE = dict(  # fairseq base_librispeech.yaml + Wav2Vec2Config; paper: Base, 400k updates, τ 0.999 → 0.9999 over 30k
    dim=768, layers=12, heads=12, ffn_dim=3072, conv_dim=512, pos_conv_depth=5, pos_conv_kernel=95 // 5, pos_conv_groups=16,
    dropout=0.1, attn_dropout=0.1, layerdrop=0.05, top_k=8, target_layer='ffn', target_norm='instance',
    target_post_norm='none', loss_beta=0.0, loss_scale=0.0, mask_prob=0.65, mask_length=10, ema_start=0.999,
    ema_end=0.9999, ema_anneal_steps=30_000, schedule='tri_stage', lr=5e-4, warmup=0.03, hold=0.9, adam_beta2=0.98,
    adam_eps=1e-6, weight_decay=0.01, no_decay_1d=False, clip=0.0, steps=400_000, crop=320_000)   # max_sample_size 20 s
VISION_B = dict(     # beit/README.md ViT-B: run_cyclical.py --model beit_base_patch16_224 … (16 GPUs × 128)
    dim=768, layers=12, heads=12, ffn_dim=3072, image_size=224, patch_size=16, layer_scale=1e-4, dropout=0.0,
    attn_dropout=0.05, drop_path=0.2,        # paper 0.2; the command's --drop_path 0.25 (DEVIATIONS.md 12)
    top_k=6, target_layer='block', target_norm='layer', target_post_norm='layer', loss_beta=2.0, loss_scale=-1,
    mask_length=16, ema_start=0.9998, ema_end=0.9998, ema_anneal_steps=0, schedule='cosine', lr=2e-3, min_lr=1e-5,
    weight_decay=0.05, no_decay_1d=True, adam_beta2=0.999, adam_eps=1e-8, clip=3.0, batch_size=16 * 128,
    micro_batch_size=128, steps=800 * (1_281_167 // 128 // 16),
    warmup=40 / 800)                          # paper 40 epochs; the command's --warmup_epochs 10 (DEVIATIONS.md 12)
VISION_L = dict(     # beit/README.md's first ViT-L command: --model beit_large_patch16_224 on 64 GPUs × 64, 800 epochs
    dim=1024, layers=24, heads=16, ffn_dim=4096, image_size=224, patch_size=16, layer_scale=1e-5, dropout=0.0,
    attn_dropout=0.15, drop_path=0.2, top_k=6,                              # --target_layers [18..23]
    target_layer='block', target_norm='layer', target_post_norm='layer', loss_beta=2.0, loss_scale=-1,
    mask_length=16, ema_start=0.9998, ema_end=0.9998, ema_anneal_steps=0,   # --ema_decay 0.9998 --ema_start_at 0
    schedule='cosine', lr=1e-3, min_lr=1e-5, warmup=80 / 800, clip=3.0, batch_size=64 * 64, micro_batch_size=64,
    steps=800 * (1_281_167 // 64 // 64),      # run_cyclical: len(dataset) // batch // world = 312 updates an epoch
    weight_decay=0.05, adam_beta2=0.999, adam_eps=1e-8, no_decay_1d=True)  # run_cyclical defaults: AdamW, β None, 1e-8
TEXT_B = dict(       # paper (BERT masking, τn 100k, tri-stage 5/80/15) over fairseq text/pretraining/base.yaml (DEVIATIONS.md 22)
    dim=768, layers=12, heads=12, ffn_dim=3072, max_tokens=512, vocab_size=50_000, dropout=0.1, attn_dropout=0.1,
    layerdrop=0.0, top_k=10, target_layer='ffn', target_norm='layer', target_post_norm='none', loss_beta=4.0,
    loss_scale=1.0, text_mask='bert', mask_prob=0.15, mask_length=1, ema_start=0.999, ema_end=0.9999,
    ema_anneal_steps=100_000, schedule='tri_stage', lr=2e-4, warmup=0.05, hold=0.8, adam_beta2=0.98, adam_eps=1e-6,
    weight_decay=0.01, clip=5.0, steps=1_000_000, batch_size=16 * 16, block_size=512)   # 16 GPUs × 8192 tokens
LARGE = dict(dim=1024, layers=24, heads=16, ffn_dim=4096)   # the paper's Large (wav2vec 2.0 / RoBERTa-large dims)


@pytest.mark.parametrize('modality, preset, expected', [('speech', 'base', SPEECH_BASE), ('speech', 'large', LARGE),
                                                        ('vision', 'base', VISION_B), ('vision', 'large', VISION_L),
                                                        ('text', 'base', TEXT_B), ('text', 'large', LARGE)])
def test_every_preset_matches_its_source(modality, preset, expected):
    from config import parse_train_args
    mcfg, cfg = parse_train_args(['--modality', modality, '--preset', preset])
    got = {**vars(mcfg), **vars(cfg)}
    assert {k: got[k] for k in expected} == pytest.approx(expected)
    if modality == 'vision':
        assert round(cfg.mask_prob * 196) == 120                           # --num_mask_patches 120 of 14 × 14
    if modality == 'text':
        _, span = parse_train_args(['--modality', 'text', '--text-mask', 'span'])
        assert (span.mask_prob, span.mask_length) == (0.35, 4)              # the released config's masking


def test_collapse_stats_pool_micro_batches_and_ranks_before_the_square_root():
    """fairseq compute_var under DDP sums the count, the sum and the sum of squares over every GPU, then takes the
    square root: the std of each channel over every masked step of the update, averaged over channels. Here one
    update's masked steps are split over 3 micro-batches (or ranks) of unequal masked counts and shifted means; the
    pooled moments give that std, computed here directly on all masked rows with torch.var. Averaging the parts' stds
    instead (what DDP logged before) gives another number."""
    from train import masked_moments, masked_std, pool_moments
    torch.manual_seed(0)
    parts = [(torch.randn(2, 7, 5) * s + m, torch.rand(2, 7) < p) for s, m, p in ((1.0, 0.0, 0.5), (3.0, 2.0, 0.3), (0.5, -1.0, 0.8))]
    rows = torch.cat([x[mask] for x, mask in parts])                  # (M, D): every masked step
    direct = (rows.var(0, unbiased=True) + 1e-6).sqrt().mean()
    moments = [masked_moments(x, mask) for x, mask in parts]
    torch.testing.assert_close(masked_std(pool_moments(moments)), direct)
    for x, mask in parts:                                              # one part: its own std
        torch.testing.assert_close(masked_std(masked_moments(x, mask)), (x[mask].var(0) + 1e-6).sqrt().mean())
    averaged = sum(masked_std(m) for m in moments) / len(moments)
    assert abs(averaged - direct) > 0.1
    empty = masked_moments(torch.randn(2, 7, 5), torch.zeros(2, 7, dtype=torch.bool))   # a part with nothing masked
    torch.testing.assert_close(masked_std(pool_moments(moments + [empty])), direct)


@pytest.mark.parametrize('modality, steps', [('speech', 1500), ('vision', 1200), ('text', 2500)])
def test_small_presets_keep_the_tiny_model_and_train_longer(modality, steps):
    """--preset small (README, 'Ablations at small scale'): the tiny architecture (vision: at MNIST's 28²; speech: a
    1-layer positional conv, DEVIATIONS.md 40), more updates, and τ reaching τe only at the end (speech, text) or
    constant (vision, as tiny), so the teacher moves all run long."""
    from config import parse_train_args
    tiny_m, tiny = parse_train_args(['--modality', modality])
    small_m, small = parse_train_args(['--modality', modality, '--preset', 'small'])
    assert {**vars(small_m), 'image_size': 0, 'pos_conv_depth': 0} == {**vars(tiny_m), 'image_size': 0, 'pos_conv_depth': 0}
    assert (small_m.pos_conv_depth, tiny_m.pos_conv_depth) == ((1, 5) if modality == 'speech' else (5, 5))
    assert small.steps == steps and small.batch_size == tiny.batch_size and small.lr == tiny.lr
    if modality == 'vision':
        assert small_m.image_size == 28 and small.warmup == 0.25 and small.ema_start == small.ema_end == 0.995
    else:
        assert small.ema_anneal_steps == steps and (small.ema_start, small.ema_end) == (0.999, 0.9999)

"""finetune.py: CTC decoding and loss, error rates, layer decay, subsets and splits, and the command line.

    OMP_NUM_THREADS=1 pytest tests/test_finetune.py

Expected values are computed by hand (in the comments) or by brute force in the test, never by the code under test.
"""
import itertools
import json
import math
import os
import runpy
import subprocess
import sys
import types
from contextlib import nullcontext

import numpy as np
import pytest
import soundfile as sf
import torch

import finetune
from config import parse_finetune_args
from conftest import ROOT
from data import DataError
from data.labelled import balanced_subset, load_data
from data.speech import CTC_VOCAB, encode_transcript
from model import ModelConfig

ENV = dict(os.environ, OMP_NUM_THREADS='1')


def ids(s):
    """Letters to CTC ids; '-' is the blank (id 0)."""
    return [0 if c == '-' else CTC_VOCAB.index(c) for c in s]


def finetune_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / 'finetune.py'), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)


def train_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / 'train.py'), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)


def write_clips(root, labels, n=3, seconds=0.5):
    """root/<label>/<k>.wav: n clips per label of a sine (label 0) or noise (the others), 16 kHz."""
    t = np.arange(int(16_000 * seconds)) / 16_000
    for li, label in enumerate(labels):
        (root / label).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            rng = np.random.default_rng([li, k])
            x = 0.3 * np.sin(2 * np.pi * (300 + 50 * k) * t) if li == 0 else 0.1 * rng.standard_normal(len(t))
            sf.write(root / label / f'{k}.wav', x.astype(np.float32), 16_000)
    return root


# ---------------------------------------------------------------------------------------------- CTC decoding
def test_ctc_greedy_decode_collapses_repeats_drops_blanks_and_maps_boundaries():
    """Best path → text: repeats merge, blanks vanish, a blank keeps a double letter, '|' → space, edges stripped."""
    decode = finetune.ctc_greedy_decode
    assert decode(ids('HHHEE')) == 'HE'                                   # repeats collapse
    assert decode(ids('-H--E-')) == 'HE'                                  # blanks dropped
    assert decode(ids('HEL-LO')) == 'HELLO' and decode(ids('HELLO')) == 'HELO'   # a blank keeps the double L
    assert decode(ids('HI|THERE')) == 'HI THERE' and decode(ids('HI|||-THERE')) == 'HI THERE'
    assert decode(ids('||HI|-|')) == 'HI' and decode(ids("DON'T")) == "DON'T"
    assert decode(ids('----')) == '' and decode([]) == ''


def test_evaluation_scores_a_perfect_ctc_model_zero():
    """A model whose best path spells the transcript exactly (a blank between double letters) has WER = CER = 0:
    the reference transcript must not itself go through the CTC collapse (HELLO ALL → HELO AL)."""
    transcript = encode_transcript('hello all')
    path = ids('HEL-LO|AL-L')                                             # what a perfect CTC model emits

    class Perfect(torch.nn.Module):
        def forward(self, source, padding_mask=None):
            return 10 * torch.nn.functional.one_hot(torch.tensor([path]), len(CTC_VOCAB)).float(), None

    batch = dict(source=torch.zeros(1, 16_000), padding_mask=None, labels=torch.tensor(transcript),
                 lengths=torch.tensor([len(transcript)]))
    metrics, examples, n = finetune.evaluate(Perfect(), [(batch, [])], types.SimpleNamespace(task='ctc'), None, 'cpu', nullcontext())
    assert examples == [('HELLO ALL', 'HELLO ALL')]
    assert metrics == dict(wer=0.0, cer=0.0)


# ---------------------------------------------------------------------------------------------- CTC loss
def brute_force_ctc_prob(probs, target):
    """Σ over every frame labelling that collapses (merge repeats, drop blanks) to `target` of Π_t probs[t, label_t]."""
    total = 0.0
    for path in itertools.product(range(probs.shape[1]), repeat=probs.shape[0]):
        collapsed = [c for k, c in enumerate(path) if c != 0 and (k == 0 or c != path[k - 1])]
        if collapsed == list(target):
            total += math.prod(probs[t, c].item() for t, c in enumerate(path))
    return total


def test_ctc_loss_is_minus_log_of_the_summed_alignments_per_sentence():
    """loss_fn('ctc') = −Σ_b log Σ_alignments Π_t p(label_t) / B, over the valid frames only (vocab: blank, A, B)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 3, 3)                                        # (B, T, V)
    targets = [[1, 2], [1, 1], [2]]                                       # AB; AA (only A-blank-A fits in 3 frames); B
    frame_padding = torch.tensor([[False, False, False], [False, False, False], [False, False, True]])
    logits[2, 2] = torch.tensor([50.0, -50.0, 0.0])                       # a padded frame: must not count
    probs = logits.double().softmax(-1)
    expected = -sum(math.log(brute_force_ctc_prob(probs[b, :3 - int(frame_padding[b].sum())], t))
                    for b, t in enumerate(targets)) / 3
    assert brute_force_ctc_prob(probs[1], [1, 1]) == pytest.approx((probs[1, 0, 1] * probs[1, 1, 0] * probs[1, 2, 1]).item())

    def model(source, padding_mask, mask, channel_mask):
        return logits, frame_padding
    labels, lengths = torch.tensor([c for t in targets for c in t]), torch.tensor([len(t) for t in targets])
    batch = dict(source=None, padding_mask=None, labels=labels, lengths=lengths, mask=None, channel_mask=None)
    loss = finetune.loss_fn(model, batch, types.SimpleNamespace(task='ctc'), 0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    one = finetune.loss_fn(lambda **a: (logits[:1], None), dict(source=None, labels=torch.tensor([1, 2]), lengths=torch.tensor([2])),
                           types.SimpleNamespace(task='ctc'), 0.0)            # no frame padding: every frame counts
    assert one.item() == pytest.approx(-math.log(brute_force_ctc_prob(probs[0], [1, 2])), rel=1e-5)


# ---------------------------------------------------------------------------------------------- error rates
def test_edit_distance_and_error_rates():
    """Levenshtein distances of known pairs; WER/CER = total edits / total reference length over the set."""
    ed = finetune.edit_distance
    assert ed('kitten', 'sitting') == 3                                   # k→s, e→i, +g
    assert ed('', 'abc') == ed('abc', '') == 3 and ed('abc', 'abc') == 0
    assert ed('the cat'.split(), 'cat the'.split()) == 2
    wer = finetune.error_rate
    assert wer(['the cat sat'], ['the cat sat down']) == pytest.approx(1 / 3)    # one insertion, 3 reference words
    assert wer(['the cat sat'], ['the bat']) == pytest.approx(2 / 3)             # a substitution and a deletion
    assert wer(['abc d'], ['abd d'], 'char') == pytest.approx(1 / 5)             # c→d; the space is a character
    assert wer(['the cat sat'], ['']) == 1.0 and wer(['the cat sat'], [''], 'char') == 1.0   # all deleted
    # totals: (1 + 0) edits / (2 + 4) words = 1/6, not the mean of the ratios (1/2 + 0) / 2 = 1/4
    assert wer(['a b', 'c d e f'], ['a x', 'c d e f']) == pytest.approx(1 / 6)


# ---------------------------------------------------------------------------------------------- transcripts
def test_encode_transcript_letters_boundaries_and_errors():
    """Upper-cased letters, one '|' per run of spaces, the apostrophe kept; digits or commas fail naming `where`."""
    letters = lambda text: ''.join(CTC_VOCAB[i] for i in encode_transcript(text, 'x'))
    assert letters('hello  world') == 'HELLO|WORLD'
    assert letters("  Don't \t stop ") == "DON'T|STOP"
    assert all(0 < i < len(CTC_VOCAB) for i in encode_transcript('abc xyz', 'x'))   # never the blank
    for bad in ('room 101', 'hello, world'):
        with pytest.raises(DataError, match=r'a/b\.trans\.txt:7') as e:
            encode_transcript(bad, 'a/b.trans.txt:7')
        assert ('1' if '1' in bad else ',') in str(e.value)
    with pytest.raises(DataError, match='empty'):
        encode_transcript('   ', 'c.trans.txt:2')


# ---------------------------------------------------------------------------------------------- pooling
def test_masked_mean_ignores_padding():
    """The mean over the valid prefix; padded steps, however large, do not change it."""
    x = torch.arange(24, dtype=torch.float32).view(2, 4, 3)
    padding = torch.tensor([[False, False, False, False], [False, False, True, True]])
    big = x.masked_fill(padding[..., None], 1e30)
    expected = torch.stack([x[0].sum(0) / 4, (x[1, 0] + x[1, 1]) / 2])   # row 1: the first 2 steps
    torch.testing.assert_close(finetune.masked_mean(big, padding), expected)
    torch.testing.assert_close(finetune.masked_mean(x, padding), expected)
    torch.testing.assert_close(finetune.masked_mean(x, None), torch.stack([x[0].sum(0) / 4, x[1].sum(0) / 4]))


# ---------------------------------------------------------------------------------------------- layer decay
def tiny_vision_finetuner(n_out=5):
    mcfg = ModelConfig(modality='vision', image_size=16, patch_size=4, dim=16, layers=3, heads=2, ffn_dim=32)
    cfg = finetune.FinetuneConfig(modality='vision', drop_path=0.1, layerdrop=0.0)
    return finetune.Finetuner(finetune.build_backbone(mcfg, None, cfg), n_out, 'classify')


def test_layer_decay_groups_follow_beit():
    """Block i (0-based) of L trains at decay^(L − i), the patch embedding and tokens at decay^(L + 1), the rest
    (final norm, relative position bias, fc_norm, head) at 1; no weight decay on 1-D, CLS and the bias table."""
    model, L, decay, wd = tiny_vision_finetuner(), 3, 0.5, 0.05

    def expected_scale(name):
        if name.startswith('backbone.encoder.layers.'):
            return decay ** (L - int(name.split('.')[3]))
        if name.startswith(('backbone.front_end.patch_embed.', 'backbone.front_end.cls_token', 'backbone.front_end.mask_token')):
            return decay ** (L + 1)
        assert name.startswith(('backbone.encoder.norm.', 'backbone.front_end.rel_pos_bias.', 'head.')), name
        return 1.0

    groups = finetune.layer_decay_groups(model, wd, decay, no_decay_1d=True)
    group_of = {}
    for g in groups:
        for p in g['params']:
            assert id(p) not in group_of                                   # each parameter in one group only
            group_of[id(p)] = g
    named = dict(model.named_parameters())
    assert len(group_of) == len(named) and set(group_of) == {id(p) for p in named.values()}
    assert decay ** (L + 1) == 0.0625 and decay ** (L - 0) == 0.125 and decay ** (L - 2) == 0.5   # by hand
    for name, p in named.items():
        g = group_of[id(p)]
        assert g['lr_scale'] == pytest.approx(expected_scale(name)), name
        # BEiT run_class_finetuning.py: no decay where len(shape) == 1, the name ends in .bias, or it is in
        # no_weight_decay() = {'pos_embed', 'cls_token'}; and, here only, the shared bias table (DEVIATIONS.md 37)
        no_decay = len(p.shape) == 1 or name.endswith('.bias') or name.endswith('.cls_token') or name.endswith('rel_pos_bias.table')
        assert g['weight_decay'] == (0.0 if no_decay else wd), name
    assert group_of[id(named['head.proj.weight'])]['weight_decay'] == wd   # 2-D weights decay
    assert group_of[id(named['backbone.encoder.layers.1.fc1.weight'])]['weight_decay'] == wd

    model.backbone.requires_grad_(False)                                   # linear probe: the head only, at scale 1
    probe = finetune.layer_decay_groups(model, wd, decay, no_decay_1d=True)
    head = {id(p) for n, p in named.items() if not n.startswith('backbone.')}
    assert {id(p) for g in probe for p in g['params']} == head and all(g['lr_scale'] == 1 for g in probe)


@pytest.mark.parametrize('modality', ['speech', 'vision', 'text'])
def test_a_frozen_encoder_still_trains_the_head(modality):
    """Linear probe / freeze steps: with `frozen` set and the encoder's requires_grad off, the loss still reaches the head
    (every head parameter gets a gradient) and the encoder gets none."""
    mcfg = ModelConfig(modality=modality, dim=16, layers=2, heads=2, ffn_dim=32, conv_dim=8, pos_conv_depth=1, pos_conv_kernel=3,
                       pos_conv_groups=2, image_size=16, patch_size=4, vocab_size=40, max_tokens=16, pad_id=1)
    cfg = finetune.FinetuneConfig(modality=modality, drop_path=0.0, layerdrop=0.0)
    model = finetune.Finetuner(finetune.build_backbone(mcfg, None, cfg), 3, 'classify')
    model.backbone.requires_grad_(False)
    model.frozen = True
    source = dict(speech=torch.randn(2, 4000), vision=torch.rand(2, 3, 16, 16), text=torch.tensor([[0, 7, 9, 2], [0, 5, 2, 1]]))
    logits, _ = model(source[modality])
    assert logits.shape == (2, 3) and logits.requires_grad
    logits.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is None) == name.startswith('backbone.'), name


def test_text_pool_mean_is_a_linear_probe_on_the_mean_over_the_tokens():
    """--pool mean: the text head is BatchNorm (no affine, batch statistics while training) → Linear on the mean of the
    last block's outputs over the non-padding tokens, computed here from the encoder's own output."""
    mcfg = ModelConfig(modality='text', dim=16, layers=2, heads=2, ffn_dim=32, vocab_size=40, max_tokens=16, pad_id=1)
    cfg = finetune.FinetuneConfig(modality='text', layerdrop=0.0)
    torch.manual_seed(0)
    model = finetune.Finetuner(finetune.build_backbone(mcfg, None, cfg), 3, 'classify', head=finetune.PooledHead).train()
    model.backbone.eval()
    source = torch.tensor([[0, 7, 9, 2], [0, 5, 2, 1], [0, 11, 12, 2]])
    padding = source == 1
    logits, _ = model(source, padding)
    with torch.no_grad():
        x, _ = model.backbone.encode(source, padding, final_norm=False)          # (3, 4, 16)
        pooled = torch.stack([x[b][~padding[b]].mean(0) for b in range(3)])      # (3, 16)
        normed = (pooled - pooled.mean(0)) / torch.sqrt(pooled.var(0, unbiased=False) + 1e-5)
        expected = normed @ model.head.proj.weight.T + model.head.proj.bias
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, torch.nn.Tanh) for m in model.head.modules())   # not RoBERTa's head


def test_pool_is_checked(capsys):
    for argv, words in [(['--modality', 'text', '--pool', 'max'], '--pool max: choose cls or mean'),
                        (['--modality', 'vision', '--pool', 'mean'], '--pool is for --modality text')]:
        with pytest.raises(SystemExit):
            parse_finetune_args(['--init', 'scratch', *argv])
        assert words in capsys.readouterr().err.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------- metrics, subsets
def test_classification_metrics_against_a_hand_made_confusion_matrix():
    """tp 3, tn 2, fp 1, fn 2: accuracy 5/8, F1 = 2·3 / (2·3 + 1 + 2) = 2/3, MCC = (3·2 − 1·2) / √(4·5·3·4) = 4/√240."""
    labels = [1, 1, 1, 0, 0, 0, 1, 1]
    preds = [1, 1, 1, 0, 0, 1, 0, 0]
    m = finetune.classification_metrics(labels, preds, 2)
    assert m['accuracy'] == pytest.approx(5 / 8) and m['f1'] == pytest.approx(2 / 3)
    assert m['mcc'] == pytest.approx(4 / math.sqrt(240))
    assert finetune.classification_metrics(labels, labels, 2)['mcc'] == pytest.approx(1.0)
    assert finetune.classification_metrics(labels, [1 - y for y in labels], 2)['mcc'] == pytest.approx(-1.0)
    three = finetune.classification_metrics([0, 1, 2, 2], [0, 2, 2, 2], 3)
    assert three == dict(accuracy=pytest.approx(3 / 4))                   # F1 and MCC only for two classes


def test_balanced_subset_takes_classes_in_turn_and_is_fixed():
    """Labels 10/10/4: n = 9 gives 3 per class, n = 12 gives 4/4/4; the same positions in every call and any RNG state."""
    labels = [0] * 10 + [1] * 10 + [2] * 4
    for n, per_class in ((9, 3), (12, 4)):
        torch.manual_seed(n)                                               # the global RNG must not matter
        keep = balanced_subset(labels, n)
        assert len(keep) == len(set(keep)) == n and keep == sorted(keep) and all(0 <= k < len(labels) for k in keep)
        assert [sum(labels[k] == c for k in keep) for c in range(3)] == [per_class] * 3
        torch.manual_seed(123)
        assert balanced_subset(labels, n) == keep


# ---------------------------------------------------------------------------------------------- held-out split
def test_held_out_split_is_disjoint_and_independent_of_the_seed(tmp_path):
    """--data without --test-data: train and test are disjoint index sets of one base, covering it, with the right
    labels, and the split is the same for every --seed."""
    folder = write_clips(tmp_path / 'clips', ['no', 'yes'], n=5)
    splits = []
    for seed in (0, 7):
        torch.manual_seed(seed + 100)
        cfg = finetune.parse_finetune_args(['--modality', 'speech', '--task', 'classify', '--init', 'scratch', '--data', str(folder),
                                   '--seed', str(seed)])
        train, test, classes = load_data(cfg, ModelConfig())
        assert classes == ['no', 'yes'] and train.base is test.base
        assert not set(train.indices) & set(test.indices) and sorted(train.indices + test.indices) == list(range(10))
        assert len(test) == 2                                              # round(0.2 · 10)
        for ds in (train, test):                                           # a target is the folder of its own file
            assert [classes[t] for t in ds.targets] == [ds.base.files[i].parent.name for i in ds.indices]
        splits.append((train.indices, test.indices))
    assert splits[0] == splits[1]


def test_held_out_split_never_leaves_an_empty_training_set(tmp_path):
    """One transcribed clip and no --test-data: a clear DataError, not an empty training set (which crashes the
    data loader with a traceback)."""
    (tmp_path / 'one').mkdir()
    sf.write(tmp_path / 'one' / 'u1.wav', np.zeros(8000, np.float32), 16_000)
    (tmp_path / 'one' / 'a.trans.txt').write_text('u1 HELLO\n')
    cfg = finetune.parse_finetune_args(['--modality', 'speech', '--init', 'scratch', '--data', str(tmp_path / 'one')])
    try:
        train, _, _ = load_data(cfg, ModelConfig())
    except DataError:
        return
    assert len(train) > 0


# ---------------------------------------------------------------------------------------------- command line
def check_run(r, out, modality, task, steps, labeled, init='scratch', seed=0):
    """A run that worked: metrics.json with its fields, log.jsonl, finetuned.pt, and the summary as the last stdout line."""
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / 'metrics.json').read_text())
    metric = 'wer' if task == 'ctc' else 'accuracy'
    assert (m['modality'], m['task'], m['metric'], m['init'], m['steps'], m['labeled'], m['seed']) == \
        (modality, task, metric, init, steps, labeled, seed)
    assert m['value'] == m['metrics'][metric] and m['value'] >= 0
    if task == 'ctc':
        assert set(m['metrics']) == {'wer', 'cer'}
    else:                                                                  # a count of correct answers over the test set
        assert 0 <= m['value'] <= 1 and abs(m['value'] * m['test_examples'] - round(m['value'] * m['test_examples'])) < 1e-4
    assert json.loads((out / 'log.jsonl').read_text().splitlines()[-1])['step'] == steps
    assert (out / 'finetuned.pt').stat().st_size > 0
    summary = r.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"{modality} {task} | {metric} {m['value']:.4f} | ")
    assert f'| {labeled} labelled | {steps} steps | seed {seed} |' in summary and summary.endswith(f'{out}/metrics.json')
    return m


def test_speech_ctc_on_the_embedded_set(tmp_path):
    r = finetune_cli('--modality', 'speech', '--init', 'scratch', '--steps', '2', '--batch-size', '2', '--labeled', '4',
                     '--out', str(tmp_path))
    m = check_run(r, tmp_path, 'speech', 'ctc', 2, 4)
    assert m['test_examples'] == 256 and '| init scratch |' in r.stdout


def test_vision_classify_on_the_embedded_set(tmp_path):
    r = finetune_cli('--modality', 'vision', '--init', 'scratch', '--image-size', '16', '--steps', '2', '--batch-size', '4',
                     '--labeled', '16', '--out', str(tmp_path))
    m = check_run(r, tmp_path, 'vision', 'classify', 2, 16)
    assert m['test_examples'] == 512 and set(m['metrics']) == {'accuracy'}   # 8 shapes: no F1/MCC


def test_text_classify_trec_lines_and_glue_pairs(tmp_path):
    """TREC-style 'label sentence' lines with --test-data, and a GLUE TSV of pairs split by --holdout."""
    lines = [f'{lab} what is question number {i} about {lab.lower()} ?' for i in range(6) for lab in ('DESC', 'NUM')]
    (tmp_path / 'train.txt').write_text('\n'.join(lines) + '\n')
    (tmp_path / 'test.txt').write_text('\n'.join(lines[:3]) + '\n')
    r = finetune_cli('--modality', 'text', '--init', 'scratch', '--data', str(tmp_path / 'train.txt'), '--test-data',
                     str(tmp_path / 'test.txt'), '--steps', '2', '--batch-size', '4', '--out', str(tmp_path / 'trec'))
    m = check_run(r, tmp_path / 'trec', 'text', 'classify', 2, 12)
    assert m['test_examples'] == 3 and {'f1', 'mcc'} <= set(m['metrics'])

    rows = ['idx\tsentence1\tsentence2\tlabel'] + [f'{i}\tthe cat sat on mat {i}\tthe cat {"sat" if i % 2 else "ran"} {i}\t{i % 2}'
                                                   for i in range(10)]
    (tmp_path / 'pairs.tsv').write_text('\n'.join(rows) + '\n')
    r = finetune_cli('--modality', 'text', '--init', 'scratch', '--data', str(tmp_path / 'pairs.tsv'), '--steps', '2',
                     '--batch-size', '4', '--out', str(tmp_path / 'pairs'))
    m = check_run(r, tmp_path / 'pairs', 'text', 'classify', 2, 8)          # 10 rows, round(0.2 · 10) held out
    assert m['test_examples'] == 2


@pytest.fixture(scope='module')
def speech_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp('speech_ckpt')
    r = train_cli('--modality', 'speech', '--steps', '1', '--dim', '32', '--layers', '2', '--heads', '2', '--ffn-dim', '64',
                  '--conv-dim', '16', '--top-k', '2', '--batch-size', '2', '--micro-batch-size', '2', '--workers', '0',
                  '--out', str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out / 'checkpoint.pt'


def test_speech_classify_folder_from_the_teacher(tmp_path, speech_checkpoint):
    """<label>/<clip>.wav folders with --test-data, from a checkpoint's EMA teacher (a linear probe, so the encoder
    that comes out is exactly the teacher, and the rest of the backbone the student)."""
    write_clips(tmp_path / 'train', ['no', 'yes'])
    write_clips(tmp_path / 'test', ['no', 'yes'])
    r = finetune_cli('--modality', 'speech', '--task', 'classify', '--init', str(speech_checkpoint), '--use-teacher',
                     '--linear-probe', '--data', str(tmp_path / 'train'), '--test-data', str(tmp_path / 'test'),
                     '--steps', '2', '--batch-size', '2', '--out', str(tmp_path / 'out'))
    m = check_run(r, tmp_path / 'out', 'speech', 'classify', 2, 6, init=f'{speech_checkpoint} (teacher, step 1)')
    assert m['test_examples'] == 6 and '| init pretrained (probe) |' in r.stdout
    ckpt = torch.load(speech_checkpoint, weights_only=True)
    tuned = torch.load(tmp_path / 'out' / 'finetuned.pt', weights_only=True)['model']
    assert any(not torch.equal(ckpt['teacher'][k], ckpt['student'][k]) for k in ckpt['teacher'])
    for k, v in ckpt['teacher'].items():
        assert torch.equal(tuned['backbone.' + k], v), k
    for k, v in ckpt['student'].items():
        if not k.startswith(('encoder.', 'regression_head.')):
            assert torch.equal(tuned['backbone.' + k], v), k


@pytest.fixture(scope='module')
def vision_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp('vision_ckpt')
    r = train_cli('--modality', 'vision', '--steps', '1', '--dim', '32', '--layers', '2', '--heads', '2', '--ffn-dim', '64',
                  '--image-size', '16', '--patch-size', '4', '--top-k', '2', '--batch-size', '4', '--micro-batch-size', '4',
                  '--mask-length', '2', '--workers', '0', '--out', str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out / 'checkpoint.pt'


def tuned_and_student(out, checkpoint):
    tuned = torch.load(out / 'finetuned.pt', weights_only=True)['model']
    student = torch.load(checkpoint, weights_only=True)['student']
    backbone = {k[len('backbone.'):]: v for k, v in tuned.items() if k.startswith('backbone.')}
    assert set(backbone) == {k for k in student if not k.startswith('regression_head.')}
    return tuned, backbone, student


def test_linear_probe_trains_the_head_only(tmp_path, vision_checkpoint):
    """--linear-probe: every encoder tensor is bit-identical to the checkpoint's student; the head moved away from its
    known initialisation (BEiT: head bias 0, fc_norm weight 1)."""
    r = finetune_cli('--modality', 'vision', '--init', str(vision_checkpoint), '--linear-probe', '--steps', '3',
                     '--batch-size', '8', '--out', str(tmp_path))
    check_run(r, tmp_path, 'vision', 'classify', 3, 2048, init=f'{vision_checkpoint} (student, step 1)')
    tuned, backbone, student = tuned_and_student(tmp_path, vision_checkpoint)
    for k, v in backbone.items():
        assert torch.equal(v, student[k]), k
    assert tuned['head.proj.bias'].abs().max() > 0 and not torch.equal(tuned['head.fc_norm.weight'], torch.ones(32))


def test_full_fine_tuning_changes_the_encoder(tmp_path, vision_checkpoint):
    """Without --linear-probe the patch embedding and every block move away from the checkpoint."""
    r = finetune_cli('--modality', 'vision', '--init', str(vision_checkpoint), '--steps', '3', '--batch-size', '8',
                     '--out', str(tmp_path))
    check_run(r, tmp_path, 'vision', 'classify', 3, 2048, init=f'{vision_checkpoint} (student, step 1)')
    _, backbone, student = tuned_and_student(tmp_path, vision_checkpoint)
    changed = {k for k, v in backbone.items() if not torch.equal(v, student[k])}
    assert 'front_end.patch_embed.proj.weight' in changed
    assert {int(k.split('.')[2]) for k in changed if k.startswith('encoder.layers.')} == {0, 1}


# ---------------------------------------------------------------------------------------------- bad input
def assert_one_line_error(status, stderr, *words):
    assert status != 0 and 'Traceback' not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('finetune.py: error: '), stderr[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture
def fails(monkeypatch, capsys):
    """finetune.py's command line on bad input → (exit status, stderr). It runs the script's __main__ block in this
    process (runpy), to spare a torch start-up per case; Python turns sys.exit('message') into that message on
    stderr and status 1, as test_a_malicious_pickle_runs_no_code checks on a real process."""
    def run(*args):
        monkeypatch.setattr(sys, 'argv', ['finetune.py', *args])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / 'finetune.py'), run_name='__main__')
        err = capsys.readouterr().err
        code = e.value.code
        return (1, err + code + '\n') if isinstance(code, str) else (code, err)
    return run


def test_a_malicious_pickle_runs_no_code(tmp_path):
    """An --init whose unpickling would create a file is refused (weights_only) in one line, and no file appears."""
    marker = tmp_path / 'pwned'

    class Payload:
        def __reduce__(self):
            return open, (str(marker), 'w')
    torch.save({'config': Payload(), 'student': {}}, tmp_path / 'evil.pt')
    r = finetune_cli('--modality', 'speech', '--init', str(tmp_path / 'evil.pt'), '--out', str(tmp_path / 'out'))
    assert_one_line_error(r.returncode, r.stderr, 'evil.pt', 'not a train.py checkpoint')
    assert r.returncode == 1 and not marker.exists()
    torch.load(tmp_path / 'evil.pt', weights_only=False)['config'].close()   # the payload is live: an unsafe load runs it
    assert marker.exists()


def test_a_checkpoint_of_another_modality(tmp_path, vision_checkpoint, fails):
    status, err = fails('--modality', 'speech', '--init', str(vision_checkpoint), '--out', str(tmp_path))
    assert_one_line_error(status, err, str(vision_checkpoint), 'a vision checkpoint', '--modality is speech')


def test_a_file_that_is_no_checkpoint(tmp_path, fails):
    (tmp_path / 'random.pt').write_bytes(np.random.default_rng(0).bytes(4096))
    status, err = fails('--modality', 'speech', '--init', str(tmp_path / 'random.pt'), '--out', str(tmp_path))
    assert_one_line_error(status, err, 'random.pt', 'not a train.py checkpoint')


def test_a_transcript_with_a_digit_names_its_file_and_line(tmp_path, fails):
    for name in ('a', 'b'):
        sf.write(tmp_path / f'{name}.wav', np.zeros(8000, np.float32), 16_000)
    (tmp_path / '1-2.trans.txt').write_text('a HELLO WORLD\nb ROOM 101\n')
    status, err = fails('--modality', 'speech', '--init', 'scratch', '--data', str(tmp_path), '--out', str(tmp_path / 'out'))
    assert_one_line_error(status, err, f"{tmp_path / '1-2.trans.txt'}:2", '101')


def test_a_classify_folder_with_one_class(tmp_path, fails):
    write_clips(tmp_path / 'data', ['yes'], n=5)
    status, err = fails('--modality', 'speech', '--task', 'classify', '--init', 'scratch', '--data', str(tmp_path / 'data'),
                        '--out', str(tmp_path / 'out'))
    assert_one_line_error(status, err, '1 class', 'at least 2')


def test_more_labels_asked_for_than_there_are(tmp_path, fails):
    lines = [f'{lab} question {i} about {lab}' for i in range(5) for lab in ('A', 'B')]
    (tmp_path / 'train.txt').write_text('\n'.join(lines) + '\n')
    status, err = fails('--modality', 'text', '--init', 'scratch', '--data', str(tmp_path / 'train.txt'), '--test-data',
                        str(tmp_path / 'train.txt'), '--labeled', '11', '--out', str(tmp_path / 'out'))
    assert_one_line_error(status, err, '--labeled 11', 'only 10')


def test_an_empty_label_file(tmp_path, fails):
    (tmp_path / 'empty.txt').write_text('\n\n')
    status, err = fails('--modality', 'text', '--init', 'scratch', '--data', str(tmp_path / 'empty.txt'), '--out', str(tmp_path / 'out'))
    assert_one_line_error(status, err, 'empty.txt', 'empty')


def test_use_teacher_needs_a_checkpoint(tmp_path, fails):
    status, err = fails('--modality', 'speech', '--init', 'scratch', '--use-teacher', '--out', str(tmp_path))
    assert_one_line_error(status, err, '--use-teacher', 'scratch')


def test_help_lists_the_flags():
    """finetune.py --help prints (help strings go through argparse's % formatting) and lists the recipe knobs."""
    r = finetune_cli('--help')
    assert r.returncode == 0, r.stderr
    assert all(flag in r.stdout for flag in ('--init', '--labeled', '--linear-probe', '--use-teacher', '--layer-decay'))


def test_vision_fine_tuning_crops_come_from_the_recipe(monkeypatch):
    """The training crops' smallest area is the recipe's: base is BEiT fine-tuning's RandomResizedCrop (beit/datasets.py
    build_transform calls timm's create_transform without a scale: timm's default (0.08, 1)), tiny the tiny
    pretraining preset's 0.35;
    --min-crop-scale overrides both, and labelled_collate hands it to the augmentation."""
    import data.vision
    from config import fill_recipe
    for preset, expected in (('base', 0.08), ('tiny', 0.35)):
        cfg = finetune.parse_finetune_args(['--modality', 'vision', '--init', 'scratch'])
        assert fill_recipe(cfg, preset) is None and cfg.min_crop_scale == expected
    cfg = finetune.parse_finetune_args(['--modality', 'vision', '--init', 'scratch', '--min-crop-scale', '0.5'])
    fill_recipe(cfg, 'base')
    seen = []
    monkeypatch.setattr(data.vision, 'augment', lambda image, size, min_scale, g: seen.append(min_scale) or image.float())
    mcfg = ModelConfig(modality='vision', image_size=8)
    batch = data.vision.labelled_collate([(torch.zeros(3, 8, 8, dtype=torch.uint8), 1)] * 2, cfg, mcfg, train=True)
    assert seen == [0.5, 0.5] and batch['source'].shape == (2, 3, 8, 8)


def test_checkpoints_of_the_old_layout_and_incomplete_teachers_fail_in_one_line(tmp_path, fails, speech_checkpoint):
    """A checkpoint written before the front-end layout (student keys feature_encoder.…, not front_end.…), and a
    --use-teacher whose teacher lacks part of what the architecture averages, each stop with one line saying so, not
    with 'the weights do not fit the architecture'."""
    ckpt = torch.load(speech_checkpoint, weights_only=True)
    old = dict(ckpt, student={k.removeprefix('front_end.'): v for k, v in ckpt['student'].items()})
    torch.save(old, tmp_path / 'old.pt')
    status, err = fails('--modality', 'speech', '--init', str(tmp_path / 'old.pt'), '--out', str(tmp_path / 'a'))
    assert_one_line_error(status, err, 'old.pt', 'written before the front-end layout', 'pretrain again')
    partial = dict(ckpt, teacher={k: v for k, v in ckpt['teacher'].items() if '.layers.0.' not in k})
    torch.save(partial, tmp_path / 'partial.pt')
    status, err = fails('--modality', 'speech', '--init', str(tmp_path / 'partial.pt'), '--use-teacher', '--out', str(tmp_path / 'b'))
    assert_one_line_error(status, err, 'partial.pt', 'its teacher holds', 'encoder.layers.0.')


def test_a_flag_given_beats_the_recipe_even_at_its_default_value():
    """Recipe values fill only the flags not given: --no-no-decay-1d keeps every parameter decaying for vision (whose
    recipes exclude 1-D ones), and --lr 0 is an error rather than 'the recipe's lr'."""
    from config import fill_recipe
    cfg = finetune.parse_finetune_args(['--modality', 'vision', '--init', 'scratch', '--no-no-decay-1d'])
    assert fill_recipe(cfg, 'tiny') is None and cfg.no_decay_1d is False and cfg.lr == 1e-3   # the rest from the recipe
    cfg = finetune.parse_finetune_args(['--modality', 'vision', '--init', 'scratch'])
    assert fill_recipe(cfg, 'tiny') is None and cfg.no_decay_1d is True
    assert '--lr 0.0 must be > 0' in fill_recipe(finetune.parse_finetune_args(['--modality', 'vision', '--init', 'scratch',
                                                                              '--lr', '0']), 'tiny')


# ---------------------------------------------------------------------------------------------- probe layers, heads
def test_probe_layers_mix_every_block_output():
    """--probe-layers: 'mean' reads (1/L) Σ_l x_l and 'weighted' Σ_l softmax(w)_l x_l of the blocks' outputs, recomputed
    here block by block from the Transformer's modules; 'weighted' starts at the mean, and its weights train."""
    torch.manual_seed(0)
    mcfg = ModelConfig(modality='speech', dim=16, layers=3, heads=2, ffn_dim=32, conv_dim=8, pos_conv_depth=1, pos_conv_kernel=3,
                       pos_conv_groups=2, layerdrop=0.0)
    cfg = finetune.FinetuneConfig(modality='speech', drop_path=0.0, layerdrop=0.0)
    backbone = finetune.build_backbone(mcfg, None, cfg).eval()
    wav = torch.randn(2, 4000)
    with torch.no_grad():                                                  # the blocks' outputs, by hand
        x, _, _ = backbone.front_end(wav)
        x = backbone.encoder.layer_norm(x)
        outs = []
        for block in backbone.encoder.layers:
            x, _ = block(x)
            outs.append(x)

    class Capture(torch.nn.Module):                                        # a head that keeps what it reads
        def forward(self, h, padding_mask):
            self.h = h
            return h.sum((1, 2)), None

    def read(layers, weights=None):
        model = finetune.Finetuner(backbone, 3, 'classify', layers).eval()
        model.head = Capture()
        if weights is not None:
            with torch.no_grad():
                model.layer_weights.copy_(torch.tensor(weights))
        model(wav)
        return model.head.h
    torch.testing.assert_close(read('last'), outs[-1])
    torch.testing.assert_close(read('mean'), sum(outs) / 3)
    torch.testing.assert_close(read('weighted'), sum(outs) / 3)            # w = 0: softmax is uniform
    w = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    torch.testing.assert_close(read('weighted', [0.0, 1.0, 2.0]), sum(float(wi) * o for wi, o in zip(w, outs)))
    vision = finetune.build_backbone(ModelConfig(modality='vision', dim=16, layers=2, heads=2, ffn_dim=32, image_size=16,
                                                 patch_size=4), None, cfg).eval()
    image = torch.rand(2, 3, 16, 16)
    with torch.no_grad():                                                  # every block's patches, without the CLS token
        _, taps = vision.encoder(*(lambda x: (x, vision.front_end.attention(x)))(vision.front_end(image)[0]), tap='block')
    mixed = finetune.Finetuner(vision, 3, 'classify', 'mean').eval()
    mixed.head = Capture()
    mixed(image)
    torch.testing.assert_close(mixed.head.h, (taps[0][:, 1:] + taps[1][:, 1:]) / 2)
    model = finetune.Finetuner(backbone, 3, 'classify', 'weighted')
    model.frozen = True                                                    # a linear probe still trains the mix
    logits, _ = model(wav)
    logits[:, 0].sum().backward()
    assert model.layer_weights.grad is not None and model.layer_weights.grad.abs().sum() > 0


def test_head_lr_scales_the_head_group_only():
    """--head-lr h with --lr l: the head (and the layer weights) train at h/l, every backbone group as layer decay says."""
    mcfg = ModelConfig(modality='speech', dim=16, layers=2, heads=2, ffn_dim=32, conv_dim=8, pos_conv_depth=1, pos_conv_kernel=3,
                       pos_conv_groups=2)
    cfg = finetune.FinetuneConfig(modality='speech', drop_path=0.0, layerdrop=0.0)
    model = finetune.Finetuner(finetune.build_backbone(mcfg, None, cfg), 3, 'classify', 'weighted')
    groups = finetune.layer_decay_groups(model, 0.0, 0.5, head_scale=20.0)
    scale = {id(p): g['lr_scale'] for g in groups for p in g['params']}
    for name, p in model.named_parameters():
        expected = 20.0 if not name.startswith('backbone.') else (0.5 ** (2 - int(name.split('.')[3])) if '.layers.' in name
                                                                   else 0.5 ** 3 if name.startswith('backbone.front_end.') else 1.0)
        assert scale[id(p)] == pytest.approx(expected), name


def test_speech_recipe_head_lr_and_the_probe_lr():
    """The tiny speech recipe trains the head at 1e-2 and the encoder at 3e-4 (LOG.md: the blank plateau); a linear probe's
    head trains at the probe lr; --head-lr given wins."""
    from config import fill_recipe
    cfg = finetune.parse_finetune_args(['--modality', 'speech', '--init', 'scratch'])
    assert fill_recipe(cfg, 'tiny') is None and (cfg.lr, cfg.head_lr) == (3e-4, 1e-2)
    cfg = finetune.parse_finetune_args(['--modality', 'speech', '--init', 'scratch', '--linear-probe'])
    assert fill_recipe(cfg, 'tiny') is None and cfg.head_lr == cfg.lr == 3e-3
    cfg = finetune.parse_finetune_args(['--modality', 'speech', '--init', 'scratch', '--head-lr', '5e-3'])
    assert fill_recipe(cfg, 'tiny') is None and cfg.head_lr == 5e-3


def test_scratch_takes_the_architecture_of_a_run(tmp_path, fails):
    """--init scratch --arch config.json: the run's architecture, random weights; a config of another modality fails."""
    (tmp_path / 'config.json').write_text(json.dumps(dict(model=dict(modality='speech', dim=48, layers=3, heads=4, ffn_dim=96,
                                                                     conv_dim=16), train=dict(preset='small'))))
    cfg = finetune.parse_finetune_args(['--modality', 'speech', '--init', 'scratch', '--arch', str(tmp_path / 'config.json')])
    mcfg, ckpt, recipe = finetune.load_encoder(cfg)
    assert (mcfg.dim, mcfg.layers, mcfg.heads, mcfg.ffn_dim, mcfg.conv_dim, ckpt, recipe) == (48, 3, 4, 96, 16, None, 'tiny')
    status, err = fails('--modality', 'vision', '--init', 'scratch', '--arch', str(tmp_path / 'config.json'), '--out', str(tmp_path))
    assert_one_line_error(status, err, 'a speech architecture', '--modality is vision')

"""Corrupt, truncated and undecodable data files: a run skips them, logs them and goes on, or stops in one line (--strict-data).

    OMP_NUM_THREADS=1 pytest tests/test_bad_data.py

Every test writes its own small data set into a temporary folder and injects one kind of fault; expected counts and
offsets are computed here from what was written, never taken from the code under test.
"""
import json
import os
import runpy
import struct
import subprocess
import sys
import types

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from conftest import ROOT, SHARED_DATA
from data import DataError, MicroBatches

ENV = dict(os.environ, OMP_NUM_THREADS='1')
SPEECH_SMALL = ['--dim', '32', '--layers', '2', '--heads', '2', '--ffn-dim', '64', '--conv-dim', '16', '--top-k', '2',
                '--crop', '16000']
VISION_SMALL = ['--modality', 'vision', '--dim', '32', '--layers', '2', '--heads', '2', '--ffn-dim', '64', '--top-k', '2']
TEXT_SMALL = ['--modality', 'text', '--dim', '32', '--layers', '2', '--heads', '2', '--ffn-dim', '64', '--top-k', '2',
              '--batch-size', '4', '--micro-batch-size', '2', '--workers', '0', '--vocab-size', '5000', '--block-size', '32']
LJ = 'speech/ljspeech_librispeech_layout'


def cli(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)


@pytest.fixture
def in_process(monkeypatch, capsys):
    """A script's __main__ block run in this process (runpy), for errors found at start-up, before any training: it
    spares a torch start-up. Python turns sys.exit('message') into that line on stderr and status 1 (the speech and
    finetune tests check that on real processes). → an object with returncode and stderr, like subprocess.run's."""
    def run(script, *args):
        monkeypatch.setattr(sys, 'argv', [script, *args])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / script), run_name='__main__')
        err, code = capsys.readouterr().err, e.value.code
        return types.SimpleNamespace(returncode=1, stderr=err + code + '\n') if isinstance(code, str) else \
            types.SimpleNamespace(returncode=code, stderr=err)
    return run


def log_records(out):
    return [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]


def bad_sample_events(records):
    return [r for r in records if r.get('event') == 'bad sample']


def named(events, path):
    """The events whose error is about `path` (the message starts with the file's path)."""
    return [e for e in events if e['error'].startswith(f'{path}: ')]


def assert_one_line_error(r, script, *words):
    """Exit status 1, no traceback, and one stderr line `<script>: error: ...` (the last; a progress bar may precede it)."""
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if f'{script}: error:' in line]
    assert len(errors) == 1 and errors[0].startswith(f'{script}: error: '), r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == errors[0]
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def write_wav(path, seconds=1.0, seed=0):
    """A 16 kHz mono clip: a tone plus a little noise, so it is neither silent nor constant."""
    t = np.arange(int(16_000 * seconds)) / 16_000
    x = 0.3 * np.sin(2 * np.pi * (200 + 40 * seed) * t) + 0.02 * np.random.default_rng(seed).standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), 16_000)
    return path


def truncate_wav(path, keep=0.5):
    """Keep the header (whose data chunk still declares every sample) and the first `keep` of the samples."""
    data = path.read_bytes()
    data_bytes = sf.info(str(path)).frames * 2                            # PCM_16 mono: 2 bytes a frame
    path.write_bytes(data[:len(data) - data_bytes + 2 * round(keep * data_bytes / 2)])
    return path


def declared_wav_bytes(path):
    """(bytes the data chunk of a RIFF/WAVE file declares, bytes it holds), read here with struct."""
    data = path.read_bytes()
    at = data.index(b'data', 12)
    return struct.unpack('<I', data[at + 4:at + 8])[0], len(data) - at - 8


def write_png(path, seed=0, size=32):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------------------- what fails when
def test_a_real_flac_cut_in_its_frames_raises_when_read(shared_data, tmp_path):
    """Real LJSpeech FLAC files cut at 25%, 50% and 90% of their bytes: the header survives (sf.info gives the
    original frame count, so start-up keeps the file), and data.speech.read_audio raises DataError naming the file
    (libsndfile loses sync in the cut frame). This is what the speech training test below relies on."""
    from data.speech import read_audio
    flacs = sorted((shared_data / LJ).rglob('*.flac'))[:4]
    assert flacs, f'no .flac under {shared_data / LJ}'
    for src in flacs:
        data, frames = src.read_bytes(), sf.info(str(src)).frames
        for frac in (0.25, 0.5, 0.9):
            cut = tmp_path / f'{src.stem}-{int(frac * 100)}.flac'
            cut.write_bytes(data[:int(len(data) * frac)])
            assert sf.info(str(cut)).frames == frames                    # the header still declares every sample
            with pytest.raises(DataError) as e:
                read_audio(cut)
            assert str(e.value).startswith(f'{cut}: cannot read audio'), str(e.value)


def test_truncated_wav_and_cut_png_raise_data_error(tmp_path):
    """The mid-run detectors on their own: a .wav whose data chunk holds half the samples its header declares (libsndfile
    reads it without complaint), and a 32×32 PNG cut to its first 600 bytes (Pillow opens it, the pixels are gone)."""
    from data.speech import read_audio
    from data.vision import _read_image
    wav = truncate_wav(write_wav(tmp_path / 'cut.wav'))
    assert declared_wav_bytes(wav) == (32_000, 16_000)                   # 16000 samples declared, 8000 present
    assert len(sf.read(str(wav))[0]) == 8_000                            # libsndfile reads the rest without complaint
    with pytest.raises(DataError, match='truncated') as e:
        read_audio(wav)
    assert str(e.value).startswith(f'{wav}: ')
    png = write_png(tmp_path / 'cut.png')
    png.write_bytes(png.read_bytes()[:600])
    with Image.open(png) as im:
        assert im.size == (32, 32)                                       # the header survives
    with pytest.raises(DataError) as e:
        _read_image(png)
    assert str(e.value).startswith(f'{png}: cannot decode image'), str(e.value)


@pytest.mark.parametrize('modality', ['speech', 'vision', 'text'])
def test_start_up_skips_are_listed_and_an_all_unreadable_folder_is_an_error(tmp_path, modality):
    """One unreadable file among good ones (a .wav of junk bytes, a zero-byte PNG, a .txt with an invalid UTF-8 byte):
    non-strict start-up leaves it out and lists its error, naming the file; strict start-up raises that error. A folder
    in which every file is unreadable is a DataError either way."""
    from data.speech import AudioFolder
    from data.text import read_corpus
    from data.vision import ImageFolder
    good, bad = tmp_path / 'good', tmp_path / 'bad'
    if modality == 'speech':
        for i in range(3):
            write_wav(good / f'{i}.wav', seed=i)
        broken = good / '1x.wav'
        broken.write_bytes(b'RIFF\x24\x00\x00\x00WAVEjunk')
        for i in range(2):
            (bad / f'{i}.wav').parent.mkdir(parents=True, exist_ok=True)
            (bad / f'{i}.wav').write_bytes(b'RIFF\x24\x00\x00\x00WAVEjunk')

        def load(root, strict):
            ds = AudioFolder(root, strict=strict)
            return [str(p) for p in ds.files], ds.unreadable
        n_good = 3
    elif modality == 'vision':
        for i in range(3):
            write_png(good / 'c' / f'{i}.png', seed=i)
        broken = good / 'c' / '1x.png'
        broken.write_bytes(b'')
        for i in range(2):
            (bad / 'c').mkdir(parents=True, exist_ok=True)
            (bad / 'c' / f'{i}.png').write_bytes(b'')

        def load(root, strict):
            ds = ImageFolder(root, strict=strict)
            return [str(p) for p, _ in ds.samples], ds.unreadable
        n_good = 3
    else:
        good.mkdir()
        for i in range(3):
            (good / f'{i}.txt').write_text(f'Paragraph one of file {i}.\n\nParagraph two of file {i}.\n', encoding='utf-8')
        broken = good / '1x.txt'
        broken.write_bytes(b'Fine so far.\n\nthen \xff\xfe junk\n')
        bad.mkdir()
        for i in range(2):
            (bad / f'{i}.txt').write_bytes(b'\xff\xfe\xfd')

        def load(root, strict):
            unreadable = None if strict else []
            return read_corpus(root, 'utf-8', unreadable), unreadable
        n_good = 3 * 2                                                   # documents: two paragraphs a file
    items, unreadable = load(good, strict=False)
    assert len(items) == n_good and str(broken) not in items
    assert len(unreadable) == 1 and unreadable[0].startswith(f'{broken}: '), unreadable
    with pytest.raises(DataError) as e:
        load(good, strict=True)
    assert str(e.value).startswith(f'{broken}: ')
    for strict in (False, True):
        with pytest.raises(DataError):
            load(bad, strict=strict)


# ---------------------------------------------------------------------------------------------- MicroBatches
class Numbers(torch.utils.data.Dataset):
    """Item i → float tensor [i]; indices in `bad` raise DataError('item<i>: unreadable'), as a corrupt file would."""

    def __init__(self, n, bad=()):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise DataError(f'item{i}: unreadable')
        return torch.tensor([float(i)])


def stack_and_draw(items, generator=None):
    """A collate that also draws from the generator, as crops and masks do: (values (B,), draws (B,))."""
    return torch.cat(items), torch.rand(len(items), generator=generator)


def test_micro_batches_replace_leave_out_or_stop_at_unreadable_items():
    """Index 2 of micro-batch [0, 1, 2, 3] raises DataError: with fill (training) the batch keeps its 4 rows, the bad one
    a repeat of a readable item of the same micro-batch, and the error comes back; fill=False (evaluation) returns the
    3 readable items only; strict=True re-raises the first error ([0, 2, 5]: item2's, not item5's). A micro-batch
    whose every item is bad raises DataError naming one of them; with fill=False it comes back as (None, errors)."""
    ds = Numbers(10, bad={2, 5, 6, 7})
    groups = [[0, 1, 2, 3], [5, 6, 7], [0, 2, 5], [8, 9]]
    (values, draws), errors = MicroBatches(ds, groups, stack_and_draw)[0]
    assert values.shape == draws.shape == (4,) and errors == ['item2: unreadable']
    readable = [0.0, 1.0, 3.0]
    assert set(values.tolist()) == set(readable)                         # each readable item at least once, nothing else
    assert len(values.tolist()) - len(set(values.tolist())) == 1         # exactly one repeat stands in for item 2
    (values, draws), errors = MicroBatches(ds, groups, stack_and_draw, fill=False)[0]
    assert values.tolist() == readable and draws.shape == (3,) and errors == ['item2: unreadable']
    (values, _), errors = MicroBatches(ds, groups, stack_and_draw)[3]
    assert values.tolist() == [8.0, 9.0] and errors == []                # a clean micro-batch is untouched
    with pytest.raises(DataError) as e:                                  # nothing to repeat: training cannot go on
        MicroBatches(ds, groups, stack_and_draw)[1]
    assert any(f'item{i}: unreadable' in str(e.value) for i in (5, 6, 7)), str(e.value)
    assert MicroBatches(ds, groups, stack_and_draw, fill=False)[1] == (None, [f'item{i}: unreadable' for i in (5, 6, 7)])
    with pytest.raises(DataError) as e:
        MicroBatches(ds, groups, stack_and_draw, strict=True)[2]
    assert str(e.value) == 'item2: unreadable'
    with pytest.raises(DataError):
        MicroBatches(ds, groups, stack_and_draw, strict=True)[0]


def test_micro_batch_draws_depend_only_on_seed_epoch_and_number():
    """Two MicroBatches objects with the same (seed, epoch) give bit-identical batches item by item (the draws too);
    changing either, or the item, changes the draws; and `numbers` carry them: item 0 of MicroBatches(groups[k:],
    numbers=[k, …]) is item k of MicroBatches(groups), so a resumed run, or a rank dealt micro-batches 1 and 3,
    draws what one process would have for them."""
    ds = Numbers(12, bad={4})
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    key = dict(seed=3, epoch=2)
    a, b = MicroBatches(ds, groups, stack_and_draw, **key), MicroBatches(ds, groups, stack_and_draw, **key)
    for j in range(len(groups)):
        (va, da), ea = a[j]
        (vb, db), eb = b[j]
        assert torch.equal(va, vb) and torch.equal(da, db) and ea == eb
    draws = [a[j][0][1] for j in range(len(groups))]
    assert all(not torch.equal(draws[0], d) for d in draws[1:])          # every item its own stream
    for other in (dict(key, seed=4), dict(key, epoch=3)):
        assert not torch.equal(MicroBatches(ds, groups, stack_and_draw, **other)[0][0][1], draws[0]), other
    for k in (1, 2, 3):
        shifted = MicroBatches(ds, groups[k:], stack_and_draw, numbers=list(range(k, 4)), **key)
        assert len(shifted) == len(groups) - k
        (v, d), e = shifted[0]
        (v0, d0), e0 = a[k]
        assert torch.equal(v, v0) and torch.equal(d, d0) and e == e0
        assert not torch.equal(MicroBatches(ds, groups[k:], stack_and_draw, **key)[0][0][1], d0)   # numbered 0: item 0's draws
    share = MicroBatches(ds, groups[1::2], stack_and_draw, numbers=[1, 3], **key)
    assert all(torch.equal(share[i][0][1], a[j][0][1]) for i, j in ((0, 1), (1, 3)))


# ---------------------------------------------------------------------------------------------- train.py
def test_speech_pretraining_skips_a_truncated_wav_and_flac_in_a_loader_worker(tmp_path):
    """A folder of 1 s .wav clips plus a .wav whose data chunk was cut in half (its header intact) and a .flac cut at
    half its bytes (a real LJSpeech one where ../shared/data is present, else one written here). The folder holds 8 files and a micro-batch
    4 (--workers 1: the reads fail inside a loader worker), so 2 steps read every file exactly once. The run finishes;
    log.jsonl has one `bad sample` event per bad file and none for a good one; the last metric line's bad_samples is
    that count; checkpoint.pt is written. With --strict-data the same folder stops in one line naming a bad file."""
    data = tmp_path / 'data'
    flacs = sorted((SHARED_DATA / LJ).rglob('*.flac'))[:1] if (SHARED_DATA / LJ).is_dir() else []
    bad = [truncate_wav(write_wav(data / 'cut.wav', seed=99)), data / 'cut.flac']
    if not flacs:                                           # no real one here: a 1 s FLAC of noise, written by libsndfile
        flacs = [tmp_path / 'whole.flac']
        sf.write(flacs[0], (0.1 * np.random.default_rng(7).standard_normal(16_000)).astype(np.float32), 16_000)
    bad[1].write_bytes(flacs[0].read_bytes()[:len(flacs[0].read_bytes()) // 2])
    good = [write_wav(data / f'{i}.wav', seed=i) for i in range(8 - len(bad))]
    out = tmp_path / 'out'
    r = cli('train.py', '--data', str(data), '--out', str(out), '--steps', '2', '--log-every', '1', '--batch-size', '4',
            '--micro-batch-size', '4', '--workers', '1', *SPEECH_SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'unreadable files' not in r.stdout                            # every header reads: nothing skipped at start-up
    records = log_records(out)
    events = bad_sample_events(records)
    for path in bad:
        assert len(named(events, path)) == 1, (path, events)
    assert len(events) == len(bad) and not any(named(events, p) for p in good)
    assert named(events, bad[0])[0]['error'] == f'{bad[0]}: truncated (fewer samples than its header declares)'
    metrics = [r for r in records if 'event' not in r]
    assert [m['step'] for m in metrics] == [1, 2] and metrics[-1]['bad_samples'] == len(events)
    assert (out / 'checkpoint.pt').stat().st_size > 0

    r = cli('train.py', '--data', str(data), '--out', str(tmp_path / 'strict'), '--steps', '2', '--batch-size', '4',
            '--micro-batch-size', '4', '--workers', '0', '--strict-data', *SPEECH_SMALL)
    line = assert_one_line_error(r, 'train.py')
    assert any(line.startswith(f'train.py: error: {p}: ') for p in bad), line


def test_vision_pretraining_skips_an_empty_png_at_start_up_and_a_cut_png_mid_run(tmp_path, in_process):
    """An ImageFolder tree of 32×32 PNGs, two classes, with a zero-byte PNG (its header cannot be read: left out at
    start-up) and a PNG cut to 600 bytes (header intact, pixels gone: found when decoded). 8 readable headers and a
    micro-batch of 4, so 2 steps decode every image once. The run finishes; stdout has the start-up line once, naming
    the empty file; log.jsonl has one event for each of the two files; bad_samples counts both. --strict-data stops at
    start-up in one line naming the empty file."""
    data = tmp_path / 'data'
    good = [write_png(data / c / f'{i}.png', seed=10 * k + i) for k, c in enumerate(('cat', 'dog')) for i in range(4)]
    empty, cut = data / 'cat' / '9.png', good.pop()
    empty.write_bytes(b'')
    cut.write_bytes(cut.read_bytes()[:600])
    out = tmp_path / 'out'
    r = cli('train.py', '--data', str(data), '--out', str(out), '--steps', '2', '--log-every', '1', '--batch-size', '4',
            '--micro-batch-size', '4', '--workers', '0', *VISION_SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    startup = [line for line in r.stdout.splitlines() if 'unreadable files' in line]
    assert len(startup) == 1 and startup[0].startswith('skipped 1 unreadable files (--strict-data stops instead), e.g. ')
    assert f'{empty}: ' in startup[0] and '7 vision samples' not in r.stdout and '8 vision samples' in r.stdout
    records = log_records(out)
    events = bad_sample_events(records)
    assert len(named(events, empty)) == 1 and named(events, empty)[0]['step'] == 1      # start-up: the first interval
    assert len(named(events, cut)) == 1 and 'cannot decode image' in named(events, cut)[0]['error']
    assert len(events) == 2 and not any(named(events, p) for p in good)
    metrics = [r for r in records if 'event' not in r]
    assert metrics[-1]['step'] == 2 and metrics[-1]['bad_samples'] == len(events)
    assert (out / 'checkpoint.pt').stat().st_size > 0

    r = in_process('train.py', '--data', str(data), '--out', str(tmp_path / 'strict'), '--steps', '2', '--batch-size', '4',
                   '--micro-batch-size', '4', '--workers', '0', '--strict-data', *VISION_SMALL)
    assert_one_line_error(r, 'train.py', f'train.py: error: {empty}: ', 'empty')


ENGLISH = ['The river ran past the old mill and under the stone bridge, where children often stood to watch the water.',
           'In the spring the meadows were full of flowers, and the farmers went out early to look after their sheep.',
           'She wrote a long letter to her brother, telling him about the new house and the garden behind it.',
           'The train was late again, so the passengers waited on the platform and talked about the weather.',
           'Every evening the lights of the town came on one by one, and the streets slowly grew quiet.',
           'He bought bread, cheese and apples at the market, then walked home along the narrow road by the church.']


def test_text_pretraining_skips_a_file_that_is_not_utf8(tmp_path, in_process):
    """A folder of .txt files of plain English paragraphs and one file with a byte that is not UTF-8 (0xff, after a
    paragraph holding a two-byte character, so the byte offset differs from the character offset). The run finishes;
    stdout names the file once; log.jsonl has its one event (start-up skips are logged in the first interval) and
    bad_samples is 1. --strict-data stops in one line naming the file and the offset of the bad byte."""
    data = tmp_path / 'data'
    data.mkdir()
    for k in range(3):
        paragraphs = [' '.join(ENGLISH[(k + i + j) % len(ENGLISH)] for j in range(3)) for i in range(4)]
        (data / f'{k}.txt').write_text('\n\n'.join(paragraphs) + '\n', encoding='utf-8')
    prefix = ('A café by the harbour.\n\n' + ENGLISH[0] + '\n\nAnd then ').encode('utf-8')
    bad = data / 'latin.txt'
    bad.write_bytes(prefix + b'\xff' + ' more words.\n'.encode('utf-8'))
    offset = len(prefix)                                                 # the first byte that does not decode
    assert offset != len(prefix.decode('utf-8'))
    out = tmp_path / 'out'
    r = cli('train.py', '--data', str(data), '--out', str(out), '--steps', '2', '--log-every', '1', *TEXT_SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    startup = [line for line in r.stdout.splitlines() if 'unreadable files' in line]
    assert len(startup) == 1 and startup[0].startswith('skipped 1 unreadable files') and f'{bad}: ' in startup[0]
    records = log_records(out)
    events = bad_sample_events(records)
    assert len(events) == 1 and named(events, bad) and events[0]['step'] == 1 and f'byte {offset}' in events[0]['error']
    metrics = [r for r in records if 'event' not in r]
    assert metrics[-1]['step'] == 2 and metrics[-1]['bad_samples'] == 1
    assert (out / 'checkpoint.pt').stat().st_size > 0

    r = in_process('train.py', '--data', str(data), '--out', str(tmp_path / 'strict'), '--steps', '2', '--strict-data', *TEXT_SMALL)
    assert_one_line_error(r, 'train.py', f'train.py: error: {bad}: ', f'byte {offset}', '0xff')


# ---------------------------------------------------------------------------------------------- finetune.py
def write_clips(root, labels, n=3, seconds=0.5):
    """root/<label>/<k>.wav: n clips per label (as tests/test_finetune.py), 16 kHz; returns the paths."""
    return [write_wav(root / label / f'{k}.wav', seconds, seed=10 * li + k) for li, label in enumerate(labels) for k in range(n)]


def test_finetune_speech_classify_skips_truncated_clips_in_training_and_held_out(tmp_path):
    """--task classify on <label>/<clip>.wav folders (--workers 1) with one truncated .wav in --data and one in
    --test-data. 6 training clips, batch 2: 3 steps read each once. The run finishes; log.jsonl has exactly one bad-sample
    event, naming the training clip; metrics.json counts it (bad_samples 1), evaluates the readable held-out clips only
    (test_examples = 6 - 1) and reports the other (test_unreadable 1). --strict-data stops in one line naming the
    training clip (training comes before the evaluation)."""
    train, test = write_clips(tmp_path / 'train', ['no', 'yes']), write_clips(tmp_path / 'test', ['no', 'yes'])
    bad_train, bad_test = truncate_wav(train[4]), truncate_wav(test[2])
    readable_test = len(test) - 1
    out = tmp_path / 'out'
    args = ['--modality', 'speech', '--task', 'classify', '--init', 'scratch', '--data', str(tmp_path / 'train'),
            '--test-data', str(tmp_path / 'test'), '--steps', '3', '--batch-size', '2']
    r = cli('finetune.py', *args, '--log-every', '1', '--workers', '1', '--out', str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    events = bad_sample_events(log_records(out))
    assert len(events) == 1 and named(events, bad_train) and 'truncated' in events[0]['error'], events
    m = json.loads((out / 'metrics.json').read_text())
    assert m['bad_samples'] == 1 and m['labeled'] == len(train)
    assert m['test_examples'] == readable_test and m['test_unreadable'] == len(test) - readable_test
    assert abs(m['value'] * readable_test - round(m['value'] * readable_test)) < 1e-4   # accuracy over 5, not 6
    assert f'{bad_test}: ' in r.stdout + r.stderr                         # the left-out held-out clip is reported

    r = cli('finetune.py', *args, '--strict-data', '--out', str(tmp_path / 'strict'))
    assert_one_line_error(r, 'finetune.py', f'finetune.py: error: {bad_train}: ', 'truncated')
    assert not (tmp_path / 'strict' / 'metrics.json').exists()


def test_finetune_leaves_out_a_held_out_chunk_that_is_all_unreadable(tmp_path):
    """65 held-out clips, the last (in sorted order, so alone in the second chunk of 64 that finetune.py evaluates)
    truncated to 90% of its samples (0.27 s: still above the 0.25 s floor). Without --strict-data an unreadable
    held-out example is to be left out of the metrics: the run must finish with test_examples 64 and test_unreadable 1."""
    write_clips(tmp_path / 'train', ['no', 'yes'])
    test = sorted(write_clips(tmp_path / 'test', ['no', 'yes'], n=33, seconds=0.3))[:65]
    for extra in sorted(set((tmp_path / 'test').rglob('*.wav')) - set(test)):
        extra.unlink()
    truncate_wav(test[-1], keep=0.9)
    out = tmp_path / 'out'
    r = cli('finetune.py', '--modality', 'speech', '--task', 'classify', '--init', 'scratch', '--data', str(tmp_path / 'train'),
            '--test-data', str(tmp_path / 'test'), '--steps', '1', '--batch-size', '2', '--out', str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / 'metrics.json').read_text())
    assert m['test_examples'] == len(test) - 1 and m['test_unreadable'] == 1

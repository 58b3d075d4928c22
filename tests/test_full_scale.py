"""Full-scale data paths, checked on small data (README, "Full scale"): a text corpus prepared once and read in place,
and the manifest that spares start-up from reading every audio or image header again.

    OMP_NUM_THREADS=1 pytest tests/test_full_scale.py

The expected blocks, lengths and sizes come from the in-memory path and from soundfile and Pillow called in the test.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from tokenizers import Tokenizer, models

from config import parse_train_args
from conftest import ROOT
from data import DataError, batches
from data.manifest import FileList, list_files, manifest_path
from data.speech import AudioFolder
from data.text import (HEADER, TOKENS, SyntheticText, TokenFile, load_tokenizer_file, pack_blocks, prepare_corpus,
                       pretraining_data, read_corpus, train_tokenizer)
from data.vision import ImageFolder
from test_resume import KILL_AT_UPDATE, cli, lines, same_tensors

ENV = dict(os.environ, OMP_NUM_THREADS='1')
TINY = ['--modality', 'text', '--dim', '32', '--layers', '2', '--heads', '2', '--ffn-dim', '64', '--top-k', '2',
        '--batch-size', '4', '--micro-batch-size', '2', '--workers', '0', '--block-size', '32']


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    """A folder of 3 .txt files (documents: blank-line-separated paragraphs) and its prepared corpus (a BPE of 600)."""
    src = tmp_path_factory.mktemp('text')
    docs = SyntheticText(size=1200, seed=3).documents()
    for k in range(3):
        (src / f'part{k}.txt').write_text('\n\n'.join(docs[k::3]) + '\n')
    prepare_corpus(src, src.parent / 'prepared', vocab_size=600)
    return src, src.parent / 'prepared'


# ---------------------------------------------------------------------------------------------- text: prepared corpus
def test_prepared_blocks_are_exactly_the_in_memory_blocks(corpus):
    """tokens.bin holds pack_blocks' stream: block for block, TokenFile equals the in-memory path at two block sizes,
    the BPE trained on the stream equals the BPE trained on the list, and the header counts what the file holds."""
    src, prepared = corpus
    docs, tok = read_corpus(src), load_tokenizer_file(prepared / 'tokenizer.json')
    assert tok.to_str() == train_tokenizer(docs, 600).to_str()
    header = json.loads((prepared / HEADER).read_text())
    assert header['dtype'] == 'uint16' and header['documents'] == len(docs) and header['files'] == 3
    stream = np.fromfile(prepared / TOKENS, np.uint16)
    assert len(stream) == header['tokens'] == sum(len(tok.encode(d, add_special_tokens=False).ids) for d in docs) + len(docs) - 1
    for block_size in (32, 100):
        expected = pack_blocks(docs, tok, block_size)
        got = TokenFile(prepared, block_size, tok)
        assert len(got) == len(expected) > 10
        assert all(torch.equal(got[i][0], expected[i]) for i in range(len(got)))


def test_prepare_writes_int32_past_65535_tokens(tmp_path, corpus):
    """A vocabulary of 70,000 does not fit uint16: the ids are stored as int32, and still read back exactly."""
    src, _ = corpus
    small = load_tokenizer_file(corpus[1] / 'tokenizer.json')
    vocab = dict(small.get_vocab())
    vocab.update({f'extra{i}': len(vocab) + i for i in range(70_000 - len(vocab))})
    merges = json.loads(small.to_str())['model']['merges']
    big = Tokenizer(models.BPE(vocab, [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in merges]))
    big.save(str(tmp_path / 'big.json'))
    header = prepare_corpus(src, tmp_path / 'out', tokenizer_path=tmp_path / 'big.json')
    assert header['dtype'] == 'int32' and header['vocab_size'] == 70_000
    tok = load_tokenizer_file(tmp_path / 'out' / 'tokenizer.json')
    expected = pack_blocks(read_corpus(src), tok, 32)
    got = TokenFile(tmp_path / 'out', 32, tok)
    assert all(torch.equal(got[i][0], expected[i]) for i in range(0, len(got), 7))


def test_an_item_maps_only_its_own_block(corpus, monkeypatch):
    """Reading a block maps its T − 2 tokens and nothing else: over one rank's micro-batches (rank 1 of 2), the tokens
    mapped are exactly those of the blocks that rank draws, so memory does not grow with the corpus."""
    src, prepared = corpus
    mcfg, cfg = parse_train_args(TINY + ['--data', str(prepared)])
    dataset, collate = pretraining_data(mcfg, cfg)
    mapped, real = [], np.memmap

    def spy(path, dtype, mode, offset, shape):
        mapped.append((offset // np.dtype(dtype).itemsize, shape[0]))
        return real(path, dtype, mode, offset=offset, shape=shape)
    monkeypatch.setattr(np, 'memmap', spy)
    stream = batches(dataset, collate, 2, seed=0, rank=1, world=2)
    originals = [next(stream)[0]['original'] for _ in range(5)]               # (2, T) each
    assert len(mapped) == 10 and all(n == 30 for _, n in mapped)
    packed = pack_blocks(read_corpus(src), load_tokenizer_file(prepared / 'tokenizer.json'), 32)
    expected = torch.stack([packed[start // 30] for start, _ in mapped])
    assert torch.equal(torch.cat(originals), expected)


def test_train_on_a_prepared_corpus_logs_the_in_memory_losses_and_resumes_exactly(tmp_path, corpus):
    """train.py --data CORPUS against train.py --data SRC --tokenizer CORPUS/tokenizer.json: the same blocks in the same
    order, so the same losses, bit for bit. Then a SIGKILL at update 4 of 6 and --resume: the uninterrupted run's
    losses, weights and optimizer state."""
    src, prepared = corpus
    args = ['--steps', '6', '--ckpt-every', '2', '--log-every', '2', *TINY]
    r = cli('train.py', *args, '--data', str(prepared), '--out', str(tmp_path / 'memmap'))
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'prepared tokens, read in place' in r.stdout
    r = cli('train.py', *args, '--data', str(src), '--tokenizer', str(prepared / 'tokenizer.json'), '--out', str(tmp_path / 'ram'))
    assert r.returncode == 0, r.stderr[-2000:]
    memmap, ram = lines(tmp_path / 'memmap'), lines(tmp_path / 'ram')
    assert [r['loss'] for r in memmap] == [r['loss'] for r in ram] and len(memmap) == 3
    killed = subprocess.run([sys.executable, '-c', KILL_AT_UPDATE.format(root=str(ROOT)), '4', *args, '--data', str(prepared),
                             '--out', str(tmp_path / 'cut')], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    r = cli('train.py', *args, '--data', str(prepared), '--out', str(tmp_path / 'cut'), '--resume')
    assert r.returncode == 0 and 'at step 4 of 6' in r.stdout, r.stderr[-2000:]
    assert [(r['step'], r['loss']) for r in lines(tmp_path / 'cut')] == [(r['step'], r['loss']) for r in memmap]
    a, b = (torch.load(tmp_path / run / 'checkpoint.pt', weights_only=True) for run in ('memmap', 'cut'))
    for key in ('student', 'teacher', 'optimizer', 'step', 'data'):
        assert same_tensors(a[key], b[key]), key


def test_v2_skips_a_prepared_block_of_too_few_ordinary_tokens(tmp_path):
    """data2vec 2.0 masks a fixed count of ordinary tokens; a block of mostly </s> (one-word documents) cannot hold it.
    Read in place, such a block raises DataError when read (so it is skipped and logged), the others read."""
    src = tmp_path / 'src'
    src.mkdir()
    words = SyntheticText(size=300).documents()
    (src / 'a.txt').write_text('\n\n'.join(words[:40]) + '\n\n' + '\n\n'.join(['yes'] * 60) + '\n\n' + '\n\n'.join(words[40:80]))
    prepare_corpus(src, tmp_path / 'p', vocab_size=400)
    mcfg, cfg = parse_train_args(TINY + ['--version', '2', '--data', str(tmp_path / 'p'), '--clones', '2',
                                         '--mask-prob', '0.6'])
    dataset, _ = pretraining_data(mcfg, cfg)
    bad = []
    for i in range(len(dataset)):
        try:
            dataset[i]
        except DataError as e:
            bad.append(i)
            assert 'ordinary tokens' in str(e) and f'block {i}' in str(e)
    stream = np.fromfile(tmp_path / 'p' / TOKENS, np.uint16)[:len(dataset) * 30].reshape(-1, 30)
    eos = load_tokenizer_file(tmp_path / 'p' / 'tokenizer.json').token_to_id('</s>')
    need = cfg.block_size - int(cfg.block_size * (1 - cfg.mask_prob))          # fairseq's count, computed here
    assert bad == [i for i, row in enumerate(stream) if (row != eos).sum() < need] and 0 < len(bad) < len(dataset)


def test_prepare_refuses_a_finished_corpus_and_train_another_tokenizer(tmp_path, corpus):
    """--prepare never overwrites a prepared corpus (an interrupted one's leftovers it does); train.py takes a prepared
    corpus with its own tokenizer, or a --tokenizer (--init's) with the same vocabulary, and refuses another."""
    src, prepared = corpus
    r = subprocess.run([sys.executable, '-m', 'data.text', '--prepare', '--data', str(src), '--out', str(prepared)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'holds a prepared corpus' in r.stderr.strip().splitlines()[-1]
    (tmp_path / 'cut').mkdir()
    (tmp_path / 'cut' / f'{TOKENS}.tmp').write_bytes(b'\0' * 10)                  # a --prepare killed mid-way
    assert prepare_corpus(src, tmp_path / 'cut', tokenizer_path=prepared / 'tokenizer.json')['tokens'] > 0
    other = train_tokenizer(read_corpus(src), 300)
    other.save(str(tmp_path / 'other.json'))
    r = cli('train.py', *TINY, '--data', str(prepared), '--tokenizer', str(tmp_path / 'other.json'), '--out', str(tmp_path / 'x'))
    assert r.returncode == 1 and 'prepared with another tokenizer' in r.stderr.strip().splitlines()[-1]
    mcfg, cfg = parse_train_args(TINY + ['--data', str(prepared), '--tokenizer', str(prepared / 'tokenizer.json')])
    assert len(pretraining_data(mcfg, cfg)[0]) > 0


def test_prepare_across_chunks_and_past_an_unreadable_file(tmp_path, corpus):
    """Documents encoded 7 at a time (the </s> between chunks) and a file that does not decode (skipped, listed in the
    header): still pack_blocks' blocks of the readable documents."""
    src, prepared = corpus
    data = tmp_path / 'data'
    data.mkdir()
    for f in src.glob('*.txt'):
        (data / f.name).write_bytes(f.read_bytes())
    (data / 'part1b.txt').write_bytes(b'caf\xe9 latin-1 text\n')
    header = prepare_corpus(data, tmp_path / 'out', tokenizer_path=prepared / 'tokenizer.json', chunk=7)
    assert len(header['unreadable']) == 1 and 'part1b.txt' in header['unreadable'][0]
    tok = load_tokenizer_file(prepared / 'tokenizer.json')
    expected, got = pack_blocks(read_corpus(src), tok, 32), TokenFile(tmp_path / 'out', 32, tok)
    assert len(got) == len(expected) and all(torch.equal(got[i][0], expected[i]) for i in range(len(got)))


# ---------------------------------------------------------------------------------------------- speech and images: manifest
def _wavs(root, n, rate=16_000):
    """n mono clips of 0.1 s · (k + 1) in two folders."""
    for k in range(n):
        (root / f'spk{k % 2}').mkdir(parents=True, exist_ok=True)
        sf.write(str(root / f'spk{k % 2}' / f'u{k}.wav'), np.zeros(rate // 10 * (k + 1), np.float32), rate)


def test_audio_manifest_is_written_once_and_follows_changes(tmp_path):
    """First start-up reads every header and writes the manifest; the second reads none; a changed file, a new file and
    an unreadable file are read again, a removed one drops out. Lengths always equal soundfile's, read here."""
    _wavs(tmp_path, 6)
    first = AudioFolder(tmp_path, strict=False)
    assert first.headers_read == 6 and manifest_path(tmp_path, 'audio').is_file()

    def expected(folder):
        return [sf.info(str(p)).frames for p in folder.files]
    second = AudioFolder(tmp_path, strict=False)
    assert second.headers_read == 0 and second.lengths == first.lengths == expected(first)
    sf.write(str(tmp_path / 'spk0' / 'u0.wav'), np.zeros(4321, np.float32), 16_000)           # changed: size and mtime
    sf.write(str(tmp_path / 'spk1' / 'new.wav'), np.zeros(1234, np.float32), 16_000)          # added
    (tmp_path / 'spk1' / 'u5.wav').unlink()                                                  # removed
    (tmp_path / 'spk1' / 'bad.wav').write_bytes(b'RIFF not really')                          # unreadable
    third = AudioFolder(tmp_path, strict=False)
    assert third.headers_read == 3 and third.lengths == expected(third) and len(third) == 6
    assert len(third.unreadable) == 1 and 'bad.wav' in third.unreadable[0]
    fourth = AudioFolder(tmp_path, strict=False)
    assert fourth.headers_read == 1 and fourth.lengths == third.lengths                    # only the unreadable one again
    with pytest.raises(DataError, match='bad.wav'):
        AudioFolder(tmp_path, strict=True)


def test_image_manifest_gives_the_sizes_and_still_refuses_small_images(tmp_path):
    for k in range(5):
        (tmp_path / f'c{k % 2}').mkdir(exist_ok=True)
        Image.new('RGB', (40 + k, 30 + 2 * k)).save(tmp_path / f'c{k % 2}' / f'i{k}.png')
    first = ImageFolder(tmp_path, min_size=30)
    second = ImageFolder(tmp_path, min_size=30)
    assert (first.headers_read, second.headers_read) == (5, 0) and first.samples == second.samples
    lines_ = manifest_path(tmp_path, 'images').read_text().splitlines()
    sizes = {line.split('\t')[0]: tuple(map(int, line.split('\t')[3:])) for line in lines_[1:]}
    assert sizes == {str(p.relative_to(tmp_path)): Image.open(p).size for p, _ in first.samples}
    with pytest.raises(DataError, match='smaller than the 34×34 crop'):
        ImageFolder(tmp_path, min_size=34)                                                  # from the manifest's sizes


def test_a_read_only_folder_keeps_its_manifest_in_the_cache(tmp_path, monkeypatch):
    """Where the data folder is not writable (a shared dataset mount; faked here, as root may write anywhere), the
    manifest goes to $XDG_CACHE_HOME/data2vec/ and serves the next start-up from there."""
    data, real = tmp_path / 'data', os.access
    _wavs(data, 2)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    monkeypatch.setattr(os, 'access', lambda p, mode: False if str(p).startswith(str(data)) else real(p, mode))
    assert AudioFolder(data).headers_read == 2 and AudioFolder(data).headers_read == 0
    assert manifest_path(data, 'audio').parent == tmp_path / 'cache' / 'data2vec'
    assert manifest_path(data, 'audio').is_file() and not list(data.glob('.data2vec-*'))


MANIFEST_DDP = """
import sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
dist.init_process_group('gloo')
from data.speech import AudioFolder
a = AudioFolder(sys.argv[1])
sys.stdout.write('rank %d read %d headers, %d files\\n' % (dist.get_rank(), a.headers_read, len(a)))
sys.stdout.flush()
dist.barrier()
dist.destroy_process_group()
"""


def test_under_torchrun_rank_0_reads_the_headers_and_the_others_the_manifest(tmp_path):
    _wavs(tmp_path / 'd', 8)
    (tmp_path / 'run.py').write_text(MANIFEST_DDP.format(root=str(ROOT)))
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', str(tmp_path / 'run.py'),
                        str(tmp_path / 'd')], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'rank 0 read 8 headers, 8 files' in r.stdout and 'rank 1 read 0 headers, 8 files' in r.stdout


def test_list_files_finds_and_orders_what_sorted_rglob_does(tmp_path):
    """The file order fixes which sample an index means (and so what a resumed run draws): the same files as
    sorted(Path.rglob) (links to files followed, linked folders not), component by component, where a plain string
    sort would put 'a-b/…' before 'a/…'; broken links and folders named like files are not files."""
    for rel in ['a/x.wav', 'a-b/y.WAV', 'a/b/z.flac', 'A/w.wav', '.hidden/v.wav', 'a/readme.txt', 'ab.wav', 'a/c/.q.wav']:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b'')
    (tmp_path / 'linked').symlink_to(tmp_path / 'a')                          # a folder link: not followed
    (tmp_path / 'a' / 'link.wav').symlink_to(tmp_path / 'ab.wav')             # a file link: a file
    (tmp_path / 'a' / 'broken.wav').symlink_to(tmp_path / 'gone.wav')         # a broken link: not a file
    (tmp_path / 'dir.wav').mkdir()
    expected = sorted(p for p in tmp_path.rglob('*') if p.suffix.lower() in ('.wav', '.flac') and p.is_file())
    assert [tmp_path / rel for rel in list_files(tmp_path, ('.wav', '.flac'))] == expected and len(expected) == 8


def test_odd_file_names_do_not_void_the_manifest(tmp_path):
    """A name that is not UTF-8 is kept (as os.listdir's surrogates); one with a line break is left out of the manifest
    and read again each time, while the others still come from it."""
    (tmp_path / 'c').mkdir()
    for name in (b'plain.png', b'odd\xff.png', b'line\rbreak.png'):
        Image.new('RGB', (9, 7)).save(os.path.join(os.fsencode(tmp_path / 'c'), name).decode('utf-8', 'surrogateescape'))
    assert ImageFolder(tmp_path).headers_read == 3
    again = ImageFolder(tmp_path)
    assert again.headers_read == 1 and len(again) == 3 and all(again[i][0].shape == (3, 7, 9) for i in range(3))


def test_file_list_holds_the_names_as_bytes_and_gives_paths(tmp_path):
    """FileList: one bytes array (no Python object per file, so loader workers share it), items the Paths of the
    names given, odd ones included; a dataset's files are one."""
    rels = ['a/b.wav', 'c.wav', os.fsdecode(b'odd\xff.wav'), 'longer/name/here.flac']
    files = FileList(tmp_path, rels)
    assert files.rels.dtype.kind == 'S' and files.rels.nbytes == len(rels) * max(len(os.fsencode(r)) for r in rels)
    assert list(files) == [tmp_path / r for r in rels] and files[1:3] == [tmp_path / r for r in rels[1:3]]
    _wavs(tmp_path / 'd', 3)
    assert isinstance(AudioFolder(tmp_path / 'd').files, FileList)

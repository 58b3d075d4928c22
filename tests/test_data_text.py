"""Text data: synthetic corpus, text files and bad ones, byte-level BPE and its cache.   pytest tests/test_data_text.py"""
import json
import re
import types
from collections import Counter

import pytest
import torch

import data.text as text
from data import DataError
from data.text import (BOS, EOS, MASK, PAD, SPECIALS, UNK, SyntheticText, TokenBlocks, load_tokenizer, pack_blocks,
                       read_corpus, tokenizer_cache_path, train_tokenizer)


@pytest.fixture(scope='module')
def corpus():
    return SyntheticText(size=1200).documents()


@pytest.fixture(scope='module')
def tokenizer(corpus):
    return train_tokenizer(corpus, 600)


# ---------------------------------------------------------------------------------------------- synthetic corpus
def test_synthetic_text_is_deterministic_varied_and_balanced():
    ds = SyntheticText(size=60, seed=3)
    sentence, label = ds[5]
    assert isinstance(sentence, str) and isinstance(label, int) and sentence[0].isupper() and sentence[-1] in '.?'
    assert SyntheticText(size=60, seed=3)[5] == (sentence, label)                   # same (seed, split, index)
    assert sentence != ds[11][0] and sentence != SyntheticText(size=60, seed=4)[5][0]
    assert [ds[i][0] for i in range(20)] != [SyntheticText(size=60, seed=3, split='valid')[i][0] for i in range(20)]
    assert len(ds.classes) == 6 and Counter(ds[i][1] for i in range(60)) == {c: 10 for c in range(6)}
    assert len({ds[i][0] for i in range(60)}) == 60
    with pytest.raises(ValueError, match='split'):
        SyntheticText(split='test')


def test_synthetic_vocabulary_structures_and_documents():
    ds = SyntheticText(size=2000)
    sentences = [ds[i][0] for i in range(2000)]
    words = Counter(w for s in sentences for w in re.findall(r"[a-z]+", s.lower()))
    assert 300 <= len(words) <= 1000                                                # a few hundred distinct words
    assert sum(s.endswith('?') for s in sentences) > 100 and sum(',' in s for s in sentences) > 300
    topic_words = [{w for forms in lex.values() for f in forms for w in (f if isinstance(f, tuple) else [f])}
                   for lex in text.LEXICONS]
    own = [ws - set().union(*(o for o in topic_words if o is not ws)) for ws in topic_words]
    for s, label in (ds[i] for i in range(600)):                                     # its topic's words, no other's
        found = {c for c in range(6) if own[c] & set(re.findall('[a-z]+', s.lower()))}
        assert found == {label}, s
    docs = ds.documents()
    assert docs == SyntheticText(size=2000).documents() and all(docs)
    assert sum(map(len, docs)) == sum(map(len, sentences)) + len(sentences) - len(docs)   # each sentence once
    assert 2000 / 8 <= len(docs) <= 2000 / 3 and docs[0].startswith(sentences[0])


# ---------------------------------------------------------------------------------------------- real text
def test_read_corpus_splits_paragraphs_and_reads_folders(tmp_path):
    (tmp_path / 'a.txt').write_bytes(b'\xef\xbb\xbfFirst line\r\nsame paragraph\r\n\r\n  \r\n\r\nSecond one.\n\n\n')
    assert read_corpus(tmp_path / 'a.txt') == ['First line\nsame paragraph', 'Second one.']
    (tmp_path / 'sub').mkdir()
    (tmp_path / 'sub' / 'b.txt').write_text('Caf\u00e9 \u4e2d\u6587\n \nthird', encoding='utf-8')
    (tmp_path / 'notes.md').write_text('not read')
    assert read_corpus(tmp_path) == ['First line\nsame paragraph', 'Second one.', 'Caf\u00e9 \u4e2d\u6587', 'third']


def test_read_corpus_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match='nope: no such file or directory'):
        read_corpus(tmp_path / 'nope')
    (tmp_path / 'x.md').write_text('text')
    with pytest.raises(DataError, match=f'{re.escape(str(tmp_path))}: no .txt files under it'):
        read_corpus(tmp_path)
    (tmp_path / 'blank.txt').write_text(' \n\n \t\n')
    with pytest.raises(DataError, match=r'blank\.txt: the file is empty \(only whitespace\)'):
        read_corpus(tmp_path)
    (tmp_path / 'empty.txt').write_bytes(b'')
    with pytest.raises(DataError, match=r'empty\.txt: the file is empty$'):
        read_corpus(tmp_path / 'empty.txt')
    (tmp_path / 'bad.txt').write_bytes('Caf\u00e9\n\nok '.encode() + b'caf\xe9 au lait')    # é as latin-1 at byte 13
    with pytest.raises(DataError, match=r'bad\.txt: not valid utf-8 at byte 13 \(0xe9\); pass --encoding latin-1'):
        read_corpus(tmp_path / 'bad.txt')
    assert read_corpus(tmp_path / 'bad.txt', encoding='latin-1')[1] == 'ok caf\u00e9 au lait'
    with pytest.raises(DataError, match='--encoding klingon: unknown encoding'):
        read_corpus(tmp_path / 'bad.txt', encoding='klingon')


def test_trec_train_is_latin1(shared_data):
    path = shared_data / 'text' / 'trec' / 'train.txt'
    raw = path.read_bytes()
    first = next(i for i, b in enumerate(raw) if b >= 0x80)                       # a latin-1 byte, invalid here
    with pytest.raises(DataError, match=rf'trec/train\.txt: not valid utf-8 at byte {first} \(0x{raw[first]:02x}\); '
                                        r'pass --encoding'):
        read_corpus(path)
    docs = read_corpus(path, encoding='latin-1')
    assert '\n'.join(docs) == raw.decode('latin-1').strip() and sum(d.count('\n') + 1 for d in docs) == 5452


# ---------------------------------------------------------------------------------------------- byte-level BPE
def test_tokenizer_specials_vocab_size_and_exact_round_trip(tokenizer):
    assert [tokenizer.token_to_id(s) for s in SPECIALS] == [BOS, PAD, EOS, UNK, MASK] == [0, 1, 2, 3, 4]
    assert 400 < tokenizer.get_vocab_size() <= 600
    for s in ['The hungry fox chased three owls near the barn.', 'Caf\u00e9 cr\u00e8me \u4e2d\u6587 \U0001F600!',
              '  two  spaces,\ttab\r\nCRLF \x00 \u200b zero width', ' <mask> </s> <s> are text here', '']:
        ids = tokenizer.encode(s).ids
        assert tokenizer.decode(ids) == s and not set(ids) & {BOS, PAD, EOS, UNK, MASK}
    assert len(tokenizer.encode('The hungry fox chased three owls near the barn.').ids) < 20   # merges learnt
    with pytest.raises(DataError, match='--vocab-size 260: a byte-level BPE needs at least 261'):
        train_tokenizer(['some text'], 260)


def test_tokenizer_cache_is_written_reused_and_refreshed(tmp_path, monkeypatch, corpus):
    calls = []
    real = text.trainers.BpeTrainer
    monkeypatch.setattr(text, 'trainers', types.SimpleNamespace(BpeTrainer=lambda **kw: calls.append(kw) or real(**kw)))
    (tmp_path / 'corpus.txt').write_text('\n\n'.join(corpus[:200]))
    cache = tokenizer_cache_path(tmp_path / 'corpus.txt', 400)
    assert cache == tmp_path / 'corpus.txt.bpe-400.json'
    assert tokenizer_cache_path(tmp_path, 400) == tmp_path / '.bpe-400.json'
    docs = read_corpus(tmp_path / 'corpus.txt')
    first = train_tokenizer(docs, 400, cache)
    assert len(calls) == 1 and cache.is_file() and json.loads(cache.read_text())['data2vec']['vocab_size'] == 400
    second = train_tokenizer(docs, 400, cache)                                      # loaded, not trained
    assert len(calls) == 1 and second.to_str() == first.to_str()
    assert second.encode(' <mask>').ids == first.encode(' <mask>').ids != [MASK]     # the flag is set on load too
    assert read_corpus(tmp_path) == docs                                            # the cache is not read as text
    train_tokenizer(docs, 450, cache)                                               # another size: trained again
    assert len(calls) == 2 and json.loads(cache.read_text())['data2vec']['vocab_size'] == 450
    train_tokenizer(docs[:-1], 450, cache)                                          # other text: trained again
    train_tokenizer(docs[:-1], 450, cache)
    assert len(calls) == 3
    cache.write_text('{"truncat')                                                   # broken: trained again
    assert train_tokenizer(docs[:-1], 450, cache).get_vocab_size() <= 450 and len(calls) == 4
    assert not list(tmp_path.glob('*.tmp*'))


def test_tokenizer_round_trips_tiny_shakespeare(shared_data):
    full = (shared_data / 'text' / 'tinyshakespeare.txt').read_text(encoding='utf-8')
    tok = train_tokenizer(full[:200_000].split('\n\n'), 1000)
    ids = tok.encode(full).ids
    assert tok.get_vocab_size() == 1000 and tok.decode(ids) == full
    assert len(ids) < len(full) / 2                                                 # 2.3 characters a token


def test_load_tokenizer_from_vocab_and_merges(tmp_path, tokenizer, capsys):
    tokenizer.model.save(str(tmp_path))                                             # vocab.json + merges.txt
    loaded = load_tokenizer(tmp_path / 'vocab.json', tmp_path / 'merges.txt')
    assert [loaded.token_to_id(s) for s in SPECIALS] == [0, 1, 2, 3, 4] and capsys.readouterr().out == ''
    s = 'The chef sliced a ripe melon, caf\u00e9 \U0001F600 <mask>.'
    assert loaded.encode(s).ids == tokenizer.encode(s).ids and loaded.decode(loaded.encode(s).ids) == s
    # a GPT-2 style vocabulary, without the specials: they are appended, and a line says so
    vocab = json.loads((tmp_path / 'vocab.json').read_text())
    gpt2 = {t: i - 5 for t, i in vocab.items() if t not in SPECIALS}
    (tmp_path / 'gpt2').mkdir()
    (tmp_path / 'gpt2' / 'vocab.json').write_text(json.dumps(gpt2))
    loaded = load_tokenizer(tmp_path / 'gpt2' / 'vocab.json', tmp_path / 'merges.txt')
    n = len(gpt2)
    assert [loaded.token_to_id(s) for s in SPECIALS] == list(range(n, n + 5))
    assert 'no <s> <pad> </s> <unk> <mask> in the vocabulary; added them as special tokens <s>=' in capsys.readouterr().out
    assert loaded.encode(s).tokens == tokenizer.encode(s).tokens and loaded.decode(loaded.encode(s).ids) == s
    with pytest.raises(DataError, match='merges.txt: no such file'):
        load_tokenizer(tmp_path / 'vocab.json', tmp_path / 'gpt2' / 'merges.txt')


# ---------------------------------------------------------------------------------------------- packing
def test_pack_blocks_is_the_document_stream_in_wrapped_blocks(tokenizer, corpus):
    docs = corpus[:40]
    stream = []
    for d in docs:
        stream += tokenizer.encode(d).ids + [EOS]
    stream = stream[:-1]                                                            # </s> between documents only
    blocks = pack_blocks(docs, tokenizer, block_size=64)
    n = len(stream) // 62
    assert blocks.dtype == torch.long and blocks.shape == (n, 64) and n > 10
    assert (blocks[:, 0] == BOS).all() and (blocks[:, -1] == EOS).all()
    assert blocks[:, 1:-1].flatten().tolist() == stream[:n * 62]
    assert (blocks[:, 1:-1] == EOS).sum() >= 10                                    # document boundaries
    assert not torch.isin(blocks[:, 1:-1], torch.tensor([BOS, PAD, UNK, MASK])).any()
    ds = TokenBlocks(blocks)
    assert len(ds) == n and torch.equal(ds[3][0], blocks[3]) and ds[3][1] == 0
    assert torch.equal(pack_blocks(docs, tokenizer, block_size=64, chunk=7), blocks)   # chunks change nothing


def test_pack_blocks_too_little_text(tokenizer):
    n = len(tokenizer.encode('One short document.').ids) * 2 + 1
    with pytest.raises(DataError, match=rf'the corpus has {n} tokens, fewer than the 510 one block needs '
                                        r'\(--block-size 512 = <s> \+ 510 \+ </s>\); use a smaller --block-size'):
        pack_blocks(['One short document.'] * 2, tokenizer, block_size=512)
    assert pack_blocks(['One short document.'] * 2, tokenizer, block_size=n + 2).shape == (1, n + 2)


# ---------------------------------------------------------------------------------------------- labelled text (finetune.py)
from data.text import load_tokenizer_file, read_labelled  # noqa: E402


def test_read_labelled_trec_lines(tmp_path):
    """'label sentence' lines → ((sentence,), label): the first word is the label, blank lines, BOM and CRLF are ignored."""
    (tmp_path / 'trec.txt').write_bytes(b'\xef\xbb\xbfDESC How did serfdom develop ?\r\n\r\n  \r\nNUM  When was it ?  \r\n')
    assert read_labelled(tmp_path / 'trec.txt') == [(('How did serfdom develop ?',), 'DESC'), (('When was it ?',), 'NUM')]


def test_read_labelled_glue_tsv_single_sentences_and_pairs(tmp_path):
    """A TSV header picks the text columns by name, in GLUE's order whatever the file's column order; labels stay str."""
    (tmp_path / 'rte.tsv').write_text('index\tsentence2\tlabel\tsentence1\n0\tB0\tnot_entailment\tA0\n1\tB1\tentailment\tA1\n')
    assert read_labelled(tmp_path / 'rte.tsv') == [(('A0', 'B0'), 'not_entailment'), (('A1', 'B1'), 'entailment')]
    (tmp_path / 'qnli.txt').write_text('question\tsentence\tlabel\nWhy?\tBecause.\t1\n')     # a tab in line 1: a TSV
    assert read_labelled(tmp_path / 'qnli.txt') == [(('Why?', 'Because.'), '1')]
    (tmp_path / 'sst2.tsv').write_text('sentence\tlabel\nit is good\t1\nit is bad\t0\n')
    assert read_labelled(tmp_path / 'sst2.tsv') == [(('it is good',), '1'), (('it is bad',), '0')]


def test_read_labelled_errors_name_the_file_and_line(tmp_path):
    bad = {'nolabel.tsv': ('sentence\tscore\nfine\t1\n', r'nolabel\.tsv:1: a TSV header needs a label column'),
           'notext.tsv': ('id\tlabel\n1\t0\n', r'notext\.tsv:1: .*text columns'),
           'fields.tsv': ('sentence\tlabel\nfine\t1\n\nextra\t1\t2\n', r'fields\.tsv:4: 3 tab-separated fields, the header has 2'),
           'short.txt': ('A a question\nB\n', r'short\.txt:2: expected "label sentence"'),
           'empty.txt': ('\n \n', r'empty\.txt: the file is empty'),
           'header.tsv': ('sentence\tlabel\n', r'header\.tsv: no labelled examples')}
    for name, (content, message) in bad.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match=message):
            read_labelled(tmp_path / name)
    with pytest.raises(DataError, match='missing.txt: no such file'):
        read_labelled(tmp_path / 'missing.txt')
    (tmp_path / 'latin.txt').write_bytes('A caf\xe9 question\n'.encode('latin-1'))     # bytes A, ' ', c, a, f, then 0xe9 at 5
    with pytest.raises(DataError, match=r'latin\.txt: not valid utf-8 at byte 5 \(0xe9\); pass --encoding latin-1'):
        read_labelled(tmp_path / 'latin.txt')
    assert read_labelled(tmp_path / 'latin.txt', 'latin-1') == [(('caf\xe9 question',), 'A')]


def test_load_tokenizer_file_round_trip_and_errors(tokenizer, tmp_path):
    """A tokenizer saved as JSON (train.py's OUT/tokenizer.json) loads with the same vocabulary and encodings."""
    tokenizer.save(str(tmp_path / 'tokenizer.json'))
    loaded = load_tokenizer_file(tmp_path / 'tokenizer.json')
    s = 'The hungry fox ran to the meadow <mask> café'
    assert loaded.get_vocab_size() == tokenizer.get_vocab_size() and loaded.encode(s).ids == tokenizer.encode(s).ids
    assert loaded.decode(loaded.encode(s).ids) == s and [loaded.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match='nothing.json: no such file'):
        load_tokenizer_file(tmp_path / 'nothing.json')
    (tmp_path / 'junk.json').write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match='junk.json: cannot read a tokenizer'):
        load_tokenizer_file(tmp_path / 'junk.json')


def test_read_labelled_real_trec(shared_data):
    """TREC (labels 0–5) is latin-1: 5452 training questions; per-label counts from `cut -d' ' -f1 | sort | uniq -c`."""
    path = shared_data / 'text' / 'trec' / 'train.txt'
    examples = read_labelled(path, 'latin-1')
    assert len(examples) == 5452 and all(len(texts) == 1 and texts[0] for texts, _ in examples)
    assert Counter(label for _, label in examples) == {'0': 1162, '1': 1250, '2': 86, '3': 1223, '4': 835, '5': 896}
    assert examples[0] == (('How did serfdom develop in and then leave Russia ?',), '0')
    with pytest.raises(DataError, match=r'train\.txt: not valid utf-8 at byte 3173 \(0xf0\); pass --encoding latin-1'):
        read_labelled(path)
    assert len(read_labelled(shared_data / 'text' / 'trec' / 'test.txt')) == 500          # test.txt is plain ASCII/UTF-8

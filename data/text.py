"""Text data: an embedded synthetic corpus (no download, no file), a reader for real text, byte-level BPE, packing.

SyntheticText(size, seed)   English-like sentences from a small grammar over 6 topics; item i → (sentence, topic).
read_corpus(path)           a .txt file or a folder of them → documents (blank-line-separated paragraphs).
train_tokenizer(docs, V)    GPT-2/RoBERTa-style byte-level BPE with the specials <s> <pad> </s> <unk> <mask> at 0..4.
pack_blocks(docs, tok, B)   one token stream (</s> between documents) cut into blocks <s> … </s> of B tokens.
TokenBlocks(blocks)         those blocks as a dataset: item i → (LongTensor (B,), 0).

pretraining_data, collate                     train.py's text: the tokenizer, packed blocks, BERT or span masking
collate_v2                                    data2vec 2.0: M random masks per block (masking.random_mask)
labelled_set, embedded, prepare_labelled, labelled_collate   finetune.py's: sentences (pairs) and labels → token ids
bench_data                                    bench.py's random token blocks
"""
import hashlib
import json
import os
import random
import re
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from torch.nn.utils.rnn import pad_sequence

from config import random_mask_count
from data import DataError, Repeat
from masking import random_mask, token_mask, visible_order

SPECIALS = ('<s>', '<pad>', '</s>', '<unk>', '<mask>')       # RoBERTa's; ids 0..4 in every tokenizer trained here
BOS, PAD, EOS, UNK, MASK = range(5)                          # (a loaded RoBERTa vocab has <mask> at 50264: look it up)


# ---------------------------------------------------------------------------------------------- synthetic corpus
# Per topic: nouns; people; verbs taking a topic noun as object; intransitive verbs; adjectives; places. 'a/b' is
# an irregular plural or past. The topic picks every content word of a sentence: that is the label.
TOPICS = {
    'animals': 'cat dog horse rabbit fox owl mouse/mice bear wolf/wolves deer/deer duck goat sheep/sheep tiger lion '
               'frog eagle squirrel turtle pony; farmer vet keeper hunter; chase feed/fed follow watch catch/caught '
               'groom hear/heard find/found; sleep/slept run/ran hide/hid jump; furry wild hungry sleepy fierce tame '
               'spotted shy; forest barn field zoo meadow stable',
    'food': 'apple cake lemon onion potato/potatoes tomato/tomatoes pie carrot egg pear sandwich cookie pepper '
            'pancake biscuit loaf/loaves melon peach cherry bun; cook baker chef waiter; bake taste slice eat/ate '
            'buy/bought peel serve mix; dine snack shop/shopped feast; sweet spicy fresh salty crispy sour ripe '
            'delicious; kitchen market bakery cafe restaurant garden',
    'weather': 'cloud storm gust raindrop snowflake rainbow breeze hailstone puddle umbrella raincoat forecast '
               'thermometer shower icicle wave snowdrift sunbeam fog mist; forecaster sailor fisherman/fishermen '
               'shepherd; predict measure see/saw feel/felt expect fear report dread; shiver freeze/froze shelter '
               'wait; cold stormy foggy windy sunny cloudy icy humid; coast valley mountain harbour hill island',
    'sport': 'ball goal match team race bat racket medal trophy net helmet bike game point whistle glove shirt boot '
             'prize lap; player coach referee runner; kick throw/threw win/won lose/lost hit/hit miss defend block; '
             'train cheer sprint stretch; fast strong tired brave skilled nervous proud lucky; stadium pitch court '
             'track gym pool',
    'travel': 'ticket map suitcase passport hotel bus plane ferry camera postcard bag tour journey flight guidebook '
              'souvenir taxi car backpack visa; traveller tourist driver pilot; book pack carry board reserve '
              'photograph explore visit; travel/travelled wander depart fly/flew; crowded distant famous delayed '
              'cheap foreign quiet busy; city village border capital port beach',
    'music': 'song piano guitar drum violin melody concert choir band album note chord flute trumpet tune record '
             'lyric orchestra ballad symphony; singer pianist drummer composer; play sing/sang compose tune record '
             'hum/hummed practise rehearse; dance perform listen bow; loud soft gentle cheerful catchy haunting '
             'lively sad; hall theatre studio church stage club',
}
NAMES = ('Anna Ben Clara David Emma Felix Grace Henry Iris Jack Kate Leo Maya Noah Olivia Paul Rosa Sam Tara Victor '
         'Zoe Omar Lucy Mark Nina Oscar Ruth Simon Vera Yusuf').split()
ADJS = 'old young big small little new tall happy careful strange lovely bright dark huge tiny red green blue'.split()
ADVERBS = 'quickly slowly carefully quietly happily suddenly often never always rarely gently eagerly finally'.split()
TIMES = ('yesterday|last week|last night|on Monday|on Tuesday|on Friday|on Sunday|in the morning|in the evening|'
         'this morning|at noon|at midnight|tomorrow|next week|next summer|soon').split('|')       # the last 4: future
NUMBERS = 'two three four five six seven eight nine ten twelve twenty'.split()
PREPS = 'in near behind beside inside outside at across towards'.split()


def _lexicon(words):
    """A topic's word lists: nouns and people as (singular, plural), verbs as (base, past, 3rd person)."""
    consonant_y = lambda w: w[-1] == 'y' and w[-2] not in 'aeiou'                  # pony → ponies, carry → carried
    plural = lambda w: w[:-1] + 'ies' if consonant_y(w) else w + ('es' if w.endswith(('s', 'x', 'ch', 'sh')) else 's')
    past = lambda w: w[:-1] + 'ied' if consonant_y(w) else w + ('d' if w[-1] == 'e' else 'ed')
    forms = lambda ws, rule: [tuple(w.split('/')) if '/' in w else (w, rule(w)) for w in ws.split()]
    verbs = lambda ws: [(base, p, plural(base)) for base, p in forms(ws, past)]    # 3rd person: spelt as a plural
    nouns, people, transitive, intransitive, adjs, places = words.split(';')
    return dict(nouns=forms(nouns, plural), people=forms(people, plural), verbs=verbs(transitive),
                intrans=verbs(intransitive), adjs=adjs.split(), places=places.split())


LEXICONS = [_lexicon(words) for words in TOPICS.values()]


def _sentence(r, t):
    """One sentence of topic t (a lexicon) drawn with random.Random r. The structures vary (subordinate and relative
    clauses, questions, lists, reported speech, comparisons) and verbs agree with their subjects, so that guessing a
    masked word needs its context: the topic, the number of the subject, the tense, the sentence type."""
    def noun_phrase(people=False):                          # ('the hungry fox' | 'three owls' | 'an umbrella', plural?)
        plural, (one, many) = r.random() < 0.35, r.choice(t['people'] if people else t['nouns'])
        adjective = r.choice(ADJS if people else t['adjs'] + ADJS) + ' ' if r.random() < 0.4 else ''
        words = adjective + (many if plural else one)
        if plural:
            return f"{r.choice(['the', 'some', 'these', 'those', 'many', 'their', 'our'] + NUMBERS)} {words}", True
        det = r.choice(['the', 'the', 'a', 'this', 'that', 'my', 'his', 'her', 'our'])
        return f"{'an' if det == 'a' and words[0] in 'aeiou' else det} {words}", False

    def agent():                                            # (someone who acts, takes a 3rd-person singular verb?)
        k = r.random()
        if k < 0.4:
            return r.choice(NAMES), True
        if k < 0.85:
            phrase, plural = noun_phrase(people=True)
            return phrase, not plural
        pronoun = r.choice(['he', 'she', 'they', 'we', 'you'])
        return pronoun, pronoun in ('he', 'she')

    def place():
        return f"{r.choice(PREPS)} the {r.choice(t['places'])}"

    def clause(tense=None):                                 # 'Anna quickly fed the hungry fox near the barn'
        tense = tense or r.choice(['past', 'past', 'present', 'future'])
        (subject, sg3), transitive = agent(), r.random() < 0.75
        base, past, third = r.choice(t['verbs'] if transitive else t['intrans'])
        adverb = r.choice(ADVERBS) + ' ' if r.random() < 0.25 else ''
        verb = {'past': adverb + past, 'present': adverb + (third if sg3 else base), 'future': f'will {adverb}{base}'}
        obj, where = ' ' + noun_phrase()[0] if transitive else '', ' ' + place() if r.random() < 0.5 else ''
        return f'{subject} {verb[tense]}{obj}{where}'

    k, (phrase, plural), (base, past, _) = r.random(), noun_phrase(), r.choice(t['verbs'])
    was = 'were' if plural else 'was'
    if k < 0.2:
        s = clause() + '.'
    elif k < 0.3:
        when = r.choice(TIMES)
        s = f"{when}, {clause('future' if when in TIMES[-4:] else 'past')}."
    elif k < 0.42:                                          # a subordinate clause, before or after the main one
        sub = r.choice(['because', 'although', 'when', 'while', 'before', 'after', 'until', 'since'])
        a, b = clause('past'), clause('past')
        s = f'{sub} {a}, {b}.' if r.random() < 0.5 else f'{a} {sub} {b}.'
    elif k < 0.48:
        s = f"if {clause('present')}, {clause('future')}."
    elif k < 0.56:                                          # a relative clause between the subject and its verb
        s = f"{phrase} that {past} {noun_phrase()[0]} {was} {r.choice(['', 'very ', 'too '])}{r.choice(t['adjs'])}."
    elif k < 0.68:                                          # questions
        subject, sg3 = agent()
        wh, does = r.choice(['why', 'when', 'how', 'where']), 'does' if sg3 else 'do'
        s = r.choice([f'did {subject} {base} {phrase} {place()}?', f'{wh} {does} {subject} {base} {phrase}?',
                      f"how many {r.choice(t['nouns'])[1]} did {subject} {base}?", f'who {past} {phrase} {place()}?'])
    elif k < 0.76:                                          # a list
        s = f'{agent()[0]} {past} {phrase}, {noun_phrase()[0]} and {noun_phrase()[0]}.'
    elif k < 0.84:
        s = f"there {r.choice(['are', 'were'] if plural else ['is', 'was'])} {phrase} {place()}."
    elif k < 0.92:                                          # reported speech
        reported = r.choice(['said', 'thought', 'knew', 'hoped', 'believed', 'explained'])
        name, said = r.choice(NAMES), clause()
        s = f'"{said}," said {name}.' if r.random() < 0.5 else f'{name} {reported} that {said}.'
    else:
        s = f"{phrase} {was} more {r.choice(t['adjs'])} than {noun_phrase()[0]}."
    i = next(j for j, c in enumerate(s) if c.isalpha())   # capital first letter (after an opening quote)
    return s[:i] + s[i].upper() + s[i + 1:]


class SyntheticText(torch.utils.data.Dataset):
    """Deterministic synthetic text: sentence i depends only on (seed, split, i); nothing is stored.

    The label is the topic (`classes`, i % 6, so balanced): it picks every noun, verb, adjective and place, while
    names, numbers, adverbs, times and function words are shared. Returns (sentence str, label int).
    """

    def __init__(self, size=4096, seed=0, split='train'):
        if split not in ('train', 'valid'):
            raise ValueError(f"split must be 'train' or 'valid', not {split!r}")
        self.size, self.seed, self.split = size, seed, split
        self.classes = list(TOPICS)

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        label = i % len(self.classes)
        r = random.Random(f'{self.seed}/{self.split}/{i}')   # a str seed is hashed with SHA-512: same in every run
        return _sentence(r, LEXICONS[label]), label

    def documents(self, n_sentences=(3, 8)):
        """The pretraining corpus: this split's sentences, each used once, grouped into documents of
        n_sentences[0]..n_sentences[1] sentences of one topic (i, i + 6, i + 12, …), so that the context of a
        masked word includes the rest of its document. A list of str, in order of first sentence."""
        r, groups = random.Random(f'{self.seed}/{self.split}/documents'), []
        for label in range(len(self.classes)):
            todo = list(range(label, self.size, len(self.classes)))
            while todo:
                k = r.randint(*n_sentences)
                groups.append(todo[:k])
                todo = todo[k:]
        return [' '.join(self[i][0] for i in g) for g in sorted(groups)]


# ---------------------------------------------------------------------------------------------- real text
def _read_text(path, encoding):
    """A file's text with Unix line ends and no byte-order mark; DataError naming the file (and the byte that does not decode)."""
    try:
        data = path.read_bytes()
        text = data.decode(encoding)
    except OSError as e:
        raise DataError(f'{path}: cannot read ({e.strerror})') from None
    except LookupError:
        raise DataError(f'--encoding {encoding}: unknown encoding') from None
    except UnicodeDecodeError as e:                  # e.start: the offset of the first byte that does not decode
        raise DataError(f'{path}: not valid {encoding} at byte {e.start} (0x{data[e.start]:02x}); '
                        f"pass --encoding latin-1 (or the file's encoding)") from None
    text = text.lstrip('\ufeff').replace('\r\n', '\n').replace('\r', '\n')   # byte-order mark, Windows/Mac lines
    if not text.strip():
        raise DataError(f"{path}: the file is empty{' (only whitespace)' if data else ''}")
    return text


def _paragraphs(path, encoding):
    """A file's blank-line-separated paragraphs, stripped, empty ones dropped."""
    return [p for p in (p.strip() for p in re.split(r'\n\s*\n', _read_text(path, encoding))) if p]


def corpus_files(path):
    """--data: a .txt file, or every .txt under a folder (recursive, sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob('*.txt') if p.is_file())
        if not files:
            raise DataError(f'--data {path}: no .txt files under it')
        return files
    if path.is_file():
        return [path]
    raise DataError(f'--data {path}: no such file or directory')


def iter_documents(files, encoding='utf-8', unreadable=None, bar=None):
    """The documents of `files`, one file read at a time: one document per blank-line-separated paragraph. A byte that
    does not decode in `encoding` is an error naming the file and its offset, not a silent replacement character;
    given a list `unreadable`, such files are left out and their errors appended to it instead (unless no file is
    left). `bar`: a tqdm bar advanced by each file's size in bytes."""
    read = False
    for k, f in enumerate(files):
        try:
            paragraphs = _paragraphs(f, encoding)
        except DataError as e:
            if unreadable is None or (k == len(files) - 1 and not read):     # strict, or nothing readable
                raise
            unreadable.append(str(e))
            paragraphs = []
        read = read or bool(paragraphs)
        yield from paragraphs
        if bar is not None and f.is_file():
            bar.update(f.stat().st_size)


def read_corpus(path, encoding='utf-8', unreadable=None):
    """Documents (list of str) from a text file or every .txt under a folder (corpus_files, iter_documents)."""
    files = corpus_files(path)
    with tqdm(desc='reading text', total=sum(f.stat().st_size for f in files), unit='B', unit_scale=True,
              disable=len(files) < 1000, leave=False) as bar:
        return list(iter_documents(files, encoding, unreadable, bar))


GLUE_COLUMNS = (('sentence1', 'sentence2'), ('question1', 'question2'), ('question', 'sentence'), ('premise', 'hypothesis'),
                ('#1 String', '#2 String'), ('sentence',), ('text',))   # the text columns of GLUE TSV headers, pairs first
GLUE_LABELS = ('label', 'gold_label', 'is_duplicate', 'Quality')     # the label column (MNLI, QQP, MRPC name theirs)


def read_labelled(path, encoding='utf-8'):
    """Labelled sentences or sentence pairs for classification (finetune.py): a list of (texts, label str), texts a tuple
    of 1 or 2 str. Two layouts: a TSV whose header names a label column (GLUE_LABELS) and the text columns (GLUE_COLUMNS), or
    `label sentence` lines (TREC). Errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f'{path}: no such file')
    rows = [(n, line.strip(' ')) for n, line in enumerate(_read_text(path, encoding).split('\n'), 1) if line.strip()]  # tabs kept
    examples = []
    if path.suffix.lower() == '.tsv' or '\t' in rows[0][1]:
        header = rows[0][1].split('\t')
        columns = next((c for c in GLUE_COLUMNS if set(c) <= set(header)), None)
        label = next((c for c in GLUE_LABELS if c in header), None)
        if label is None or columns is None:
            raise DataError(f'{path}:1: a TSV header needs a label column ({" | ".join(GLUE_LABELS)}) and text columns '
                            f'({" | ".join("+".join(c) for c in GLUE_COLUMNS)}); '
                            f'found {header}')
        for n, line in rows[1:]:
            fields = line.split('\t')
            if len(fields) != len(header):
                raise DataError(f'{path}:{n}: {len(fields)} tab-separated fields, the header has {len(header)}')
            if not fields[header.index(label)].strip():
                raise DataError(f'{path}:{n}: the {label} field is empty')
            examples.append((tuple(fields[header.index(c)] for c in columns), fields[header.index(label)].strip()))
    else:
        for n, line in rows:
            label, _, sentence = line.partition(' ')
            if not sentence.strip():
                raise DataError(f'{path}:{n}: expected "label sentence", got {line[:60]!r}')
            examples.append(((sentence.strip(),), label))
    if not examples:
        raise DataError(f'{path}: no labelled examples')
    return examples


# ---------------------------------------------------------------------------------------------- byte-level BPE
def _byte_level(tok):
    """GPT-2's byte-level BPE around a BPE model: every byte is a symbol, so any text encodes and decodes exactly.
    A '<mask>' written in the text encodes as the characters < mask >, as with fairseq's GPT-2 BPE: only packing and
    masking put special tokens in (encode_special_tokens is not saved in the JSON, so it is set on every load)."""
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.encode_special_tokens = True
    return tok


def tokenizer_cache_path(data_path, vocab_size):
    """Where train_tokenizer caches the BPE of `data_path`: x.txt → x.txt.bpe-<V>.json beside it, a folder →
    <folder>/.bpe-<V>.json (neither ends in .txt, so read_corpus skips it). None (no cache) where none exists
    yet and the place is not writable, e.g. a read-only dataset mount."""
    data_path = Path(data_path)
    cache = (data_path / f'.bpe-{vocab_size}.json' if data_path.is_dir()
             else data_path.with_name(f'{data_path.name}.bpe-{vocab_size}.json'))
    return cache if cache.exists() or os.access(cache.parent, os.W_OK) else None


def train_tokenizer(documents, vocab_size, cache=None):
    """Train a byte-level BPE of at most `vocab_size` tokens on `documents` (a list of str; without `cache`, any stream
    of them): the SPECIALS at ids 0..4, the 256 byte symbols, then merges. With `cache` (a .json path), a tokenizer
    saved there for the same vocab_size and the same documents (SHA-1 of the text) is loaded instead; otherwise the
    new one is saved there."""
    minimum = 256 + len(SPECIALS)
    if vocab_size < minimum:
        raise DataError(f'--vocab-size {vocab_size}: a byte-level BPE needs at least {minimum} '
                        f'(256 bytes + {len(SPECIALS)} special tokens)')
    meta = None
    if cache:                                            # the cache holds the corpus's SHA-1, to tell a stale one
        sha1 = hashlib.sha1()
        for d in documents:
            sha1.update(d.encode('utf-8', 'surrogatepass') + b'\0')
        meta = {'vocab_size': vocab_size, 'corpus_sha1': sha1.hexdigest()}
    if cache and Path(cache).is_file():
        try:
            spec = json.loads(Path(cache).read_text(encoding='utf-8'))
            if spec.pop('data2vec', None) == meta:       # popped: the tokenizers JSON reader rejects unknown keys
                return _byte_level(Tokenizer.from_str(json.dumps(spec)))
        except Exception:                                # unreadable or truncated: train again and overwrite it
            pass
    tok = _byte_level(Tokenizer(models.BPE()))
    alphabet = pre_tokenizers.ByteLevel.alphabet()       # all 256 byte symbols, seen in the documents or not
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), initial_alphabet=alphabet,
                                  show_progress=not hasattr(documents, '__len__') or len(documents) > 9999)
    tok.train_from_iterator(documents, trainer, length=getattr(documents, '__len__', lambda: None)())
    if cache:
        tmp = Path(f'{cache}.tmp{os.getpid()}')          # write, then rename: never a half-written cache
        tmp.write_text(json.dumps(json.loads(tok.to_str()) | {'data2vec': meta}, ensure_ascii=False), encoding='utf-8')
        os.replace(tmp, cache)
    return tok


def load_tokenizer(vocab_json, merges_txt):
    """A GPT-2 / RoBERTa byte-level BPE from its vocab.json and merges.txt. RoBERTa's vocabulary holds the SPECIALS
    (<s> 0, <pad> 1, </s> 2, <unk> 3, <mask> 50264); GPT-2's holds none, so they are appended (ids 50257…) and a
    line says so. Look special ids up with tokenizer.token_to_id, not with the BOS… constants."""
    for p in (vocab_json, merges_txt):
        if not Path(p).is_file():
            raise DataError(f'{p}: no such file')
    try:
        tok = _byte_level(Tokenizer(models.BPE.from_file(str(vocab_json), str(merges_txt))))
    except Exception as e:
        raise DataError(f'{vocab_json}, {merges_txt}: cannot read a BPE vocabulary and merges ({e})') from None
    missing = [s for s in SPECIALS if tok.token_to_id(s) is None]
    tok.add_special_tokens(list(SPECIALS))               # present ones keep their id; decode now skips all five
    if missing:
        print(f"{vocab_json}: no {' '.join(missing)} in the vocabulary; added them as special tokens "
              f"{', '.join(f'{s}={tok.token_to_id(s)}' for s in missing)}")
    return tok


def load_tokenizer_file(path):
    """A tokenizer saved as one JSON file: train.py writes OUT/tokenizer.json beside the checkpoint."""
    if not Path(path).is_file():
        raise DataError(f'{path}: no such file')
    try:
        return _byte_level(Tokenizer.from_file(str(path)))
    except Exception as e:
        raise DataError(f'{path}: cannot read a tokenizer ({e})') from None


def read_tokenizer(path):
    """--tokenizer: a folder with vocab.json + merges.txt (load_tokenizer) or, failing those, a tokenizer.json; or one
    tokenizer.json (load_tokenizer_file)."""
    path = Path(path)
    if path.is_dir() and not (path / 'vocab.json').is_file() and (path / 'tokenizer.json').is_file():
        path = path / 'tokenizer.json'
    return load_tokenizer(path / 'vocab.json', path / 'merges.txt') if path.is_dir() else load_tokenizer_file(path)


def ordinary_ids(tokenizer):
    """(lo, hi): the ids of ordinary tokens, which masking may pick and draw. The SPECIALS sit at the start
    (ours: 0–4), at the start and the end (RoBERTa: 0–3 and <mask> 50264) or at the end (GPT-2 + appended)."""
    ids, vocab = sorted(tokenizer.token_to_id(t) for t in SPECIALS), tokenizer.get_vocab_size()
    lo = sum(1 for k, i in enumerate(ids) if i == k)                    # specials 0, 1, … at the start
    hi = vocab - (len(ids) - lo)
    if ids != list(range(lo)) + list(range(hi, vocab)):
        raise DataError(f'special tokens {dict(zip(SPECIALS, map(tokenizer.token_to_id, SPECIALS)))} are neither at the '
                        f'start nor at the end of the {vocab}-token vocabulary')
    return lo, hi


def ordinary_count(blocks, lo, hi):
    """How many ordinary ids [lo, hi) each block holds: blocks (..., T) → (...)."""
    return ((blocks >= lo) & (blocks < hi)).sum(-1)


# ---------------------------------------------------------------------------------------------- packing
def pack_blocks(documents, tokenizer, block_size=512, chunk=4096):
    """Tokenize the documents (no specials), join them into one stream with </s> between documents, cut it into
    chunks of block_size − 2 tokens and wrap each as <s> chunk </s>: LongTensor (N, block_size). The incomplete
    last chunk is dropped, so every block is full (no padding, static shapes)."""
    if block_size < 3:
        raise ValueError(f'block_size must be at least 3 (<s> token </s>), not {block_size}')
    documents, (bos, eos) = list(documents), (tokenizer.token_to_id(s) for s in ('<s>', '</s>'))
    encode = getattr(tokenizer, 'encode_batch_fast', tokenizer.encode_batch)   # _fast (tokenizers ≥ 0.20): no offsets
    parts = [np.zeros(0, np.int64)]
    for start in tqdm(range(0, len(documents), chunk), desc='tokenizing', disable=len(documents) < 5 * chunk):
        flat = []
        for enc in encode(documents[start:start + chunk], add_special_tokens=False):
            flat += enc.ids + [eos]
        parts.append(np.array(flat, np.int64))
    stream, inner = np.concatenate(parts)[:-1], block_size - 2            # [:-1]: no </s> after the last document
    n = len(stream) // inner
    if n == 0:
        raise DataError(f'the corpus has {len(stream)} tokens, fewer than the {inner} one block needs '
                        f'(--block-size {block_size} = <s> + {inner} + </s>); use a smaller --block-size or more text')
    blocks = torch.from_numpy(stream[:n * inner]).view(n, inner)
    return torch.cat([torch.full((n, 1), bos), blocks, torch.full((n, 1), eos)], 1)


class TokenBlocks(torch.utils.data.Dataset):
    """Packed blocks (N, block_size) as a dataset: item i → (LongTensor (block_size,), 0); the 0 is a dummy label,
    so items have the (input, label) shape of the other modalities. `tokenizer` made them; `save(out)` writes it
    to out/tokenizer.json, to turn a checkpoint's ids back into text and to resume with the same ids."""

    def __init__(self, blocks, tokenizer=None, unreadable=None):
        self.blocks, self.tokenizer, self.unreadable = blocks, tokenizer, unreadable

    def save(self, out):
        self.tokenizer.save(str(Path(out) / 'tokenizer.json'))

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return self.blocks[i], 0


# ---------------------------------------------------------------------------------------------- a prepared corpus
# Full scale (README, "Full scale"): the corpus is tokenized once, by `python -m data.text --prepare`, into one flat
# token file (nanoGPT's train.bin, fairseq's sample_break_mode none), and train.py reads its blocks in place.
TOKENS, HEADER = 'tokens.bin', 'corpus.json'


def prepare_corpus(data_path, out, vocab_size=50_000, tokenizer_path='', encoding='utf-8', strict=False, chunk=4096):
    """Tokenize the .txt files of `data_path` into out/tokens.bin: pack_blocks' stream (every document's ids, </s>
    between documents), flat, as uint16 (int32 past 65,535 tokens), with out/tokenizer.json (--tokenizer's, or a BPE of
    vocab_size trained here on a first pass) and out/corpus.json, written last: {tokens, dtype, documents, ...}. Holds
    one file's text and `chunk` documents' ids at a time. Unreadable files are skipped and listed (strict: an error).
    → the header dict."""
    out, files, unreadable = Path(out), corpus_files(data_path), None if strict else []
    ours = {TOKENS, f'{TOKENS}.tmp', 'tokenizer.json'}                   # what an interrupted --prepare leaves
    if out.exists() and (not out.is_dir() or any(p.name not in ours for p in out.iterdir())):
        raise DataError(f'--out {out}: holds {"a prepared corpus" if (out / HEADER).exists() else "other files"}; '
                        'choose a new folder')
    size = sum(f.stat().st_size for f in files)
    bar = partial(tqdm, total=size, unit='B', unit_scale=True, dynamic_ncols=True)
    if tokenizer_path:
        tokenizer = read_tokenizer(tokenizer_path)
    else:                                                 # a first pass over the files trains the BPE
        with bar(desc='training the BPE') as b:
            tokenizer = train_tokenizer(iter_documents(files, encoding, None if strict else [], b), vocab_size)
    V, eos = tokenizer.get_vocab_size(), tokenizer.token_to_id('</s>')
    dtype = np.uint16 if V <= 65_535 else np.int32
    encode = getattr(tokenizer, 'encode_batch_fast', tokenizer.encode_batch)
    out.mkdir(parents=True, exist_ok=True)
    count = documents = 0
    with open(out / f'{TOKENS}.tmp', 'wb') as f, bar(desc='tokenizing') as b:
        docs = iter_documents(files, encoding, unreadable, b)
        while batch := [d for _, d in zip(range(chunk), docs)]:
            ids = []
            for enc in encode(batch, add_special_tokens=False):
                ids += ([eos] if count or ids else []) + enc.ids     # </s> before every document but the first
            np.asarray(ids, dtype).tofile(f)
            count, documents = count + len(ids), documents + len(batch)
            b.set_postfix(tokens=f'{count:,}')
    os.replace(out / f'{TOKENS}.tmp', out / TOKENS)
    tokenizer.save(str(out / 'tokenizer.json'))
    header = dict(tokens=count, dtype=np.dtype(dtype).name, vocab_size=V, documents=documents, files=len(files),
                  bytes=size, source=str(Path(data_path).resolve()), encoding=encoding, tokenizer='tokenizer.json',
                  unreadable=unreadable or [])
    (out / HEADER).write_text(json.dumps(header, indent=1))
    return header


class TokenFile(TokenBlocks):
    """A prepared corpus read in place: block i = <s> stream[i·(T − 2) : (i + 1)·(T − 2)] </s>, the blocks pack_blocks
    makes of the same documents. An item maps only its own T − 2 tokens from tokens.bin (a fresh np.memmap per item, as
    nanoGPT does), so a process holds no more of the corpus than its batches. `need` = (lo, hi, n): data2vec 2.0's
    masked count n of ordinary ids [lo, hi); a block with fewer raises DataError, so it is skipped and logged like an
    unreadable file (the in-memory path refuses such a corpus at start-up). item i → (LongTensor (T,), 0)."""

    def __init__(self, path, block_size, tokenizer, need=None):
        path = Path(path)
        try:
            header = json.loads((path / HEADER).read_text())
            self.count, self.dtype = int(header['tokens']), np.dtype(header['dtype'])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f'{path / HEADER}: not a prepared corpus header ({type(e).__name__}: {e})') from None
        if (path / TOKENS).stat().st_size != self.count * self.dtype.itemsize:
            raise DataError(f'{path / TOKENS}: {(path / TOKENS).stat().st_size} bytes, the header says {self.count} '
                            f'{self.dtype.name} tokens; prepare it again')
        super().__init__(None, tokenizer, header['unreadable'])
        self.path, self.inner, self.need = path / TOKENS, block_size - 2, need
        self.bos, self.eos = tokenizer.token_to_id('<s>'), tokenizer.token_to_id('</s>')
        if self.count < self.inner:
            raise DataError(f'{path}: {self.count} tokens, fewer than the {self.inner} one block needs (--block-size '
                            f'{block_size} = <s> + {self.inner} + </s>); use a smaller --block-size or more text')
        self.notes = [f'{path}: {self.count:,} prepared tokens, read in place as {len(self):,} blocks of {block_size}']

    def __len__(self):
        return self.count // self.inner                   # the incomplete last block is dropped, as pack_blocks does

    def __getitem__(self, i):
        ids = np.memmap(self.path, self.dtype, 'r', offset=i * self.inner * self.dtype.itemsize, shape=(self.inner,))
        block = torch.from_numpy(np.concatenate([[self.bos], ids, [self.eos]]).astype(np.int64))   # (T,)
        if self.need:
            lo, hi, n = self.need
            if (have := int(ordinary_count(block, lo, hi))) < n:
                raise DataError(f'{self.path}: block {i} holds {have} ordinary tokens (the rest are </s> between short '
                                f'documents), fewer than the {n} that --mask-prob masks')
        return block, 0


# ---------------------------------------------------------------------------------------------- pretraining batches
def pretraining_data(mcfg, cfg, resume_dir=None):
    """(dataset, collate) for train.py: a prepared corpus (--data holding corpus.json: TokenFile, its own tokenizer), or
    documents from --data or the embedded grammar, the tokenizer (--tokenizer, the resumed run's tokenizer.json in
    `resume_dir`, or a BPE trained here) and the documents packed into blocks in memory. Sets mcfg.vocab_size and pad_id.
    Files that do not decode are listed in `dataset.unreadable` (--strict-data: an error)."""
    prepared = bool(cfg.data) and (Path(cfg.data) / HEADER).is_file()
    if prepared:
        tokenizer = load_tokenizer_file(Path(cfg.data) / 'tokenizer.json')
        if cfg.tokenizer and read_tokenizer(cfg.tokenizer).get_vocab() != tokenizer.get_vocab():   # e.g. --init's
            raise DataError(f'--tokenizer {cfg.tokenizer}: --data {cfg.data} was prepared with another tokenizer (its '
                            'tokenizer.json); prepare it again with this one, or leave --tokenizer out')
    else:
        unreadable = None if cfg.strict_data else []
        documents = read_corpus(cfg.data, cfg.encoding, unreadable) if cfg.data else SyntheticText(seed=0).documents()
        saved = Path(resume_dir) / 'tokenizer.json' if resume_dir and not cfg.tokenizer else ''
        tokenizer = (read_tokenizer(saved or cfg.tokenizer) if saved or cfg.tokenizer else
                     train_tokenizer(documents, mcfg.vocab_size, cfg.data and tokenizer_cache_path(cfg.data, mcfg.vocab_size)))
    mcfg.vocab_size, mcfg.pad_id = tokenizer.get_vocab_size(), tokenizer.token_to_id('<pad>')
    lo, hi = ordinary_ids(tokenizer)
    count = random_mask_count(cfg.block_size, cfg.mask_prob)            # data2vec 2.0: every block must hold it
    if prepared:
        dataset = TokenFile(cfg.data, cfg.block_size, tokenizer, (lo, hi, count) if mcfg.version == 2 else None)
    else:
        dataset = TokenBlocks(pack_blocks(documents, tokenizer, cfg.block_size), tokenizer, unreadable)
    if mcfg.version == 2 and not prepared:                               # a prepared corpus checks each block as it reads it
        if (fewest := int(ordinary_count(dataset.blocks, lo, hi).min())) < count:
            raise DataError(f'a block of {cfg.block_size} tokens holds only {fewest} ordinary tokens (the rest are </s> between '
                            f'short documents), fewer than the {count} that --mask-prob {cfg.mask_prob} masks; use a larger '
                            '--block-size, a smaller --mask-prob, or longer documents')
    if mcfg.version == 2:
        return dataset, partial(collate_v2, cfg=cfg, ordinary=(lo, hi))
    return dataset, partial(collate, cfg=cfg, mask_id=tokenizer.token_to_id('<mask>'), ordinary=(lo, hi))


def collate(items, cfg, mask_id, ordinary, generator=None):
    """Items → dict(source: masked blocks (B, T), mask: the <mask> positions (B, T), original: the blocks (B, T), which
    the teacher reads), every random draw from `generator`. bert: 80% <mask>, 10% random, 10% kept; span: all <mask>."""
    original = torch.stack([block for block, _ in items])                   # (B, T)
    corrupt = (0.1, 0.1) if cfg.text_mask == 'bert' else (0.0, 0.0)          # random, kept
    source, mask = token_mask(original, mask_id, ordinary, cfg.mask_prob, cfg.mask_length, *corrupt, generator=generator)
    return dict(source=source, mask=mask, original=original)


def collate_v2(items, cfg, ordinary, generator=None):
    """data2vec 2.0: items → dict(source: the blocks (B, T), unmasked (no <mask> id: the student drops the masked tokens),
    mask (B·M, T), ids_keep (B·M, T_keep), ids_restore (B·M, T)): M = --clones random masks per block (rows b·M … b·M + M − 1
    are block b's), each of exactly random_mask_count(T, p) ordinary tokens, never a special or <pad>."""
    source = torch.stack([block for block, _ in items])                     # (B, T)
    lo, hi = ordinary
    candidates = ((source >= lo) & (source < hi)).repeat_interleave(cfg.clones, 0)   # (B·M, T)
    mask = random_mask(candidates, random_mask_count(source.shape[1], cfg.mask_prob), generator)
    ids_keep, ids_restore = visible_order(mask)
    return dict(source=source, mask=mask, ids_keep=ids_keep, ids_restore=ids_restore)


def bench_data(mcfg, cfg, size, seconds=None, seed=0):
    """bench.py: `size` blocks <s> … </s> of random ordinary ids in data.text's layout (specials 0–4, <mask> taken as
    the last id), the collate, and the shape: tokens per block. Sets mcfg.pad_id to <pad>."""
    mcfg.pad_id = PAD
    n, inner = 4 * cfg.batch_size, cfg.block_size - 2
    pool = torch.randint(UNK + 1, mcfg.vocab_size - 1, (n, inner), generator=torch.Generator().manual_seed(seed))  # (n, T − 2)
    pool = torch.cat([torch.full((n, 1), BOS), pool, torch.full((n, 1), EOS)], 1)                               # (n, T)
    masking = (partial(collate_v2, cfg=cfg, ordinary=(UNK + 1, mcfg.vocab_size - 1)) if mcfg.version == 2 else
               partial(collate, cfg=cfg, mask_id=mcfg.vocab_size - 1, ordinary=(UNK + 1, mcfg.vocab_size - 1)))
    return Repeat(pool, 0, size), masking, dict(seconds=None, tokens_per_sample=cfg.block_size)


# ---------------------------------------------------------------------------------------------- labelled (fine-tuning)
def labelled_set(path, cfg, mcfg):
    """([(texts, label)], labels) from a GLUE-style TSV or label-sentence lines (read_labelled); ids come later."""
    examples = read_labelled(path, cfg.encoding)
    return examples, [label for _, label in examples]


def embedded(split, mcfg):
    """The embedded sentences: label = the topic, i % 6, so every class is as frequent."""
    return SyntheticText(2048 if split == 'train' else 512, split=split)


def as_tuple(texts):
    return (texts,) if isinstance(texts, str) else texts                  # the embedded set: one sentence, a str


def prepare_labelled(train, test, train_indices, cfg, mcfg):
    """Sentences → token ids, once, up front: with --tokenizer, else the checkpoint's tokenizer.json (a released model:
    its folder's vocab.json + merges.txt), else (--init scratch) a BPE trained on the training texts. Sets
    mcfg.vocab_size and pad_id. → (train, test) as [(ids, label)]."""
    if cfg.tokenizer or cfg.init != 'scratch':
        beside = Path(cfg.init) if Path(cfg.init).is_dir() else Path(cfg.init).parent / 'tokenizer.json'   # a released folder
        tokenizer = read_tokenizer(cfg.tokenizer or beside)                # holds vocab.json + merges.txt
    else:
        tokenizer = train_tokenizer([t for i in train_indices for t in as_tuple(train[i][0])], mcfg.vocab_size)
    if mcfg.vocab_size != tokenizer.get_vocab_size() and cfg.init != 'scratch':
        raise DataError(f'the tokenizer has {tokenizer.get_vocab_size()} tokens, --init {cfg.init} {mcfg.vocab_size}')
    mcfg.vocab_size, mcfg.pad_id = tokenizer.get_vocab_size(), tokenizer.token_to_id('<pad>')
    return encode_texts(train, tokenizer, mcfg.max_tokens), encode_texts(test, tokenizer, mcfg.max_tokens)


def encode_texts(examples, tokenizer, max_tokens):
    """[(texts, label)] → [(LongTensor ids, label)]: <s> a </s> or <s> a </s></s> b </s> (RoBERTa), cut to max_tokens."""
    bos, eos = tokenizer.token_to_id('<s>'), tokenizer.token_to_id('</s>')
    out = []
    for i in tqdm(range(len(examples)), desc='tokenizing', disable=len(examples) < 5000, leave=False):
        texts, label = examples[i]                                        # (a Dataset need not stop iterating at len)
        parts = [tokenizer.encode(t, add_special_tokens=False).ids for t in as_tuple(texts)]
        ids = [bos] + parts[0] + [eos] + (([eos] + parts[1] + [eos]) if len(parts) > 1 else [])
        out.append((torch.tensor(ids[:max_tokens - 1] + [eos] if len(ids) > max_tokens else ids), label))
    return out


def labelled_collate(items, cfg, mcfg, train, generator=None):
    """→ dict(source: ids padded with <pad> (B, T), padding_mask (B, T) or None, labels (B,))."""
    source = pad_sequence([x for x, _ in items], batch_first=True, padding_value=mcfg.pad_id)  # (B, T)
    padding = source == mcfg.pad_id
    return dict(source=source, padding_mask=padding if padding.any() else None, labels=torch.tensor([y for _, y in items]))


if __name__ == '__main__':
    import argparse
    p = argparse.ArgumentParser(description='python -m data.text --prepare --data DIR --out CORPUS: tokenize a text corpus once '
                                            'into CORPUS/tokens.bin (+ tokenizer.json, corpus.json); then train.py --data CORPUS '
                                            'reads its blocks in place')
    p.add_argument('--prepare', action='store_true', required=True, help='tokenize --data into --out')
    p.add_argument('--data', required=True, help='a .txt file or a folder of them (searched recursively)')
    p.add_argument('--out', required=True, help='a new folder for tokens.bin, tokenizer.json and corpus.json')
    group = p.add_mutually_exclusive_group()
    group.add_argument('--vocab-size', type=int, default=50_000, help='train a byte-level BPE of this many tokens (default 50,000)')
    group.add_argument('--tokenizer', default='', help='tokenizer.json, or a folder with vocab.json + merges.txt, instead')
    p.add_argument('--encoding', default='utf-8', help='the encoding of the .txt files')
    p.add_argument('--strict-data', action='store_true', help='stop at a file that does not decode, instead of skipping it')
    args = p.parse_args()
    try:
        h = prepare_corpus(args.data, args.out, args.vocab_size, args.tokenizer, args.encoding, args.strict_data)
    except DataError as e:
        raise SystemExit(f'data.text: error: {e}')
    print(f"{args.out}: {h['tokens']:,} tokens ({h['dtype']}, {Path(args.out, TOKENS).stat().st_size / 2**20:.1f} MiB) from "
          f"{h['documents']:,} documents in {h['files']} files ({h['bytes'] / 2**20:.1f} MiB of text); vocabulary "
          f"{h['vocab_size']:,}" + (f"; skipped {len(h['unreadable'])} unreadable files, e.g. {h['unreadable'][0]}" if h['unreadable'] else ''))

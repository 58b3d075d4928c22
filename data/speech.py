"""Speech data: an embedded synthetic corpus (no download, no file) and a reader for real audio folders.

SyntheticSpeech(n, seed)  utterances of 1–4 s at 16 kHz made of phone-like units (voiced harmonics shaped
                          by formants with a pitch contour, noise bands, plosive bursts, silences), each
                          with its transcript: upper-case letters and spaces, one letter per unit.
AudioFolder(root)         every .wav/.flac under root; transcripts from LibriSpeech-style *.trans.txt.
Both return (waveform float32 (S,), transcript str). `crop_and_pad` batches them.

pretraining_data, collate         train.py's speech: crops (the shortest clip's length, or padded) and span masks
labelled_set, embedded, labelled_collate, CTC_VOCAB   finetune.py's: letter CTC or clip classes, SpecAugment masks
bench_data                        bench.py's noise clips of a fixed length
"""
import struct
from functools import partial
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from data import DataError, Repeat
from data.manifest import FileList, list_files, read_headers
from encoders import conv_output_length
from masking import block_mask_1d, span_mask, visible_order

SR = 16_000
MIN_SECONDS = 0.25                      # shorter files are left out of pretraining (12 frames)
MIN_LABELLED = 400                      # labelled clips need one frame (the conv encoder's receptive field, in samples)


# ---------------------------------------------------------------------------------------------- synthetic corpus
# formants (Hz) of voiced units; noise bands (Hz) of fricatives and plosive bursts
VOWELS = {'A': (730, 1090, 2440), 'E': (530, 1840, 2480), 'I': (270, 2290, 3010), 'O': (570, 840, 2410), 'U': (300, 870, 2240)}
SONORANTS = {'M': (250, 1100, 2300), 'N': (250, 1700, 2600), 'L': (360, 1300, 2700), 'R': (420, 1300, 1600)}
FRICATIVES = {'S': (4000, 7500), 'F': (1200, 7000), 'H': (400, 2500)}
PLOSIVES = {'P': (300, 1500), 'T': (3000, 6500), 'K': (1500, 3200)}
CONSONANTS = ''.join(SONORANTS) + ''.join(FRICATIVES) + ''.join(PLOSIVES)


def _lexicon(rng, size=64):
    """Pronounceable words of 1–3 (C)V(C) syllables, fixed by the seed."""
    def pick(letters, prob=1.0):
        return str(rng.choice(list(letters))) if rng.random() < prob else ''
    words = set()
    while len(words) < size:
        words.add(''.join(pick(CONSONANTS, 0.8) + pick(VOWELS) + pick('MNLRST', 0.3) for _ in range(rng.integers(1, 4))))
    return list(rng.permutation(sorted(words)))                              # random order: Zipf ranks are not alphabetical


def _fade(n, ms=8):
    """Raised-cosine onset and offset, so units join without clicks."""
    env, k = np.ones(n), min(int(ms * SR / 1000), n // 2)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, k))
    env[:k], env[n - k:] = ramp, ramp[::-1]
    return env


def _voiced(phase, f0, formants, scale):
    """Harmonics of f0 up to 5 kHz, weighted by Gaussian formant resonances and a −3 dB/octave tilt."""
    h = np.arange(1, int(5000 / f0) + 1)                                                       # harmonic numbers
    amp = sum(np.exp(-0.5 * ((h * f0 - F * scale) / (60 + 0.08 * F)) ** 2) / (i + 1) for i, F in enumerate(formants))
    amp = amp / np.sqrt(h)
    return (amp[:, None] * np.sin(h[:, None] * phase[None])).sum(0) / (amp.sum() + 1e-9)


def _noise(rng, n, lo, hi):
    """White noise band-passed to [lo, hi] Hz with an FFT mask, unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    x = np.fft.irfft(spec * ((f >= lo) & (f <= hi)), n)
    return x / (x.std() + 1e-9)


class SyntheticSpeech(torch.utils.data.Dataset):
    """Deterministic synthetic speech: utterance i depends only on (seed, split, i); nothing is stored.

    Each utterance has its own speaker (pitch 90–250 Hz, formant scale, speaking rate) and says
    words from a 64-word lexicon drawn from a Zipf distribution, so context predicts content.
    """

    def __init__(self, size=2048, seed=0, split='train'):
        self.size, self.seed, self.split_id = size, seed, {'train': 0, 'valid': 1}[split]
        self.lexicon = _lexicon(np.random.default_rng([seed, 7]))
        zipf = 1 / np.arange(1, len(self.lexicon) + 1)
        self.word_probs = zipf / zipf.sum()

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self.split_id, i])
        f0, scale, rate = rng.uniform(90, 250), rng.uniform(0.88, 1.15), rng.uniform(0.85, 1.2)
        target = rng.uniform(0.8, 3.6)                                     # seconds of words; silences pad to 1–4 s
        words, dur = [], 0.0
        while not words or dur < target:
            w = self.lexicon[rng.choice(len(self.lexicon), p=self.word_probs)]
            if words and dur + 0.11 * len(w) / rate > target:
                break
            words.append(w)
            dur += 0.11 * len(w) / rate + 0.08
        pieces = [np.zeros(int(rng.uniform(0.05, 0.2) * SR))]
        n_total = int(4.2 * SR)
        t = np.arange(n_total) / SR                                        # pitch contour: declination + slow swing
        f0_track = f0 * (1 - 0.12 * t / 4) * (1 + 0.12 * np.sin(2 * np.pi * rng.uniform(0.3, 1.2) * t + rng.uniform(0, 6)))
        phase = 2 * np.pi * np.cumsum(f0_track) / SR
        pos = len(pieces[0])
        for wi, word in enumerate(words):
            for letter in word:
                n = int(rng.uniform(0.07, 0.14) / rate * SR)
                if letter in VOWELS or letter in SONORANTS:
                    gain = 1.0 if letter in VOWELS else 0.45
                    x = gain * _voiced(phase[pos:pos + n], f0_track[pos:pos + n].mean(), (VOWELS | SONORANTS)[letter], scale)
                elif letter in FRICATIVES:
                    x = 0.25 * _noise(rng, n, *FRICATIVES[letter])
                else:                                                      # plosive: closure, burst, aspiration
                    n = int(0.09 / rate * SR)
                    x = np.zeros(n)
                    burst = int(0.025 * SR)
                    x[n - burst:] = 0.6 * _noise(rng, burst, *PLOSIVES[letter]) * np.exp(-np.arange(burst) / (0.006 * SR))
                pieces.append(x * _fade(len(x)))
                pos += len(x)
            gap = np.zeros(int(rng.uniform(0.03, 0.12) * SR)) if wi < len(words) - 1 else np.zeros(0)
            pieces.append(gap)
            pos += len(gap)
        wav = np.concatenate(pieces)
        wav = np.concatenate([wav, np.zeros(max(int(SR * rng.uniform(1.0, 1.2)) - len(wav), int(0.05 * SR)))])[:4 * SR]
        wav = wav * rng.uniform(0.1, 0.5) + 0.003 * rng.standard_normal(len(wav))  # loudness and a little background noise
        return wav.astype(np.float32), ' '.join(words)


# ---------------------------------------------------------------------------------------------- real audio
def resample(wav, orig_sr, new_sr, zeros=16, rolloff=0.945):
    """Band-limited resampling with a Hann-windowed sinc, computed as a polyphase strided conv.

    With up/down = new_sr/orig_sr in lowest terms, output sample m sits at input time m·down/up and
        y[m] = Σ_n x[n] h(m·down/up − n),   h(t) = c·sinc(c·t)·cos²(π t / 2W) for |t| ≤ W,
    where c = rolloff·min(1, up/down) is the cutoff as a fraction of the input Nyquist (anti-aliasing
    when downsampling) and W = zeros/c input samples. wav: (S,) numpy or tensor → float32 tensor.
    """
    wav = torch.as_tensor(wav, dtype=torch.float32)
    if orig_sr == new_sr:
        return wav
    g = gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    c = rolloff * min(1.0, up / down)
    W = int(np.ceil(zeros / c))
    k = torch.arange(-W, W + down, dtype=torch.float64)                    # input offsets seen by one output phase
    t = torch.arange(up, dtype=torch.float64)[:, None] * down / up - k     # (up, taps): time from each input sample
    h = c * torch.sinc(c * t) * torch.where(t.abs() <= W, torch.cos(np.pi * t / (2 * W)) ** 2, 0.0)
    x = F.pad(wav[None, None].double(), (W, W + down))                     # (1, 1, S + pad)
    y = F.conv1d(x, h[:, None], stride=down)                      # (1, up, frames): phase j at frame q → output q·up + j
    out_len = int(np.ceil(len(wav) * up / down))
    return y[0].T.reshape(-1)[:out_len].float()


def _wav_truncated(path):
    """True if a RIFF/WAVE file holds fewer data bytes than its header declares (libsndfile reads it silently)."""
    with open(path, 'rb') as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b'RIFF' or head[8:12] != b'WAVE':
            return False
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return False
            cid, size = chunk[:4], struct.unpack('<I', chunk[4:])[0]
            if cid == b'data':
                return len(f.read(size)) < size
            f.seek(size + (size & 1), 1)


def read_audio(path, sample_rate=SR):
    """Read a .wav/.flac file as mono float32 at `sample_rate`: stereo is averaged, other rates resampled."""
    try:
        with sf.SoundFile(str(path)) as f:
            sr, data = f.samplerate, f.read(dtype='float32', always_2d=True)   # (S, channels)
    except Exception as e:                                                       # libsndfile: bad header, lost sync, ...
        raise DataError(f'{path}: cannot read audio ({e})') from None
    if len(data) == 0:
        raise DataError(f'{path}: the file holds no audio samples')
    if str(path).lower().endswith('.wav') and _wav_truncated(path):
        raise DataError(f'{path}: truncated (fewer samples than its header declares)')
    return resample(data.mean(1), sr, sample_rate)


class AudioFolder(torch.utils.data.Dataset):
    """Every .wav/.flac under root (sorted), with transcripts from LibriSpeech-style `*.trans.txt` files

    ('<utterance id> <TEXT>' per line, id = file stem); '' where there is none. `lengths` (in samples at
    `sample_rate`) come from the file headers, read at the first start-up and kept in a manifest (data/manifest.py).
    Files shorter than `min_samples` are left out and listed in `skipped`; a file whose header cannot be read is an error (`strict`) or left out with its error in `unreadable`.
    """

    def __init__(self, root, sample_rate=SR, min_samples=0, strict=True):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f'--data {root}: no such directory')
        rels = list_files(root, ('.wav', '.flac'))                        # str: data/manifest.py
        if not rels:
            raise DataError(f'--data {root}: no .wav or .flac files under it')
        self.sample_rate = sample_rate
        headers, self.headers_read = read_headers(root, rels, self._header, 'audio')
        self.unreadable = [h for h in headers if isinstance(h, str)]
        if self.unreadable and (strict or len(self.unreadable) == len(rels)):      # or nothing is left to train on
            raise DataError(self.unreadable[0])
        lengths = [-1 if isinstance(h, str) else round(h[0] * sample_rate / h[1]) for h in headers]
        self.skipped = [root / rel for rel, n in zip(rels, lengths) if 0 <= n < min_samples]
        self.notes = [f'skipped {len(self.skipped)} files shorter than {min_samples / sample_rate} s, e.g. {self.skipped[0]}'] \
            if self.skipped else []
        kept = [(rel, n) for rel, n in zip(rels, lengths) if n >= min_samples]
        if not kept:
            raise DataError(f'--data {root}: every audio file is shorter than {min_samples} samples')
        self.files, self.lengths = FileList(root, [rel for rel, _ in kept]), [n for _, n in kept]   # files[i] → Path
        self.transcripts, self.transcript_lines = {}, {}                 # id → text, id → 'file:line' (for errors)
        for tf in sorted(root.rglob('*.trans.txt')):
            for n, line in enumerate(tf.read_text(encoding='utf-8').splitlines(), 1):
                if line.strip():
                    uid, _, text = line.strip().partition(' ')
                    self.transcripts[uid], self.transcript_lines[uid] = text, f'{tf}:{n}'

    @staticmethod
    def _header(path):
        """(frames, sample rate) from the file's header."""
        try:
            info = sf.info(str(path))
        except Exception as e:
            raise DataError(f'{path}: cannot read audio ({e})') from None
        if info.frames == 0:
            raise DataError(f'{path}: the file holds no audio samples')
        return info.frames, info.samplerate

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        return read_audio(path, self.sample_rate).numpy(), self.transcripts.get(path.stem, '')


def crop_and_pad(waves, max_len, generator=None):
    """Random crop of each waveform to ≤ max_len samples, then right-pad to the longest.

    Returns source (B, S) float32 and padding_mask (B, S) bool (True = padding).
    """
    crops = []
    for w in waves:
        w = torch.as_tensor(w)
        if len(w) > max_len:
            start = int(torch.randint(len(w) - max_len + 1, (), generator=generator))
            w = w[start:start + max_len]
        crops.append(w)
    S = max(len(w) for w in crops)
    source = torch.zeros(len(crops), S)
    padding_mask = torch.ones(len(crops), S, dtype=torch.bool)
    for b, w in enumerate(crops):
        source[b, :len(w)], padding_mask[b, :len(w)] = w, False
    return source, padding_mask


# ---------------------------------------------------------------------------------------------- pretraining batches
def pretraining_data(mcfg, cfg, resume_dir=None):
    """(dataset, collate) for train.py: --data (an AudioFolder) or the embedded corpus."""
    dataset = (AudioFolder(cfg.data, min_samples=int(MIN_SECONDS * SR), strict=cfg.strict_data) if cfg.data else
               SyntheticSpeech(seed=0))
    return dataset, partial(collate_v2 if mcfg.version == 2 else collate, cfg=cfg)


def crop(items, cfg, generator=None):
    """Crops of the shortest clip's length rounded down to --crop-step (fairseq crops every clip to the shortest, so
    nothing is padded; the rounding bounds the shapes torch.compile meets), or ≤ --crop and padded (--pad).
    → source (B, S), padding_mask (B, S)."""
    waves = [w for w, _ in items]
    shortest = min(len(w) for w in waves)
    longest = cfg.crop if cfg.pad else min(cfg.crop, shortest // cfg.crop_step * cfg.crop_step or shortest)
    return crop_and_pad(waves, longest, generator)


def collate(items, cfg, generator=None):
    """Items → dict(source (B, S), padding_mask (B, S) or None, mask (B, T)), every random draw from `generator`:
    crops, then span masks."""
    source, padding_mask = crop(items, cfg, generator)                   # (B, S)
    frames = conv_output_length((~padding_mask).sum(1))                   # (B,) valid frames
    mask = span_mask(frames, conv_output_length(source.shape[1]), cfg.mask_prob, cfg.mask_length, generator=generator)
    return dict(source=source, padding_mask=padding_mask if padding_mask.any() else None, mask=mask)


def collate_v2(items, cfg, generator=None):
    """data2vec 2.0: items → dict(source (B, S), mask (B·M, T), ids_keep (B·M, T_keep), ids_restore (B·M, T)):
    crops as collate (never padded), then M = --clones block masks per clip (rows b·M … b·M + M − 1 are clip b's),
    each with exactly int(T·p) masked frames, and the order that keeps the visible ones."""
    source, _ = crop(items, cfg, generator)                              # (B, S), no padding (--pad is v1's)
    mask = block_mask_1d(len(items) * cfg.clones, conv_output_length(source.shape[1]), cfg.mask_prob, cfg.mask_length,
                         cfg.mask_adjust, generator)                      # (B·M, T)
    ids_keep, ids_restore = visible_order(mask)
    return dict(source=source, mask=mask, ids_keep=ids_keep, ids_restore=ids_restore)


def bench_data(mcfg, cfg, size, seconds, seed=0):
    """bench.py: `size` clips of `seconds` of noise (a pool of 4 × --batch-size), the collate (--crop raised to the clips'
    length: nothing is cropped shorter), and the shape: frames per clip, seconds."""
    samples = round(seconds * SR)
    cfg.crop = max(samples, SR)
    pool = 0.1 * torch.randn(4 * cfg.batch_size, samples, generator=torch.Generator().manual_seed(seed))   # (n, S)
    return (Repeat(pool, '', size), partial(collate_v2 if mcfg.version == 2 else collate, cfg=cfg),
            dict(seconds=seconds, tokens_per_sample=conv_output_length(samples)))


# ---------------------------------------------------------------------------------------------- labelled (fine-tuning)
BLANK, LETTERS = '<blank>', "|ABCDEFGHIJKLMNOPQRSTUVWXYZ'"    # wav2vec 2.0's letter dictionary; '|' = word boundary
CTC_VOCAB = [BLANK] + list(LETTERS)                           # blank = 0


def encode_transcript(text, where=''):
    """'Hello world' → ids of H E L L O | W O R L D. Letters are upper-cased and runs of spaces are one boundary; any other
    character (digits, punctuation but the apostrophe) is an error naming `where` (file:line)."""
    text = ' '.join(text.upper().split())
    bad = sorted(set(text) - set(LETTERS) - {' '})
    if bad or not text:
        raise DataError(f'{where}: transcript {text[:60]!r} ' + (f'has characters outside the CTC vocabulary A–Z, \' and space: '
                        f'{"".join(bad)!r}' if bad else 'is empty') + '; normalise it first (e.g. numbers as words)')
    return [CTC_VOCAB.index('|' if c == ' ' else c) for c in text]


def labelled_set(path, cfg, mcfg):
    """(dataset of (waveform, transcript or ''), targets: the folder names (classify) or transcript ids (ctc))."""
    ds = AudioFolder(path, min_samples=MIN_LABELLED, strict=cfg.strict_data)   # a short spoken digit is still an example
    if cfg.task == 'classify':
        return ds, [f.parent.name for f in ds.files]
    missing = [f for f in ds.files if f.stem not in ds.transcripts]
    if missing:
        raise DataError(f'{missing[0]}: no transcript (expected a line "{missing[0].stem} TEXT" in a *.trans.txt under {path})')
    return ds, [encode_transcript(ds.transcripts[f.stem], ds.transcript_lines[f.stem]) for f in ds.files]


def embedded(split, mcfg):
    """The embedded corpus with its transcripts (no classes: --task classify needs --data)."""
    return SyntheticSpeech(2048 if split == 'train' else 256, split=split)


def labelled_collate(items, cfg, mcfg, train, generator=None):
    """→ dict(source (B, S), padding_mask, labels, lengths (ctc) or None, mask (B, T), channel_mask (B, D)).
    Classification crops training clips to --crop (CTC never crops); SpecAugment-style masks while training."""
    inputs, targets = [x for x, _ in items], [y for _, y in items]
    source, padding_mask = crop_and_pad(inputs, cfg.crop if cfg.task == 'classify' and train else 10 ** 9, generator)  # (B, S)
    if cfg.task == 'ctc':                                          # embedded speech: transcripts as text
        targets = [encode_transcript(t, 'embedded speech') if isinstance(t, str) else t for t in targets]
        labels, lengths = torch.tensor([c for t in targets for c in t]), torch.tensor([len(t) for t in targets])
    else:
        labels, lengths = torch.tensor(targets), None
    time_mask = channel_mask = None
    if train and cfg.mask_prob > 0:
        frames = conv_output_length((~padding_mask).sum(1))                      # (B,)
        time_mask = span_mask(frames, conv_output_length(source.shape[1]), cfg.mask_prob, cfg.mask_length, generator=generator)
    if train and cfg.mask_channel_prob > 0:
        channel_mask = span_mask(torch.full((len(items),), mcfg.dim), mcfg.dim, cfg.mask_channel_prob, cfg.mask_channel_length,
                                 generator=generator)  # (B, D)
    return dict(source=source, padding_mask=padding_mask if padding_mask.any() else None, labels=labels, lengths=lengths,
                mask=time_mask, channel_mask=channel_mask)


# ---------------------------------------------------------------------------------------------- the spoken digits
def split_fsdd(root, out, join=4, passes=4, seed=0):
    """The Free Spoken Digit Dataset's official split as folders finetune.py and train.py read:

        out/train/<digit>/, out/test/<digit>/   links to root/recordings/{digit}_{speaker}_{index}.wav; index 0–4 = test
        out/unlabelled/                         pretraining utterances: the training clips joined `join` at a time
                                                (about 1.8 s), in `passes` seeded orders, so each clip appears `passes`
                                                times in other company. No test clip is in it.

    Why joined: a digit lasts 0.44 s (median), about 22 frames, less than the conv positional encoder's reach (5 × 18
    frames). Pretrained on single clips, the teacher's targets came to encode the frame's place in the clip (LOG.md,
    2026-11-30: position alone explained 93% of their variance after 1500 updates), and the features lost the digit.
    → {'train': n, 'test': n, 'unlabelled': n}."""
    files = sorted(Path(root).glob('recordings/*_*_*.wav')) or sorted(Path(root).glob('*_*_*.wav'))
    if not files:
        raise DataError(f'{root}: no <digit>_<speaker>_<index>.wav files (in it or in its recordings/ folder)')
    counts, train = {'train': 0, 'test': 0, 'unlabelled': 0}, []
    for f in files:
        digit, _, index = f.stem.split('_')
        split = 'test' if int(index) < 5 else 'train'
        link = Path(out) / split / digit / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(f.resolve())
        counts[split] += 1
        train += [f] if split == 'train' else []
    (Path(out) / 'unlabelled').mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for p in range(passes):
        order = rng.permutation(len(train))
        for g in range(0, len(order), join):
            wavs = [sf.read(str(train[i]), dtype='float32', always_2d=True) for i in order[g:g + join]]
            rate = wavs[0][1]
            assert all(r == rate for _, r in wavs), 'the clips of one utterance share a sample rate'
            sf.write(str(Path(out) / 'unlabelled' / f'joined{p}_{g // join:04d}.wav'), np.concatenate([w.mean(1) for w, _ in wavs]), rate)
            counts['unlabelled'] += 1
    return counts


if __name__ == '__main__':
    import argparse
    p = argparse.ArgumentParser(description='python -m data.speech --fsdd ROOT --out DIR: the spoken digits\' official split '
                                            'as DIR/train/<digit>/, DIR/test/<digit>/ (links) and DIR/unlabelled/ (joined '
                                            'training clips, for pretraining)')
    p.add_argument('--fsdd', required=True, help='the Free Spoken Digit Dataset folder (holding recordings/)')
    p.add_argument('--out', required=True, help='where the split goes')
    p.add_argument('--join', type=int, default=4, help='training clips per pretraining utterance')
    p.add_argument('--passes', type=int, default=4, help='how many seeded orders of the training clips are joined')
    args = p.parse_args()
    try:
        print(f'{args.out}: {split_fsdd(args.fsdd, args.out, args.join, args.passes)}')
    except DataError as e:
        raise SystemExit(f'error: {e}')

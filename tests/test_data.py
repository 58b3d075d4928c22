"""Speech data: synthetic corpus, resampler, real files and bad files.   pytest tests/test_data.py"""
import numpy as np
import pytest
import torch

from data import DataError
from data.speech import SR, AudioFolder, SyntheticSpeech, crop_and_pad, read_audio, resample


def test_synthetic_corpus_is_deterministic_with_transcripts():
    ds = SyntheticSpeech(size=16, seed=3)
    w1, t1 = ds[5]
    w2, t2 = SyntheticSpeech(size=16, seed=3)[5]
    assert np.array_equal(w1, w2) and t1 == t2
    assert not np.array_equal(ds[6][0][:16000], w1[:16000])
    for i in range(16):
        wav, text = ds[i]
        assert wav.dtype == np.float32 and 1.0 <= len(wav) / SR <= 4.0
        assert text and set(text) <= set('AEIOUMNLRSFHPTK ')
        assert np.isfinite(wav).all() and wav.std() > 0.01


@pytest.mark.parametrize('orig', [8000, 22050, 44100])
def test_resampler_keeps_a_tone_and_removes_what_is_above_nyquist(orig):
    t = np.arange(2 * orig) / orig
    y = resample(np.sin(2 * np.pi * 440 * t), orig, SR).numpy()
    assert len(y) == 2 * SR
    ref = np.sin(2 * np.pi * 440 * np.arange(len(y)) / SR)
    assert np.abs(y - ref)[100:-100].max() < 1e-3                     # away from the edges
    if orig > SR:                                                     # an 11 kHz tone cannot exist at 16 kHz: filtered, not aliased
        alias = resample(np.sin(2 * np.pi * 11_000 * t), orig, SR).numpy()
        assert alias[100:-100].std() < 1e-3


def test_crop_and_pad():
    g = torch.Generator().manual_seed(0)
    waves = [np.ones(100, np.float32), np.arange(500, dtype=np.float32)]
    source, pad = crop_and_pad(waves, 300, g)
    assert source.shape == pad.shape == (2, 300)
    assert pad[0, 100:].all() and not pad[0, :100].any() and not pad[1].any()
    assert (source[1, 1:] - source[1, :-1] == 1).all()               # a contiguous crop


def test_real_files_flac_wav_and_odd_rates(shared_data):
    ls = AudioFolder(shared_data / 'speech' / 'ljspeech_librispeech_layout')
    assert len(ls) == 32
    wav, text = ls[1]
    assert text == 'IN BEING COMPARATIVELY MODERN'                    # from LJ-001.trans.txt
    import soundfile as sf
    assert len(wav) == sf.info(str(ls.files[1])).frames               # already 16 kHz: untouched length
    rates = shared_data / 'speech' / 'other_rates'
    for name, rate in [('LJ001-0001_22050hz.wav', 22050), ('LJ001-0002_44100hz_stereo.wav', 44100), ('yes_8000hz.wav', 8000)]:
        info = sf.info(str(rates / name))
        audio = read_audio(rates / name)
        assert audio.ndim == 1 and abs(len(audio) - info.frames * SR / rate) <= 1
        assert audio.abs().max() > 0.01
    commands = AudioFolder(shared_data / 'speech' / 'speech_commands')
    assert len(commands) == 300 and commands[0][1] == ''
    assert len(commands[0][0]) <= SR


def test_bad_files_get_errors_naming_them(shared_data, tmp_path):
    flac = (shared_data / 'speech' / 'ljspeech_librispeech_layout' / 'LJ' / '001' / 'LJ-001-0001.flac').read_bytes()
    wav = (shared_data / 'speech' / 'other_rates' / 'LJ001-0001_22050hz.wav').read_bytes()
    cases = {'truncated.flac': flac[:len(flac) // 2], 'truncated.wav': wav[:len(wav) // 2],
             'empty.wav': b'', 'header_only.wav': wav[:44]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=name):
            read_audio(tmp_path / name)


def test_missing_or_empty_data_folder(tmp_path):
    with pytest.raises(DataError, match='no such directory'):
        AudioFolder(tmp_path / 'nope')
    with pytest.raises(DataError, match='no .wav or .flac'):
        AudioFolder(tmp_path)


def test_too_short_files_are_skipped_and_listed(tmp_path):
    import soundfile as sf
    sf.write(str(tmp_path / 'long.wav'), np.zeros(8000, np.float32) + 0.1, SR)
    sf.write(str(tmp_path / 'blip.wav'), np.zeros(300, np.float32) + 0.1, SR)
    ds = AudioFolder(tmp_path, min_samples=4000)
    assert len(ds) == 1 and ds.lengths == [8000] and [p.name for p in ds.skipped] == ['blip.wav']
    with pytest.raises(DataError, match='shorter than 9000'):
        AudioFolder(tmp_path, min_samples=9000)


def test_fsdd_split_follows_the_official_index_rule_and_joins_only_training_clips(tmp_path):
    """split_fsdd: index 0–4 → test, 5+ → train, as links by digit; unlabelled/ joins the training clips `join` at a
    time in `passes` orders. Each clip holds one constant value (its number), so the joined files can be read back:
    every training clip appears exactly `passes` times, whole, and no test clip appears at all."""
    import soundfile as sf
    from data.speech import split_fsdd
    root = tmp_path / 'fsdd' / 'recordings'
    root.mkdir(parents=True)
    value, n = {}, 0
    for digit in range(3):
        for speaker in ('jackson', 'theo'):
            for index in range(8):
                n += 1
                name = f'{digit}_{speaker}_{index}'
                value[name] = n / 64                                  # exact in 16-bit PCM: a multiple of 2⁻¹⁵
                sf.write(root / f'{name}.wav', np.full(100 + n, value[name], np.float32), 8000)
    counts = split_fsdd(tmp_path / 'fsdd', tmp_path / 'out', join=4, passes=3)
    train = sorted(p.stem for p in (tmp_path / 'out' / 'train').glob('*/*.wav'))
    test = sorted(p.stem for p in (tmp_path / 'out' / 'test').glob('*/*.wav'))
    assert test == sorted(k for k in value if int(k.split('_')[2]) < 5) and len(test) == 3 * 2 * 5
    assert train == sorted(k for k in value if int(k.split('_')[2]) >= 5) and len(train) == 3 * 2 * 3
    assert all(p.parent.name == p.stem.split('_')[0] and p.resolve().parent == root.resolve()
               for p in (tmp_path / 'out').glob('t*/*/*.wav'))       # links into recordings/, under their digit
    joined = sorted((tmp_path / 'out' / 'unlabelled').glob('*.wav'))
    assert counts == dict(train=18, test=30, unlabelled=len(joined)) and len(joined) == 3 * 5   # ⌈18 / 4⌉ per pass
    seen = {}
    for f in joined:
        wav, rate = sf.read(f, dtype='float32')
        assert rate == 8000
        runs = np.split(wav, np.flatnonzero(np.diff(wav)) + 1)           # constant stretches = the clips
        assert 1 <= len(runs) <= 4
        for r in runs:
            name = next(k for k, v in value.items() if abs(v - r[0]) < 1e-6)
            assert len(r) == 100 + round(value[name] * 64)           # the whole clip
            seen[name] = seen.get(name, 0) + 1
    assert seen == {k: 3 for k in train}

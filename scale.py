"""Full-scale data paths, measured on this machine (README, "Full scale"): what grows with the data, and what does not.

    python scale.py memory  --sizes 1 10 100 --out results/full-scale     # peak RSS of train.py --modality text
    python scale.py startup --files 100000 --out results/full-scale       # start-up over a tree of small files

memory: synthetic corpora of 1, 10, 100 MB (folders of 1 MB .txt files of pseudo-words), and for each the peak
resident memory (RSS: os.wait4's ru_maxrss of the process) of `train.py --modality text --data …` for --steps updates,
in memory (read, tokenize and pack the whole corpus; a BPE trained on it) against a prepared corpus read in place
(`python -m data.text --prepare` first, its own peak RSS and time reported too). Same preset, same tokenizer size.

startup: a tree of N tiny .wav files (and N tiny .png images in class folders), then the time to build the dataset
(data.speech.AudioFolder, data.vision.ImageFolder) in a fresh process, after its imports: the first run (no
manifest: every header read) with the page cache dropped where this machine allows it (cold, as a first pass over a
network filesystem would be) and again warm, then later runs (the manifest: one stat per file). Results: tables
(.md) and the numbers (.json); memory also a plot (.png).
Each measurement is resumable: a finished one is kept in the .json and not run again.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent


def run_peak(cmd, env=None):
    """Run cmd (one thread); → (wall seconds, peak RSS in MiB of the process from os.wait4, its output). A failure stops
    with the output's end."""
    t = time.time()
    with open(ROOT / '.scale.log', 'w') as log:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS='1', **(env or {})))
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    out = (ROOT / '.scale.log').read_text()
    if p.returncode != 0:
        raise SystemExit(f'{" ".join(map(str, cmd))} failed:\n{out[-3000:]}')
    return time.time() - t, usage.ru_maxrss / 1024, out


def pseudo_words(n, seed=0):
    """n pronounceable pseudo-words (consonant-vowel syllables), a vocabulary with Zipf frequencies to draw from."""
    r = np.random.default_rng(seed)
    syllables = [c + v for c in 'bcdfghklmnprstvz' for v in 'aeiou']
    return [''.join(r.choice(syllables, r.integers(1, 4))) for _ in range(n)]


def write_corpus(folder, megabytes, seed=0):
    """folder/partNNN.txt, 1 MB each (the last one the remainder): paragraphs of 40–200 Zipf-drawn pseudo-words."""
    folder.mkdir(parents=True, exist_ok=True)
    words, r = np.array(pseudo_words(20_000, seed)), np.random.default_rng(seed + 1)
    p = 1 / np.arange(1, len(words) + 1)
    p /= p.sum()
    for k in tqdm(range(int(np.ceil(megabytes))), desc=f'writing {megabytes} MB', leave=False):
        paragraphs, size = [], 0
        while size < min(1.0, megabytes - k) * 2**20:
            text = ' '.join(words[r.choice(len(words), r.integers(40, 200), p=p)]) + '.'
            paragraphs.append(text)
            size += len(text) + 2
        (folder / f'part{k:03d}.txt').write_text('\n\n'.join(paragraphs) + '\n')


def memory(args):
    out, work = Path(args.out), Path(args.work)
    path = out / 'memory.json'
    results = json.loads(path.read_text()) if path.exists() else {}
    train = [sys.executable, 'train.py', '--modality', 'text', '--steps', str(args.steps), '--workers', '0', '--log-every', '5',
             '--ckpt-every', str(args.steps), '--vocab-size', str(args.vocab_size)]
    for mb in args.sizes:
        key = f'{mb:g} MB'
        if key in results:
            continue
        src, prepared = work / f'text-{mb:g}MB', work / f'text-{mb:g}MB-prepared'
        shutil.rmtree(src, ignore_errors=True), shutil.rmtree(prepared, ignore_errors=True)
        write_corpus(src, mb)
        row = dict(megabytes=mb, text_bytes=sum(f.stat().st_size for f in src.glob('*.txt')))
        t, rss, _ = run_peak([sys.executable, '-m', 'data.text', '--prepare', '--data', str(src), '--out', str(prepared),
                              '--vocab-size', str(args.vocab_size)])
        header = json.loads((prepared / 'corpus.json').read_text())
        row.update(prepare_s=t, prepare_rss_mib=rss, tokens=header['tokens'], token_file_bytes=(prepared / 'tokens.bin').stat().st_size)
        for mode, data in (('in_memory', src), ('prepared', prepared)):
            run = work / f'run-{mb:g}MB-{mode}'
            shutil.rmtree(run, ignore_errors=True)
            for cache in src.glob('.bpe-*.json'):
                cache.unlink()                                    # the in-memory run trains its BPE, as a first run does
            t, rss, log = run_peak(train + ['--data', str(data), '--out', str(run)])
            row[f'{mode}_s'], row[f'{mode}_rss_mib'] = t, rss
            row[f'{mode}_final_loss'] = json.loads((run / 'log.jsonl').read_text().splitlines()[-1])['loss']
            shutil.rmtree(run)
        results[key] = row
        print(json.dumps(row))
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        shutil.rmtree(src), shutil.rmtree(prepared)
    rows = [results[f'{mb:g} MB'] for mb in args.sizes]
    table = ['| corpus | tokens | token file | in memory: peak RSS | time | prepared: `--prepare` peak RSS | time | '
             'train.py peak RSS | time |', '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        table.append(f"| {r['megabytes']:g} MB | {r['tokens']:,} | {r['token_file_bytes'] / 2**20:.1f} MiB | "
                     f"**{r['in_memory_rss_mib']:.0f} MiB** | {r['in_memory_s']:.0f} s | {r['prepare_rss_mib']:.0f} MiB | "
                     f"{r['prepare_s']:.0f} s | **{r['prepared_rss_mib']:.0f} MiB** | {r['prepared_s']:.0f} s |")
    if len(rows) > 1:                                         # growth per token between the smallest and largest corpus
        a, b = rows[0], rows[-1]
        for mode in ('in_memory', 'prepared'):
            slope = (b[f'{mode}_rss_mib'] - a[f'{mode}_rss_mib']) * 2**20 / (b['tokens'] - a['tokens'])
            table.append(f'\n{mode.replace("_", " ")}: {slope:.1f} bytes of peak RSS per token of corpus '
                         f'({a["megabytes"]:g} → {b["megabytes"]:g} MB)')
    (out / 'memory.md').write_text('\n'.join(table) + '\n')
    plot_memory(rows, out / 'memory.png')
    print('\n'.join(table))


STARTUP = """
import sys, time, resource
sys.path.insert(0, {root!r})
from data.speech import AudioFolder
from data.vision import ImageFolder
t = time.time()                                       # after the imports (torch: about a second)
ds = (AudioFolder if sys.argv[1] == 'audio' else ImageFolder)(sys.argv[2])
print(len(ds), ds.headers_read, time.time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def drop_page_cache():
    """Empty the page cache (root on Linux): the next read comes from the disk, as a first read from a network
    filesystem would. → whether it could."""
    try:
        os.sync()
        Path('/proc/sys/vm/drop_caches').write_text('3\n')
        return True
    except OSError:
        return False


def make_tree(root, n, kind):
    """n copies of one tiny file in folders of 1000: 0.1 s of 16 kHz silence (.wav), or an 8×8 .png, in class folders."""
    import soundfile as sf
    from PIL import Image
    if (root / 'done').exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    sample = root / 'sample'
    sample.parent.mkdir(parents=True)
    if kind == 'audio':
        sf.write(str(sample.with_suffix('.wav')), np.zeros(1600, np.float32), 16_000)
        data, ext = sample.with_suffix('.wav').read_bytes(), '.wav'
    else:
        Image.new('RGB', (8, 8), (100, 150, 200)).save(sample.with_suffix('.png'))
        data, ext = sample.with_suffix('.png').read_bytes(), '.png'
    for k in tqdm(range(n), desc=f'writing {n} {kind} files', leave=False):
        folder = root / 'tree' / f'd{k // 1000:03d}'
        if k % 1000 == 0:
            folder.mkdir(parents=True)
        (folder / f'f{k:06d}{ext}').write_bytes(data)
    (root / 'done').write_text('')


def startup(args):
    out, work = Path(args.out), Path(args.work)
    path = out / 'startup.json'
    results = json.loads(path.read_text()) if path.exists() else {}
    for kind in ('audio', 'images'):
        key = f'{kind} {args.files}'
        if key in results:
            continue
        root = work / f'tree-{kind}-{args.files}'
        make_tree(root, args.files, kind)
        tree = root / 'tree'
        for m in tree.glob('.data2vec-*.tsv'):
            m.unlink()
        runs = []
        for k, cold in enumerate([True, False, False, False] if args.cold else [False, False, False]):
            if k == 1 and args.cold:                              # the first run again, warm: the manifest removed
                for m in tree.glob('.data2vec-*.tsv'):
                    m.unlink()
            dropped = cold and drop_page_cache()
            t, rss, o = run_peak([sys.executable, '-c', STARTUP.format(root=str(ROOT)), kind.rstrip('s'), str(tree)])
            n, read, seconds, _ = o.split()[-4:]
            runs.append(dict(files=int(n), headers_read=int(read), seconds=float(seconds), process_s=t, rss_mib=rss,
                             cache_dropped=dropped))
            print(kind, runs[-1])
        manifest = next(tree.glob('.data2vec-*.tsv'))
        results[key] = dict(kind=kind, files=args.files, runs=runs, manifest_bytes=manifest.stat().st_size)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
    table = ['| files | run | headers read | dataset built in | process peak RSS |', '|---|---|---|---|---|']
    for r in results.values():
        for k, run in enumerate(r['runs']):
            what = ('first, page cache dropped' if run['cache_dropped'] else 'first (warm page cache)' if run['headers_read']
                    else f'later ({k})')
            table.append(f"| {r['files']:,} {r['kind']} | {what} | {run['headers_read']:,} | **{run['seconds']:.1f} s** | "
                         f"{run['rss_mib']:.0f} MiB |")
        table.append(f"| | manifest | {r['manifest_bytes'] / 2**20:.1f} MiB ({r['manifest_bytes'] / r['files']:.0f} bytes per file) | | |")
    (out / 'startup.md').write_text('\n'.join(table) + '\n')
    print('\n'.join(table))


def plot_memory(rows, path):
    """Peak RSS against corpus size, in memory and prepared."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, name in (('in_memory', 'in memory'), ('prepared', 'prepared (read in place)')):
        ax.plot([r['megabytes'] for r in rows], [r[f'{mode}_rss_mib'] for r in rows], 'o-', label=name)
    ax.set(xlabel='corpus (MB of text)', ylabel='peak RSS (MiB)', title='train.py --modality text: peak memory', xscale='log')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('what', choices=['memory', 'startup'])
    p.add_argument('--sizes', type=float, nargs='+', default=[1, 10, 100], help='memory: corpus sizes in MB')
    p.add_argument('--steps', type=int, default=20, help='memory: train.py updates per run')
    p.add_argument('--vocab-size', type=int, default=1500, help='memory: the BPE (the tiny preset\'s)')
    p.add_argument('--files', type=int, default=100_000, help='startup: files in the tree')
    p.add_argument('--cold', action=argparse.BooleanOptionalAction, default=True, help='startup: drop the page cache before the first run')
    p.add_argument('--out', default='results/full-scale')
    p.add_argument('--work', default='runs/scale', help='where the synthetic data go (removed after memory runs)')
    args = p.parse_args()
    memory(args) if args.what == 'memory' else startup(args)

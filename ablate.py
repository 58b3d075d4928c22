"""Ablations: sweep one train.py flag, score every run on labelled data, and plot the answer (paper §5.4).

    python ablate.py --modality speech --knob top-k --values 1 4 --seeds 0                   # embedded data, a fresh machine
    python -m data.speech --fsdd ../shared/data/speech/fsdd_2_speakers --out runs/fsdd             # the spoken digits
    python ablate.py --modality speech --knob target-layer --values attention ffn ffn_residual block --seeds 0 1 2 \\
        --data runs/fsdd/unlabelled --probe-data runs/fsdd/train --probe-test runs/fsdd/test --labeled 100 -- --preset small
    python ablate.py --modality speech --knob steps --values 250 500 1000 2000 ...           # a learning-speed curve
    python learning_speed.py --sweep v1=DIR --sweep v2=DIR --out DIR                       # curves compared: time to accuracy

For every value and seed: `train.py --KNOB VALUE --seed S` (the same seeds for every value, so the knob is the only
difference), then `finetune.py --init <its checkpoint> --seed S`: a linear probe (--score probe) or a full fine-tune.
Once per seed, the same architecture with random weights is scored the same way (the scratch baseline). Everything
after `--` goes to train.py as it is; --finetune-flags to finetune.py.

Outputs in --out: results.jsonl (a row per run), results.md (mean ± sample std per value, the scratch row, the paper's
direction), ablation.png (score against value, seed error bars, the scratch band; for --knob steps, against pretraining
wall time), curves.png (loss and target std against step, a line per value), runs/ (each run's own folders).
Resumable: run the same command again; finished runs are skipped and an interrupted one continues (train.py --resume).
"""
import argparse
import contextlib
import io
import json
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import matplotlib
import numpy as np
from tqdm import tqdm

from config import ModelConfig, TrainConfig, parse_finetune_args, parse_train_args

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent
OWN = ('modality', 'seed', 'out', 'resume', 'data')          # flags ablate.py sets itself
SETTINGS = ('modality', 'knob', 'score', 'data', 'probe_data', 'probe_test', 'labeled', 'task', 'probe_layers',
            'finetune_flags', 'train_flags')                   # what a resumed sweep must share with the first sitting
PAPER = {   # the paper's answer for the knobs of §5.4 (reference.md §5.1)
    'top_k': 'Figure 2: averaging the top K > 1 blocks beats K = 1 in every modality, "very pronounced" for speech and '
             'text, slight for vision; all blocks is nearly as good as the best K.',
    'teacher_context': 'Figure 3: the more context the teacher sees, the better (speech WER, vision accuracy); best with '
                       'the whole input (here W = 0).',
    'target_layer': 'Table 5 (speech, WER after fine-tuning): attention 100.0 (no usable model), ffn 13.1, '
                    'ffn_residual 14.8, block 14.5.',
    'loss_beta': 'Table 7 (speech WER): L2 17.1, Smooth L1 β 0.25–0.5 16.8, β 1 17.3: within noise.',
    'mask_prob': 'Table 8 (speech WER): 0.65 → 17.1, 0.8 → 17.2, 0.5 → 17.3.',
    'mask_length': 'Table 8 (speech WER): 10 → 17.1, 5 → 22.1, 15 → 18.9.',
    'steps': 'a learning-speed curve: the score against pretraining wall time.',
}


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    train_flags = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    p = argparse.ArgumentParser(prog='ablate.py', description='Sweep one train.py flag, score each run with finetune.py, plot. '
                                            'Flags after -- go to train.py.')
    p.add_argument('--modality', default='speech', help='speech | vision | text')
    p.add_argument('--knob', required=True, help='a train.py flag without its dashes, e.g. top-k, teacher-context, steps')
    p.add_argument('--values', nargs='+', required=True, help='the values to sweep (booleans: true false)')
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2], help='the same seeds for every value')
    p.add_argument('--score', choices=('probe', 'finetune'), default='probe', help='a linear probe, or full fine-tuning')
    p.add_argument('--data', default='', help='train.py --data: the unlabelled pretraining data (default: embedded)')
    p.add_argument('--probe-data', default='', help='finetune.py --data: labelled training data (default: embedded)')
    p.add_argument('--probe-test', default='', help='finetune.py --test-data: the held-out set')
    p.add_argument('--labeled', type=int, default=0, help='finetune.py --labeled: labelled examples used (0 = all)')
    p.add_argument('--task', default='', help="finetune.py --task (default: classify with --probe-data, else finetune.py's)")
    p.add_argument('--probe-layers', default='last', choices=('last', 'mean', 'weighted'),
                   help="finetune.py --probe-layers: what the probe reads")
    p.add_argument('--finetune-flags', default='', help='more finetune.py flags, one quoted string')
    p.add_argument('--out', default='', help='output folder (default runs/ablate-<modality>-<knob>)')
    args = p.parse_args(argv)
    args.knob = args.knob.removeprefix('--').replace('-', '_')
    args.train_flags = train_flags
    args.task = args.task or ('classify' if args.probe_data else '')
    args.out = Path(args.out or f'runs/ablate-{args.modality}-{args.knob.replace("_", "-")}')
    names = {f.name: f for f in fields(ModelConfig) + fields(TrainConfig)}
    if args.knob not in names or args.knob in OWN:
        p.error(f'--knob {args.knob.replace("_", "-")}: train.py has no flag --{args.knob.replace("_", "-")}'
                if args.knob not in names else f'--knob {args.knob}: ablate.py sets --{args.knob} itself')
    if args.probe_test and not args.probe_data:
        p.error('--probe-test needs --probe-data')
    if len(set(args.values)) < len(args.values) or len(set(args.seeds)) < len(args.seeds):
        p.error('--values and --seeds must not repeat')
    args.is_bool = isinstance(names[args.knob].default, bool)
    for value in args.values:                                  # every command is checked before anything runs
        problem = check_command(parse_train_args, train_command(args, value, args.seeds[0], args.out / 'check'))
        if problem:
            p.error(f'--knob {args.knob.replace("_", "-")} {value}: {problem}')
    problem = check_command(parse_finetune_args, score_command(args, 'scratch', 0, args.out / 'check'))
    if problem:
        p.error(f'finetune.py: {problem}')
    return args


def knob_flags(args, value):
    flag = '--' + args.knob.replace('_', '-')
    if args.is_bool:
        if value.lower() not in ('true', 'false', '1', '0', 'yes', 'no'):
            return [flag, value]                               # train.py's parser refuses it
        return [flag if value.lower() in ('true', '1', 'yes') else '--no-' + flag[2:]]
    return [flag, value]


def train_command(args, value, seed, out):
    data = ['--data', args.data] if args.data else []
    return ['--modality', args.modality, *data, *args.train_flags, *knob_flags(args, value), '--seed', str(seed),
            '--out', str(out), '--resume']


def check_command(parse, argv):
    """train.py's or finetune.py's own parser on these flags → None, or its error message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parse(argv)
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1].split('error: ', 1)[-1]
    return None


def score_command(args, init, seed, out, first=None):
    """finetune.py's flags; scratch (`first`: the first value's pretraining folder) takes that run's architecture and,
    for text, its tokenizer, so that only the weights differ."""
    cmd = ['--modality', args.modality, '--init', init, '--seed', str(seed), '--out', str(out), '--resume',
           '--probe-layers', args.probe_layers]
    cmd += ['--arch', str(first / 'config.json')] if first else []
    cmd += ['--tokenizer', str(first / 'tokenizer.json')] if first and (first / 'tokenizer.json').exists() else []
    cmd += ['--linear-probe'] if args.score == 'probe' else []
    cmd += ['--data', args.probe_data] if args.probe_data else []
    cmd += ['--test-data', args.probe_test] if args.probe_test else []
    cmd += ['--task', args.task] if args.task else []
    cmd += ['--labeled', str(args.labeled)] if args.labeled else []
    return cmd + shlex.split(args.finetune_flags)


class RunFailed(Exception):
    """A child that failed: its last line, and whether it stopped on a collapse (a result, not an error)."""

    def __init__(self, line, collapsed=False):
        super().__init__(line)
        self.collapsed = collapsed


def die_with_parent():
    """Linux: the child gets SIGTERM (checkpoint and stop) if ablate.py dies, even by SIGKILL; no orphan keeps running."""
    if sys.platform == 'linux':
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)              # PR_SET_PDEATHSIG


def run(script, argv, log):
    """python SCRIPT ARGV, its output to `log`. A signal to ablate.py reaches the child, which checkpoints and stops."""
    with open(log, 'a') as f:
        start = f.tell()
        f.write(f'\n$ python {script} {shlex.join(argv)}\n')
        f.flush()
        proc = subprocess.Popen([sys.executable, str(ROOT / script), *argv], stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)
        try:
            code = proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
    if code != 0:
        with open(log) as f:
            f.seek(start)
            text = f.read().replace('\r', '\n')                  # this call's output only
        lines = [line for line in text.splitlines() if line.strip()]
        raise RunFailed(lines[-1] if lines else f'{script} exited with {code}', 'collapse at step' in text)


def training_seconds(records):
    """Pretraining wall time from log.jsonl: elapsed_s restarts at each resume, so the segments' last values add up."""
    total, last = 0.0, 0.0
    for r in records:
        if r['elapsed_s'] < last:
            total += last
        last = r['elapsed_s']
    return total + last


def read_log(path):
    """The rows of a .jsonl file; train.py's event lines (a bad sample, a skipped update) are left out."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()] if Path(path).exists() else []
    return [r for r in rows if 'event' not in r]


def metric_of(out):
    """(metric name, value, higher is better) from finetune.py's metrics.json: accuracy, or CER for CTC."""
    m = json.loads((out / 'metrics.json').read_text())
    return ('cer', m['metrics']['cer'], False) if m['task'] == 'ctc' else (m['metric'], m['value'], True)


def do_run(args, value, seed):
    """Pretrain (unless scratch) and score one (value, seed) → its results row."""
    folder = args.out / 'runs' / f'{value}-seed{seed}'
    folder.mkdir(parents=True, exist_ok=True)
    row = dict(knob=args.knob.replace('_', '-'), value=value, seed=seed, scoring=args.score, run=str(folder))
    scored = (folder / 'score' / 'metrics.json').exists()     # stopped after scoring, before its row was written
    if value == 'scratch':                                     # the first value's architecture (and text tokenizer)
        first = args.out / 'runs' / f'{args.values[0]}-seed{seed}' / 'pretrain'
        if not scored:
            run('finetune.py', score_command(args, 'scratch', seed, folder / 'score', first), folder / 'score.log')
        row.update(pretrain_s=0.0, steps=0, final_loss=None, target_std=None, pred_std=None)
    else:
        try:
            run('train.py', train_command(args, value, seed, folder / 'pretrain'), folder / 'pretrain.log')
        except RunFailed as e:
            if not e.collapsed:
                raise
            records = read_log(folder / 'pretrain' / 'log.jsonl')
            last = records[-1] if records else {}
            return dict(row, status='collapsed', note=str(e), metric=None, score=None, higher_is_better=None,
                        steps=last.get('step', 0), pretrain_s=training_seconds(records), final_loss=last.get('loss'),
                        target_std=last.get('target_var'), pred_std=last.get('pred_var'))
        records = read_log(folder / 'pretrain' / 'log.jsonl')
        if not scored:
            run('finetune.py', score_command(args, str(folder / 'pretrain' / 'checkpoint.pt'), seed, folder / 'score'),
                folder / 'score.log')
        last = records[-1]
        row.update(pretrain_s=training_seconds(records), steps=last['step'], final_loss=last['loss'],
                   target_std=last['target_var'], pred_std=last['pred_var'])
    name, score, higher = metric_of(folder / 'score')
    return dict(row, status='ok', metric=name, score=score, higher_is_better=higher)


# ------------------------------------------------------------------------------------------------ reports


def summarise(rows, order):
    """value → dict(n, mean, std, and the means of the other columns); collapsed runs are counted apart."""
    out = {}
    for value in order:
        mine = [r for r in rows if r['value'] == value]
        ok = [r for r in mine if r['status'] == 'ok']
        scores = [r['score'] for r in ok]
        mean = lambda k: statistics.fmean([r[k] for r in ok if r.get(k) is not None]) if any(r.get(k) is not None for r in ok) else None
        out[value] = dict(n=len(ok), collapsed=len(mine) - len(ok), mean=statistics.fmean(scores) if scores else None,
                          std=statistics.stdev(scores) if len(scores) > 1 else None, final_loss=mean('final_loss'),
                          target_std=mean('target_std'), pred_std=mean('pred_std'), pretrain_s=mean('pretrain_s'))
    return out


def fmt(x, spec='.3f'):
    return '–' if x is None else format(x, spec)


def write_table(args, rows, path):
    stats = summarise(rows, args.values + ['scratch'])
    metric = next((r['metric'] for r in rows if r['status'] == 'ok'), 'score')
    higher = next((r['higher_is_better'] for r in rows if r['status'] == 'ok'), True)
    scratch = stats['scratch']
    flag = '--' + args.knob.replace('_', '-')
    lines = [f'# {flag}: {args.modality}, {args.score} {metric} ({"higher" if higher else "lower"} is better)', '',
             f'`python ablate.py {shlex.join(sys.argv[1:]) if args.cmdline is None else args.cmdline}`', '',
             f'| {flag} | runs | {metric} (mean ± std) | vs scratch | final loss | target std | prediction std | pretraining s |',
             '|---|---|---|---|---|---|---|---|']
    for value in args.values + ['scratch']:
        s = stats[value]
        runs = f'{s["n"]}' + (f' (+{s["collapsed"]} collapsed)' if s['collapsed'] else '')
        diff = None if s['mean'] is None or scratch['mean'] is None or value == 'scratch' else s['mean'] - scratch['mean']
        lines.append(f'| {value} | {runs} | {fmt(s["mean"])} ± {fmt(s["std"])} | {fmt(diff, "+.3f")} | {fmt(s["final_loss"])} | '
                     f'{fmt(s["target_std"])} | {fmt(s["pred_std"])} | {fmt(s["pretrain_s"] if value != "scratch" else None, ".0f")} |')
    lines += ['', f'Seeds: {" ".join(map(str, args.seeds))}. Std: the sample standard deviation over seeds. Scratch: the '
              f'architecture of the first value ({args.values[0]}) with random weights, scored the same way.',
              f'Paper: {PAPER.get(args.knob, "no claim in §5.4 for this knob.")}', '']
    Path(path).write_text('\n'.join(lines))
    return stats


def plot_ablation(args, stats, path):
    values = args.values
    means = np.array([np.nan if stats[v]['mean'] is None else stats[v]['mean'] for v in values])
    stds = np.array([0.0 if stats[v]['std'] is None else stats[v]['std'] for v in values])
    fig, ax = plt.subplots(figsize=(6, 4))
    if args.knob == 'steps':                                   # a learning-speed curve: against wall time
        x = np.array([np.nan if stats[v]['pretrain_s'] is None else stats[v]['pretrain_s'] for v in values])
        ax.set_xlabel('pretraining wall time (s)')
        for xi, yi, v in zip(x, means, values):
            ax.annotate(f'{v} steps', (xi, yi), textcoords='offset points', xytext=(4, -12), fontsize=8)
    else:
        try:                                                   # numbers in increasing order: a numeric axis; else the
            x = np.array([float(v) for v in values])           # order given (teacher-context 1 4 16 0: 0 = all, last)
            numeric = not args.is_bool and bool(np.all(np.diff(x) > 0))
        except ValueError:
            numeric = False
        if not numeric:
            x = np.arange(len(values))
            ax.set_xlim(-0.5, len(values) - 0.5)
        ax.set_xticks(x, values)
        ax.set_xlabel('--' + args.knob.replace('_', '-'))
    ax.errorbar(x, means, yerr=stds, marker='o', capsize=4, label='pretrained (mean ± std over seeds)')
    for xi, v in zip(x, values):                               # every seed, to show a spread that is not Gaussian
        seeds = [r['score'] for r in args.rows if r['value'] == v and r['status'] == 'ok']
        ax.plot([xi] * len(seeds), seeds, 'o', mfc='none', color='C0', alpha=0.5, ms=5)
    s = stats['scratch']
    if s['mean'] is not None:
        ax.axhline(s['mean'], color='gray', ls='--', label='scratch (random init)')
        ax.axhspan(s['mean'] - (s['std'] or 0), s['mean'] + (s['std'] or 0), color='gray', alpha=0.2)
    for xi, v in zip(x, values):                               # collapsed runs have no score: marked where they sit
        if stats[v]['collapsed'] and not np.isnan(xi):
            ax.plot([xi], [ax.get_ylim()[0]], 'rx', ms=10, clip_on=False)
            ax.annotate(f'{stats[v]["collapsed"]} collapsed', (xi, ax.get_ylim()[0]), textcoords='offset points',
                        xytext=(0, 12), ha='center', fontsize=8, color='red')
    metric = next((r['metric'] for r in args.rows if r['status'] == 'ok'), 'score')
    ax.set_ylabel(f'{args.score} {metric}')
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(args, path):
    """Loss and target std against step, the mean over seeds, a line per value."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for value in args.values:
        logs = [read_log(args.out / 'runs' / f'{value}-seed{s}' / 'pretrain' / 'log.jsonl') for s in args.seeds]
        logs = [lg for lg in logs if lg]
        if not logs:
            continue
        n = min(len(lg) for lg in logs)
        steps = [r['step'] for r in logs[0][:n]]
        for ax, key in ((ax1, 'loss'), (ax2, 'target_var')):
            ax.plot(steps, np.mean([[r[key] for r in lg[:n]] for lg in logs], 0), label=f'{value}')
    ax1.set(xlabel='step', ylabel='loss', yscale='log', title='pretraining loss')
    ax2.set(xlabel='step', ylabel='target std', title='target std (collapse guard: 0.1)')
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(title='--' + args.knob.replace('_', '-'), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args, rows):
    args.rows = rows
    stats = write_table(args, rows, args.out / 'results.md')
    plot_ablation(args, stats, args.out / 'ablation.png')
    plot_curves(args, args.out / 'curves.png')


def main(argv=None):
    args = parse_args(argv)
    args.cmdline = None if argv is None else shlex.join(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (vars(args)[k] if k != 'train_flags' else args.train_flags) for k in SETTINGS}
    sweep = args.out / 'sweep.json'
    if sweep.exists():
        before = json.loads(sweep.read_text())
        changed = [k for k in SETTINGS if before.get(k) != settings[k]]
        if changed:
            sys.exit(f'ablate.py: error: --out {args.out} holds a sweep with other {", ".join(changed)} '
                     f'({", ".join(f"{k}={before.get(k)!r}" for k in changed)}); use another --out')
    sweep.write_text(json.dumps(settings, indent=2))
    results = args.out / 'results.jsonl'
    rows = read_log(results)
    done = {(r['value'], r['seed']) for r in rows}
    todo = [(v, s) for s in args.seeds for v in args.values + ['scratch']]   # scratch after the run whose architecture it takes
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    skipped = sum(key in done for key in todo)
    if skipped:
        print(f'{args.out}: {skipped} of {len(todo)} runs already finished, skipped')
    with tqdm(total=len(todo), initial=skipped, desc=f'ablating --{args.knob.replace("_", "-")}', dynamic_ncols=True) as bar:
        for value, seed in todo:
            if (value, seed) in done:
                continue
            t0 = time.time()
            try:
                row = do_run(args, value, seed)
            except RunFailed as e:
                sys.exit(f'ablate.py: error: {value} seed {seed}: {e} (its logs: {args.out}/runs/{value}-seed{seed}/)')
            except KeyboardInterrupt:
                sys.exit(f'ablate.py: stopped; {len(rows)} runs are in {results}. Run the same command to continue.')
            row['seconds'] = time.time() - t0
            with open(results, 'a') as f:
                f.write(json.dumps(row) + '\n')
            rows.append(row)
            bar.update(1)
            tqdm.write(f'--{args.knob.replace("_", "-")} {value} seed {seed}: ' + (f'{row["metric"]} {row["score"]:.4f}' if row['status'] == 'ok'
                       else 'collapsed') + (f' | loss {fmt(row["final_loss"])} | target std {fmt(row["target_std"])} | '
                                            f'{row["pretrain_s"]:.0f} s pretraining' if value != 'scratch' else ' (scratch)'))
            report(args, [r for r in rows if r['seed'] in args.seeds])
    rows = [r for r in rows if r['seed'] in args.seeds and r['value'] in args.values + ['scratch']]
    report(args, rows)
    print((args.out / 'results.md').read_text())
    print(f'wrote {args.out}/{{results.jsonl, results.md, ablation.png, curves.png}}')


if __name__ == '__main__':
    main()

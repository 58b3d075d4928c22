"""Learning speed: probe accuracy against pretraining time for several `ablate.py --knob steps` sweeps, and how much
sooner one reaches another's best accuracy (data2vec 2.0's claim: the same accuracy in several times less time).

    python learning_speed.py --sweep v1=runs/ablate/d1-speech-steps --sweep v2=runs/ablate/v2-speech-steps \\
        --cost v1=0.165 --cost v2=0.371 --out results/speech-v1-vs-v2

A sweep is LABEL=DIR[,DIR...] (the folders' results.jsonl rows pooled, e.g. seeds run in two sittings); the first is
the reference. Time to accuracy A, on one curve of (time, accuracy) points that starts at (0, scratch):

    T(A) = t_i + (A − a_i) · (t_{i+1} − t_i) / (a_{i+1} − a_i)   on the first segment with a_i < A ≤ a_{i+1}

(linear between measured points; a curve that never reaches A has no T). The speed-up of a sweep is T_ref(A*) / T(A*),
with A* the reference's best accuracy: on the seed-mean curves, and seed by seed (A*_s from the reference's seed s)
for the spread. Time is each run's measured pretraining wall time, or, with --cost LABEL=SECONDS, updates × that
per-update cost measured separately (runs that shared a machine with other jobs time noisily; README).

Outputs in --out: speed.md (a table and the ratios) and speed.png (accuracy against time and against updates).
"""
import argparse
import statistics
import sys
import textwrap
from pathlib import Path

import matplotlib

from ablate import fmt, read_log

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='learning_speed.py', description=__doc__.split('\n\n')[0])
    p.add_argument('--sweep', action='append', required=True, metavar='LABEL=DIR[,DIR]',
                   help='an ablate.py --knob steps output folder (or several, pooled); the first is the reference')
    p.add_argument('--cost', action='append', default=[], metavar='LABEL=SECONDS',
                   help='time = updates × this per-update cost, instead of the measured wall time')
    p.add_argument('--target', type=float, default=None, help="the accuracy to reach (default: the reference's best)")
    p.add_argument('--out', required=True, help='output folder')
    args = p.parse_args(argv)
    args.sweeps, args.costs = {}, {}
    if args.target is not None and not 0 < args.target <= 1:
        p.error(f'--target {args.target}: an accuracy in (0, 1]')
    for item in args.sweep:
        label, _, dirs = item.partition('=')
        if not dirs:
            p.error(f'--sweep {item}: expected LABEL=DIR[,DIR]')
        if label in args.sweeps:
            p.error(f'--sweep {item}: the label {label} is used twice')
        missing = [d for d in dirs.split(',') if not (Path(d) / 'results.jsonl').exists()]
        if missing:
            p.error(f'--sweep {item}: no results.jsonl in {", ".join(missing)} (run ablate.py --knob steps first)')
        args.sweeps[label] = [Path(d) for d in dirs.split(',')]
    for item in args.cost:
        label, _, seconds = item.partition('=')
        if label not in args.sweeps:
            p.error(f'--cost {item}: no --sweep is called {label}')
        try:
            args.costs[label] = float(seconds)
        except ValueError:
            p.error(f'--cost {item}: expected LABEL=SECONDS, e.g. v1=0.165')
    return args


def load(dirs, cost=None):
    """seed → [(updates, seconds, accuracy)] sorted by updates, starting with scratch at (0, 0, its accuracy)."""
    curves = {}
    for d in dirs:
        for r in read_log(d / 'results.jsonl'):
            if r['knob'] != 'steps':
                raise SystemExit(f'learning_speed.py: error: {d} is a --knob {r["knob"]} sweep, not --knob steps')
            if r['status'] != 'ok':
                continue                                        # a collapsed run has no score
            seconds = r['steps'] * cost if cost is not None else r['pretrain_s']
            curves.setdefault(r['seed'], []).append((r['steps'], seconds, r['score']))
    if not curves:
        raise SystemExit(f'learning_speed.py: error: no scored run in {", ".join(map(str, dirs))}')
    return {s: sorted(points) for s, points in sorted(curves.items())}


def time_to(points, target):
    """The first time a piecewise-linear (time, accuracy) curve reaches `target` (module docstring), else None."""
    for (t0, a0), (t1, a1) in zip(points, points[1:]):
        if a0 >= target:
            return t0
        if a1 >= target:
            return t0 + (target - a0) * (t1 - t0) / (a1 - a0)
    return points[-1][0] if points and points[-1][1] >= target else None


def mean_curve(curves):
    """[(updates, mean seconds, mean accuracy, std accuracy, n)] at the update counts every seed has (a count that a
    seed lacks, e.g. a collapsed run, is left out of the mean curve, with a warning)."""
    counts = set.intersection(*(set(u for u, _, _ in c) for c in curves.values()))
    dropped = set(u for c in curves.values() for u, _, _ in c) - counts
    if dropped:
        print(f'learning_speed.py: warning: {", ".join(map(str, sorted(dropped)))} updates: not every seed has a '
              'score; left out of the mean curve', file=sys.stderr)
    rows = []
    for u in sorted(counts):
        pts = [next(p for p in c if p[0] == u) for c in curves.values()]
        accs = [a for _, _, a in pts]
        rows.append((u, statistics.fmean(t for _, t, _ in pts), statistics.fmean(accs),
                     statistics.stdev(accs) if len(accs) > 1 else 0.0, len(accs)))
    return rows


def speedups(ref, other, target=None):
    """(A*, T_ref, T_other, ratio) on the mean curves, and seed → the same on that seed's curves (seeds in both)."""
    def one(r_pts, o_pts, a):
        a = max(acc for _, acc in r_pts) if a is None else a
        tr, to = time_to(r_pts, a), time_to(o_pts, a)
        return a, tr, to, (None if tr is None or to is None else tr / to if to > 0 else float('inf'))
    mean = one([(t, a) for _, t, a, _, _ in mean_curve(ref)], [(t, a) for _, t, a, _, _ in mean_curve(other)], target)
    seeds = {s: one([(t, a) for _, t, a in ref[s]], [(t, a) for _, t, a in other[s]], target)
             for s in ref if s in other}
    return mean, seeds


def report(args):
    curves = {label: load(dirs, args.costs.get(label)) for label, dirs in args.sweeps.items()}
    labels = list(curves)
    ref = labels[0]
    timing = lambda lb: f'{args.costs[lb]} s × updates' if lb in args.costs else 'measured pretraining wall time'
    lines = ['# Learning speed', '', 'Probe accuracy against pretraining time; mean ± sample std over seeds, per-seed '
             'values in the last column. Time: ' + '; '.join(f'{lb}: {timing(lb)}' for lb in labels) + '.', '',
             '| sweep | updates | time (s) | accuracy | seeds | per seed |', '|---|---|---|---|---|---|']
    means = {lb: mean_curve(c) for lb, c in curves.items()}
    for lb in labels:
        for u, t, a, sd, n in means[lb]:
            per = ', '.join(f'{next(acc for uu, _, acc in c if uu == u) * 100:.1f}'.removesuffix('.0') for c in curves[lb].values())
            lines.append(f'| {lb} | {u or "scratch"} | {t:.0f} | {a:.3f} ± {sd:.3f} | {n} | {per} |')
    target = None
    for lb in labels[1:]:
        (a, tr, to, ratio), seeds = speedups(curves[ref], curves[lb], args.target)
        target = a
        ok = [s[3] for s in seeds.values() if s[3] is not None]
        what = f"{ref}'s best mean accuracy" if args.target is None else 'the --target'
        lines += ['', f'**{lb} against {ref}**: to {a:.3f} ({what}), {ref} takes {fmt(tr, ".0f")} s and {lb} '
                  f'{fmt(to, ".0f") if to is not None else "does not get there"}{" s" if to is not None else ""}: '
                  f'speed-up **{fmt(ratio, ".2f")}×** (> 1: faster than {ref}).', '',
                  f'| seed | target ({"its " + ref + " best" if args.target is None else "--target"}) | {ref} time (s) | '
                  f'{lb} time (s) | speed-up |', '|---|---|---|---|---|']
        for s, (sa, st_r, st_o, sr) in seeds.items():
            lines.append(f'| {s} | {sa:.3f} | {fmt(st_r, ".0f") if st_r is not None else "not reached"} | '
                         f'{fmt(st_o, ".0f") if st_o is not None else "not reached"} | {fmt(sr, ".2f")} |')
        lines.append(f'\nSeed by seed: {fmt(statistics.fmean(ok) if ok else None, ".2f")} ± '
                     f'{fmt(statistics.stdev(ok) if len(ok) > 1 else None, ".2f")}× over the {len(ok)} of {len(seeds)} '
                     'seeds where both reach the target.')
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'speed.md').write_text('\n'.join(lines) + '\n')
    plot(curves, means, target, out / 'speed.png', timing)
    return '\n'.join(lines)


def plot(curves, means, target, path, timing):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, x_of, xlabel in ((axes[0], lambda u, t: t, 'pretraining time (s)'), (axes[1], lambda u, t: u, 'updates')):
        for i, (lb, c) in enumerate(curves.items()):
            m = means[lb]
            ax.errorbar([x_of(u, t) for u, t, *_ in m], [a for _, _, a, _, _ in m], yerr=[sd for *_, sd, _ in m],
                        marker='o', capsize=4, color=f'C{i}', label=f'{lb} (mean ± std, {len(c)} seeds)')
            for pts in c.values():
                ax.plot([x_of(u, t) for u, t, _ in pts], [a for *_, a in pts], 'o', mfc='none', color=f'C{i}', alpha=0.4, ms=5)
        if target is not None:
            ax.axhline(target, color='gray', ls=':', label=f'the target ({target:.2f})')
        ax.set(xlabel=xlabel, ylabel='probe accuracy')
        ax.grid(alpha=0.3)
    axes[0].set_title('against time\n' + textwrap.fill(', '.join(f'{lb}: {timing(lb)}' for lb in curves), 90), fontsize=8)
    axes[1].set_title('against updates', fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    print(report(args))
    print(f'wrote {args.out}/{{speed.md, speed.png}}')


if __name__ == '__main__':
    main()

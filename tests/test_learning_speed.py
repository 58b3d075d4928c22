"""learning_speed.py: time to an accuracy on (time, accuracy) curves, and the speed-up of one sweep against another.

    pytest tests/test_learning_speed.py

The sweeps are results.jsonl rows written here, with round numbers whose answers are worked out by hand below.
"""
import json

import pytest

import learning_speed


def row(steps, seed, score, seconds):
    return dict(knob='steps', value=str(steps) if steps else 'scratch', seed=seed, status='ok', steps=steps,
                pretrain_s=seconds, score=score)


def write(folder, rows):
    folder.mkdir(parents=True)
    (folder / 'results.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return folder


@pytest.fixture
def sweeps(tmp_path):
    """Reference: seed 0 goes 0.3 (scratch) → 0.5 at 100 s → 0.9 at 200 s; seed 1: 0.3 → 0.7 → 0.7.
    Other, split over two folders like a sweep run in two sittings: seed 0: 0.3 → 0.6 at 25 s → 0.9 at 50 s;
    seed 1: 0.3 → 0.4 at 30 s → 0.5 at 60 s (never reaches 0.7)."""
    ref = write(tmp_path / 'ref', [row(0, 0, 0.3, 0), row(100, 0, 0.5, 100), row(200, 0, 0.9, 200),
                                   row(0, 1, 0.3, 0), row(100, 1, 0.7, 120), row(200, 1, 0.7, 260)])
    a = write(tmp_path / 'a', [row(0, 0, 0.3, 0), row(10, 0, 0.6, 25), row(20, 0, 0.9, 50)])
    b = write(tmp_path / 'b', [row(0, 1, 0.3, 0), row(10, 1, 0.4, 30), row(20, 1, 0.5, 60)])
    return ref, f'{a},{b}'


def test_time_to_interpolates_on_the_first_crossing_segment():
    points = [(0, 0.3), (100, 0.5), (200, 0.9), (300, 0.6), (400, 1.0)]
    assert learning_speed.time_to(points, 0.7) == pytest.approx(150)        # 100 + (0.7 − 0.5) / 0.4 · 100
    assert learning_speed.time_to(points, 0.5) == pytest.approx(100)
    assert learning_speed.time_to(points, 0.2) == 0                         # already there at the start
    assert learning_speed.time_to(points, 0.95) == pytest.approx(387.5)     # 300 + 0.35 / 0.4 · 100, after the dip
    assert learning_speed.time_to(points, 1.1) is None


def test_speedup_on_the_mean_curve_and_seed_by_seed(sweeps, tmp_path):
    ref, other = sweeps
    args = learning_speed.parse_args(['--sweep', f'v1={ref}', '--sweep', f'v2={other}', '--out', str(tmp_path / 'o')])
    curves = {lb: learning_speed.load(dirs) for lb, dirs in args.sweeps.items()}
    (a, t_ref, t_other, ratio), seeds = learning_speed.speedups(curves['v1'], curves['v2'])
    # mean curves: v1 (0, 0.3) (110, 0.6) (230, 0.8); v2 (0, 0.3) (27.5, 0.5) (55, 0.7). A* = 0.8: v2 never gets there
    assert a == pytest.approx(0.8) and t_ref == pytest.approx(230) and t_other is None and ratio is None
    # seed 0: A* = 0.9, v1 at 200 s, v2 at 50 s → 4×; seed 1: A* = 0.7 at 120 s, v2 never
    assert seeds[0] == pytest.approx((0.9, 200, 50, 4.0))
    assert seeds[1][:2] == pytest.approx((0.7, 120)) and seeds[1][2:] == (None, None)
    # a target both reach: 0.6 on the mean curves: v1 at 110 s, v2 at 27.5 + 0.1 / 0.2 · 27.5 = 41.25 s
    (a, t_ref, t_other, ratio), _ = learning_speed.speedups(curves['v1'], curves['v2'], 0.6)
    assert (t_ref, t_other, ratio) == pytest.approx((110, 41.25, 110 / 41.25))


def test_cost_replaces_the_measured_time_by_updates_times_cost(sweeps, tmp_path):
    ref, other = sweeps
    args = learning_speed.parse_args(['--sweep', f'v1={ref}', '--sweep', f'v2={other}', '--cost', 'v2=2.0',
                                      '--out', str(tmp_path / 'o')])
    curves = {lb: learning_speed.load(dirs, args.costs.get(lb)) for lb, dirs in args.sweeps.items()}
    assert curves['v2'][0] == [(0, 0.0, 0.3), (10, 20.0, 0.6), (20, 40.0, 0.9)]
    assert curves['v1'][1] == [(0, 0, 0.3), (100, 120, 0.7), (200, 260, 0.7)]   # measured, untouched


def test_command_line_writes_the_table_and_the_plot(sweeps, tmp_path, capsys):
    ref, other = sweeps
    learning_speed.main(['--sweep', f'v1={ref}', '--sweep', f'v2={other}', '--target', '0.6', '--out', str(tmp_path / 'o')])
    md = (tmp_path / 'o' / 'speed.md').read_text()
    assert '| v2 | 10 | 28 | 0.500 ± 0.141 | 2 | 60, 40 |' in md            # (25 + 30) / 2 s, (0.6 + 0.4) / 2
    assert 'speed-up **2.67×**' in md                                        # 110 / 41.25
    assert '| 0 | 0.600 | 125 | 25 | 5.00 |' in md                           # seed 0: 100 + 0.1/0.4 · 100 s, and 25 s
    assert '| 1 | 0.600 | 90 | not reached | – |' in md                       # v1 seed 1: 0.3/0.4 · 120 s; v2 tops at 0.5
    assert (tmp_path / 'o' / 'speed.png').stat().st_size > 10_000


def test_reaching_the_target_at_the_start_is_an_infinite_speed_up_not_a_miss():
    ref = {0: [(0, 0, 0.3), (100, 100, 0.8)]}
    other = {0: [(0, 0, 0.9), (100, 50, 0.95)]}                            # scratch is already above 0.8
    _, seeds = learning_speed.speedups(ref, other)
    assert seeds[0] == (0.8, 100, 0, float('inf'))


def test_a_count_some_seed_lacks_is_left_out_of_the_mean_curve_with_a_warning(capsys):
    curves = {0: [(0, 0, 0.3), (100, 100, 0.5), (200, 200, 0.9)], 1: [(0, 0, 0.3), (200, 210, 0.7)]}
    assert learning_speed.mean_curve(curves) == [(0, 0, 0.3, 0.0, 2), (200, 205, pytest.approx(0.8), pytest.approx(0.1414, abs=1e-4), 2)]
    assert '100 updates: not every seed has a score' in capsys.readouterr().err


@pytest.mark.parametrize('argv, message', [
    (['--sweep', 'v1'], 'expected LABEL=DIR'),
    (['--sweep', 'v1=/nowhere'], 'no results.jsonl in /nowhere'),
    (['--sweep', 'v1={ref}', '--cost', 'v3=1'], 'no --sweep is called v3'),
    (['--sweep', 'v1={ref}', '--cost', 'v1=abc'], 'expected LABEL=SECONDS'),
    (['--sweep', 'v1={ref}', '--sweep', 'v1={ref}'], 'the label v1 is used twice'),
    (['--sweep', 'v1={ref}', '--target', '74'], 'an accuracy in (0, 1]'),
])
def test_bad_flags_are_one_line_errors(sweeps, tmp_path, capsys, argv, message):
    ref, _ = sweeps
    with pytest.raises(SystemExit):
        learning_speed.parse_args([a.format(ref=ref) for a in argv] + ['--out', str(tmp_path / 'o')])
    assert message in capsys.readouterr().err

"""Checkpoints and surviving failures, shared by train.py and finetune.py (README, "Resuming and failures").

    save(path, ckpt)          temp file in the same folder → fsync → os.replace: a kill mid-save leaves the previous file
    load(path)                torch.load(weights_only=True): tensors and plain types only, so a malicious pickle runs no code
    open_checkpoint           the run's checkpoint.pt with --resume; without it, an existing one is an error, never overwritten
    rng_state, set_rng_state  python, numpy, torch and CUDA generators, as tensors and ints
    check_writable(out)       at start-up, not at the first save hours later
    resume_changes            a stored config against this run's: an error for what may not change, a note for the rest
    resume_log                log.jsonl kept up to the checkpoint's step, then appended to
    gather                    every rank's object (torch.distributed.all_gather_object), or [obj] on one process
    StopSignal, stop_agreed   SIGTERM (preemption) or SIGINT (Ctrl-C) → a flag every rank reads at the next step boundary
    update_is_finite          a NaN/Inf loss or gradient norm on any rank skips the update; skipped_update, too_many_bad_steps
"""
import atexit
import json
import multiprocessing
import os
import pickle
import random
import shlex
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, read or resumed; the message names the file and what to do."""


def _tensors(obj, prefix=''):
    """(name, tensor) for every tensor in nested dicts, lists and tuples."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f'{prefix}.{k}' if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f'{prefix}.{i}')


def save(path, ckpt):
    """Write `ckpt` (tensors and plain types) to `path` atomically. A NaN/Inf tensor is refused, so no checkpoint ever holds one."""
    path = Path(path)
    for name, t in _tensors(ckpt):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f'{path}: not written, {name} holds NaN/Inf; the previous checkpoint is kept')
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())                                       # the bytes are on disk before the rename
    os.replace(tmp, path)                                          # atomic: readers see the old file or the new one
    if hasattr(os, 'O_DIRECTORY'):
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)    # and so is the rename itself
        os.fsync(fd)
        os.close(fd)


def load(path):
    """The checkpoint dict, unpickled with weights_only=True: anything but tensors and plain Python types is refused."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f'{path}: refused to load: it holds Python objects other than tensors and plain types, and '
                              f'unpickling them could run code (torch.load weights_only=True: {str(e).splitlines()[0][:160]})') from None
    except Exception as e:                                         # truncated zip, not a torch file, unreadable
        raise CheckpointError(f'{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})') from None


def open_checkpoint(path, resume):
    """The checkpoint at `path` to resume from, or None to start. Without --resume an existing file is an error: a
    rerun of the same command must not overwrite hours of training."""
    if Path(path).exists() and not resume:
        raise CheckpointError(f'{path} exists: pass --resume to continue that run, or another --out to start a new one')
    return load(path) if resume and Path(path).exists() else None


def rng_state(device=None):
    """Every random generator a run draws from: python's, numpy's, torch's CPU one and the CUDA one of `device`."""
    version, keys, gauss = random.getstate()
    _, np_keys, pos, has_gauss, cached = np.random.get_state()
    return dict(python=dict(version=version, keys=torch.tensor(keys), gauss=gauss),
                numpy=dict(keys=torch.from_numpy(np_keys.astype(np.int64)), pos=pos, has_gauss=has_gauss, cached=cached),
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(device) if device is not None and device.type == 'cuda' else None)


def set_rng_state(state, device=None):
    p, n = state['python'], state['numpy']
    random.setstate((p['version'], tuple(p['keys'].tolist()), p['gauss']))
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached']))
    torch.set_rng_state(state['torch'])
    if state['cuda'] is not None and device is not None and device.type == 'cuda':
        torch.cuda.set_rng_state(state['cuda'], device)


def check_writable(out):
    """Create `out` and write a file there now: a read-only or missing mount fails at start-up, not at the first save."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f'.write-test-{os.getpid()}'
        probe.write_bytes(b'ok')
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f'--out {out}: cannot write there ({e.strerror or e}); choose another --out') from None


def resume_changes(saved, current, allowed, path, defaults=None):
    """Compare a checkpoint's flat config with this run's. A difference in a key outside `allowed` is an error listing
    every such key; the allowed ones come back as 'key old → new' notes to print. A key the checkpoint lacks (a knob
    added since) is refused by name, unless `defaults` gives the value that the older code behaved as."""
    saved = {**(defaults or {}), **saved}
    missing = [k for k in current if k not in saved and k != 'resume']
    if missing:
        raise CheckpointError(f'--resume: {path} was written by an older version, without {", ".join(missing)}: continue it '
                              'with that version, or start a new run in another --out')
    changed = {k: (saved.get(k), v) for k, v in current.items() if k != 'resume' and saved.get(k) != v}
    fixed = [f'{k} {a!r} → {b!r}' for k, (a, b) in changed.items() if k not in allowed]
    if fixed:
        raise CheckpointError(f'--resume: {path} was written with other settings: {"; ".join(fixed)}. Rerun with its '
                              f'settings (only {", ".join(sorted(allowed))} may change), or start a new run in another --out')
    return [f'{k} {a!r} → {b!r}' for k, (a, b) in changed.items()]


def resume_log(path, step, resume):
    """log.jsonl opened for appending, and its metric records (no 'event' key). On resume, the lines after the
    checkpoint's `step` are dropped (the run redoes those steps) by an atomic rewrite; otherwise the file starts empty."""
    path = Path(path)
    kept = []
    for line in path.read_text().splitlines() if resume and path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:                                         # a line torn by a kill or a power loss
            continue
        if record['step'] <= step:
            kept.append(record)
    path.with_name(path.name + '.tmp').write_text(''.join(json.dumps(r) + '\n' for r in kept))
    os.replace(path.with_name(path.name + '.tmp'), path)
    return open(path, 'a'), [r for r in kept if 'event' not in r]


def gather(obj):
    """Every rank's `obj`, in rank order; [obj] without torch.distributed."""
    if not dist.is_initialized():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def resume_hint(script, argv):
    """The command that continues this run: its own flags plus --resume (under torchrun, with its process count)."""
    launcher = f"torchrun --nproc_per_node {os.environ['LOCAL_WORLD_SIZE']}" if 'LOCAL_WORLD_SIZE' in os.environ else 'python'
    return ' '.join([launcher, script, *map(shlex.quote, [a for a in argv if a != '--resume']), '--resume'])


class StopSignal:
    """Inside `with StopSignal() as stop:`, SIGTERM or SIGINT sets `stop.name` instead of killing the process; the loop
    saves a checkpoint at the next step boundary and exits. A second Ctrl-C stops at once (SIGINT's previous handler
    returns); repeated SIGTERMs do not (torchrun sends its workers two), the scheduler's own SIGKILL deadline does."""

    def __enter__(self):
        self.name = self.signum = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        if self.name is None:
            self.name, self.signum = signal.Signals(signum).name, signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self.previous[signal.SIGINT])

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def stop_agreed(stop, device):
    """Whether a signal reached any rank. All ranks must save and stop at the same step boundary, so under DDP this is
    one tiny all-reduce per update (and a host sync); on one process it reads the flag."""
    if not dist.is_initialized():
        return stop.name is not None
    flag = torch.tensor(float(stop.name is not None), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def update_is_finite(loss, grad_norm):
    """Whether an update may be applied: its loss and gradient norm are finite, on every rank under DDP (the loss is
    per rank, and every rank must take the same decision). Reading the flag is a host sync, once per update."""
    finite = torch.isfinite(torch.stack([grad_norm.float(), loss.detach().float()])).all().float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def skipped_update(update, loss, grad_norm, in_a_row, skipped, max_bad_steps):
    """The log event and the message for an update skipped for a NaN/Inf loss or gradient norm."""
    event = dict(step=update, event='skipped update', loss=loss.item(), grad_norm=grad_norm.item(), in_a_row=in_a_row,
                 skipped_updates=skipped)
    return event, (f'update {update}: loss {event["loss"]:.4g}, gradient norm {event["grad_norm"]:.4g}: skipped, the weights '
                   f'are unchanged ({in_a_row} in a row, --max-bad-steps {max_bad_steps})')


def too_many_bad_steps(in_a_row, max_bad_steps, path, last_ckpt):
    """The exit after --max-bad-steps skipped updates in a row: what happened, which checkpoint is good, what to try."""
    saved = f'{path} is from step {last_ckpt}, the last good one' if last_ckpt else 'no checkpoint was written yet'
    return SystemExit(f'stopped: {in_a_row} updates in a row had a NaN/Inf loss or gradient (--max-bad-steps {max_bad_steps}); '
                      f'{saved}. Lower --lr, raise --warmup, or check the data (log.jsonl lists skipped samples).')


def ignore_stop_signals(worker_id):
    """DataLoader worker_init_fn. A scheduler's SIGTERM often reaches every process, and Ctrl-C's SIGINT the whole
    process group; a loader worker ignores both and keeps serving batches while the main process finishes its update,
    saves and exits. The main process then ends its workers with SIGKILL (below): multiprocessing's own exit would
    SIGTERM them, which they ignore, and wait for ever."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@atexit.register                        # registered after multiprocessing's exit hook, so it runs before it
def _end_loader_workers():
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)          # else torch's handler reports these kills as worker failures
    for child in multiprocessing.active_children():
        child.kill()
        child.join()


def seed_all(seed):
    """python's, numpy's and torch's global generators (the checkpoint saves all three)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RunState:
    """Where a run is (step, micro-batches consumed) and its running counts, and everything that makes stopping and
    going on exact (README, "Resuming and failures"). train.py and finetune.py loop `while run.step < steps` and leave
    the bookkeeping here:

        RunState(out, resume)     --out writable now; its checkpoint.pt opened (--resume) or refused (no --resume)
        restore(steps, load)      counters, the data position and every RNG from the checkpoint; load(ckpt) the modules
        open_log()                log.jsonl kept up to the checkpoint's step, then appended to (rank 0)
        took_batch(errors)        a micro-batch consumed; its unreadable samples printed now, logged at the next line
        after_update(applied, …)  an applied update, or a skipped one (NaN/Inf): logged, stopped after --max-bad-steps
        log(record)               a metric line; unreadable samples of every rank go in before it
        save(state)               a checkpoint with this state, every rank's RNG and running sums (rank 0 writes)
        stop_if_signalled(…)      SIGTERM/SIGINT on any rank: save at this step boundary, say how to continue, exit

    Under DDP every method that gathers is called on every rank at the same step.
    """

    def __init__(self, out, resume, rank=0, world=1, device=None):
        self.out, self.path = Path(out), Path(out) / 'checkpoint.pt'
        self.rank, self.world, self.device, self.master = rank, world, device, rank == 0
        if self.master:
            check_writable(self.out)                                       # now, not at the first save hours later
        self.ckpt = open_checkpoint(self.path, resume)
        self.step = self.consumed = self.last_log = self.skipped = self.bad_samples = self.in_a_row = self.last_ckpt = 0
        self.loss_sum = torch.zeros((), device=device)                     # losses of the log interval's updates
        self.pending, self.log_file, self.records = [], None, []          # unreadable samples not yet logged

    def restore(self, steps, load):
        """Continue the checkpoint, if any: `load(ckpt)` restores the modules and the optimizer; here the step, the
        counters, the data position (the same share of the data if the process count changed) and the RNG states.
        → the note to print (rank 0), or None when starting."""
        if self.ckpt is None:
            return None
        ckpt = self.ckpt
        if ckpt['step'] > steps:
            raise CheckpointError(f'--steps {steps}: {self.path} is already at step {ckpt["step"]}')
        load(ckpt)
        loop, saved_world = ckpt['loop'], len(ckpt['rng'])
        self.step = self.last_ckpt = ckpt['step']
        self.consumed = ckpt['data']['consumed'] * saved_world // self.world
        sums = loop['loss_sum'] if saved_world == self.world else [sum(loop['loss_sum']) / saved_world] * self.world
        self.loss_sum = sums[self.rank].to(self.device)
        self.last_log, self.skipped, self.bad_samples, self.in_a_row = (loop[k] for k in ('last_log', 'skipped_updates',
                                                                                          'bad_samples', 'in_a_row'))
        if saved_world == self.world:
            set_rng_state(ckpt['rng'][self.rank], self.device)
        return f'resuming {self.path} at step {self.step} of {steps}' + ('' if saved_world == self.world else
            f'; it was written by {saved_world} processes, this run has {self.world}: the data and masks continue where '
            'they stopped, dropout\'s random streams start afresh')

    def open_log(self, startup_errors=()):
        """log.jsonl (rank 0); files left out at start-up are logged with the first log line of a new run."""
        if self.master:
            self.log_file, self.records = resume_log(self.out / 'log.jsonl', self.step, self.ckpt)
            self.pending += [] if self.ckpt else list(startup_errors)

    def took_batch(self, errors):
        """A micro-batch was consumed (the data position advances); its unreadable samples, already replaced by
        readable ones, are printed now and logged (with every rank's) at the next log line or checkpoint."""
        self.consumed += 1
        self.pending += errors
        for e in errors:
            tqdm.write(f'skipped an unreadable sample (--strict-data stops instead): {e}')

    def _write(self, record):
        if self.master:
            self.log_file.write(json.dumps(record) + '\n')
            self.log_file.flush()

    def _log_bad_samples(self):
        errors, self.pending = sum(gather(self.pending), []), []            # every rank's
        self.bad_samples += len(errors)
        for e in errors:
            self._write(dict(step=self.step, event='bad sample', error=e))

    def after_update(self, applied, loss, grad_norm, max_bad_steps):
        """After an update: the step advances, or the skip is logged (every rank agrees: the flag was all-reduced), and
        after --max-bad-steps skips in a row the run stops, naming the last good checkpoint."""
        if applied:
            self.step, self.in_a_row = self.step + 1, 0
            self.loss_sum += loss.detach()
            return
        self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
        event, message = skipped_update(self.step + 1, loss, grad_norm, self.in_a_row, self.skipped, max_bad_steps)
        if self.master:
            tqdm.write(message)
        self._write(event)
        if self.in_a_row >= max_bad_steps:
            self._log_bad_samples()
            raise too_many_bad_steps(self.in_a_row, max_bad_steps, self.path, self.last_ckpt)

    def due(self, every, steps, applied=True):
        """Whether this applied update ends an interval of `every` steps, or the run."""
        return applied and (self.step % every == 0 or self.step == steps)

    def log(self, **values):
        """A metric line (rank 0): the step, `values` and the running counts; the interval's loss sum starts again.
        Every rank's unreadable samples are logged (and counted) first. → the record."""
        self._log_bad_samples()
        record = dict(step=self.step, **values, skipped_updates=self.skipped, bad_samples=self.bad_samples)
        self.records.append(record)
        self._write(record)
        self.loss_sum.zero_()
        self.last_log = self.step
        return record

    def save(self, state):
        """checkpoint.pt: `state` (modules, optimizer, config: tensors and plain types) with the step, every rank's RNG
        states and loss sums, the data position and the counters, written atomically by rank 0."""
        self._log_bad_samples()
        rng, sums = gather(rng_state(self.device)), gather(self.loss_sum.cpu())
        if self.master:
            save(self.path, dict(state, step=self.step, rng=rng, data=dict(consumed=self.consumed),
                                 loop=dict(loss_sum=sums, last_log=self.last_log, skipped_updates=self.skipped,
                                           bad_samples=self.bad_samples, in_a_row=self.in_a_row)))
        self.last_ckpt = self.step

    def stop_if_signalled(self, stop, steps, state, script, argv, bar):
        """SIGTERM/SIGINT on any rank: save at this step boundary (unless just saved), say how to continue, exit 128 + signal.
        `state()` gives what save needs; the progress bar is closed first, so the message is the last line."""
        if not stop_agreed(stop, self.device) or self.step >= steps:
            return
        if self.last_ckpt != self.step:
            self.save(state())
        bar.close()
        if self.master:
            self.log_file.close()
            print(f'{stop.name or "a signal on another rank"}: saved {self.path} at step {self.step} of {steps}. '
                  f'To continue: {resume_hint(script, argv)}', file=sys.stderr)
        if dist.is_initialized():                # every rank leaves together, so gloo/NCCL shut down cleanly
            dist.barrier()
            dist.destroy_process_group()
        raise SystemExit(128 + (stop.signum if stop.name else signal.SIGTERM))

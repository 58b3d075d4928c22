"""data2vec pretraining, one flat script (read top to bottom, like nanoGPT's train.py).

    python train.py --modality speech                     # or vision, text: tiny preset, CPU, embedded data, ≤ 5 min
    torchrun --nproc_per_node 8 train.py --modality speech --preset base --data /path/to/LibriSpeech --compile
    python train.py --modality speech --preset base --init models/data2vec-audio-base --data DIR   # from released weights

Sections: the data2vec step → building and curves → main (flags → build → loop). Flags, presets and checks are in
config.py; each modality's data and batches in data/<modality>.py; the loop's bookkeeping in checkpoint.RunState.
Outputs in --out: config.json, log.jsonl, checkpoint.pt, curves.png.
"""
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from checkpoint import CheckpointError, RunState, StopSignal, ignore_stop_signals, resume_changes, seed_all, update_is_finite
from config import UNCHANGED_DEFAULTS, ModelConfig, check_config, lr_at, parse_train_args, pick_device, to_device
from data import DataError, batches
from model import build_student, cls_loss, regression_loss
from released import load_released
from teacher import Teacher, ema_decay_at, ema_update_, teacher_targets

# what a resumed run may change: where and how long it runs, not what it trains (checkpoint.resume_changes)
RESUMABLE = ('steps', 'out', 'data', 'device', 'compile', 'workers', 'log_every', 'ckpt_every', 'max_bad_steps', 'strict_data',
             'collapse_check_from')

# -------------------------------------------------------------------------------------------- the data2vec step


def masked_moments(x, mask):
    """What fairseq's compute_var needs of x (B, T, D) over the masked steps: their count n, the mean (D,) and
    M2 = Σ (x − mean)² (D,) of each channel, packed as one (1 + 2D,) tensor, so micro-batches and ranks pool exactly."""
    w = mask[..., None].float()                                        # (B, T, 1)
    n = w.sum()
    mean = (x * w).sum((0, 1)) / n.clamp(min=1)                        # (D,); a part with nothing masked pools as empty
    m2 = ((x - mean).square() * w).sum((0, 1))                         # (D,)
    return torch.cat([n[None], mean, m2])                              # (1 + 2D,)


def pool_moments(parts):
    """The moments of the union of the parts' masked steps (Chan et al.'s parallel variance): n = Σ nᵢ,
    mean = Σ nᵢ·meanᵢ / n, M2 = Σ (M2ᵢ + nᵢ·(meanᵢ − mean)²). One part comes back as it is."""
    if len(parts) == 1:
        return parts[0]
    p = torch.stack(parts)                                             # (P, 1 + 2D)
    D = (p.shape[1] - 1) // 2
    n_i, mean_i, m2_i = p[:, :1], p[:, 1:1 + D], p[:, 1 + D:]
    n = n_i.sum()
    mean = (n_i * mean_i).sum(0) / n                                   # (D,)
    return torch.cat([n[None], mean, (m2_i + n_i * (mean_i - mean).square()).sum(0)])


def masked_std(moments):
    """fairseq compute_var: the std over the masked steps of each channel (unbiased), averaged over channels."""
    D = (moments.shape[0] - 1) // 2
    n, m2 = moments[0], moments[1 + D:]
    return (m2 / (n - 1).clamp(min=1) + 1e-6).sqrt().mean()


def update_stds(stats, ddp):
    """(target std, prediction std) over every masked step of the update: its micro-batches (pooled in train_step) and,
    under DDP, every rank's, pooled before the square root, as fairseq all-reduces its sums. A host sync: log steps only."""
    moments = torch.stack([stats['target_moments'], stats['pred_moments']])   # (2, 1 + 2D)
    ranks = [moments]
    if ddp:
        ranks = [torch.empty_like(moments) for _ in range(dist.get_world_size())]
        dist.all_gather(ranks, moments)
    return [masked_std(pool_moments([r[i] for r in ranks])).item() for i in (0, 1)]


def forward_loss(model, teacher, batch, cfg):
    """The data2vec objective on one micro-batch: the student, fed the masked input, regresses at the
    masked steps the teacher's average of its top-K normalised blocks for the unmasked input.
    batch: the data module's dict (source, mask, and padding_mask or original where a modality has them; data2vec 2.0:
    ids_keep, ids_restore, and M = R / B masked copies of each sample, whose targets are the sample's: one teacher pass)."""
    mask = batch['mask']                                                          # (R, T) bool, True = masked; R = B·M
    pred, teacher_input, padding, cls = model(**batch)                            # (R, T, D); what the teacher reads
    y = teacher_targets(teacher, teacher_input, padding, cfg.target_layer, cfg.top_k, cfg.target_norm,
                        cfg.teacher_context, cfg.target_post_norm, unwrap(model).front_end)   # (B, T, D) fp32, no grad
    copies = pred.shape[0] // y.shape[0]                                          # data2vec 2.0: M copies share them
    scale = {0: None, -1: 1 / pred.shape[-1]}.get(cfg.loss_scale, cfg.loss_scale)  # None: 1/√D
    loss = 0.0
    if cls is not None and cfg.cls_loss > 0:                                      # data2vec 2.0 images: the CLS loss
        loss = cls_loss(cls, y.mean(1).repeat_interleave(copies, 0), cfg.cls_loss, cfg.cls_rows, cfg.loss_beta, scale)
    y = y.repeat_interleave(copies, 0) if copies > 1 else y                       # (R, T, D)
    loss = loss + regression_loss(pred, y, mask, cfg.loss_beta, scale)
    return loss, dict(target_moments=masked_moments(y, mask), pred_moments=masked_moments(pred.detach().float(), mask))


def train_step(model, teacher, optimizer, micro_batches, step, cfg, autocast, loss_fn=forward_loss):
    """One update: accumulate gradients over the micro-batches, clip, Adam step, then the EMA step.

    loss_fn: forward_loss, or torch.compile(forward_loss) (--compile). A NaN/Inf loss or gradient norm skips the Adam
    and EMA steps (under DDP if it happens on any rank): reading that flag is the one host sync per update. Returns
    the loss averaged over the micro-batches and their target and prediction moments pooled, as device tensors, and
    whether the update was applied.
    """
    for group in optimizer.param_groups:
        group['lr'] = lr_at(step, cfg)
    total, moments = dict(loss=0), {}
    for i, batch in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1 or not isinstance(model, DDP)
        with (nullcontext() if sync else model.no_sync()), autocast:
            loss, stats = loss_fn(model, teacher, batch, cfg)
        (loss / len(micro_batches)).backward()
        total['loss'] = total['loss'] + loss.detach() / len(micro_batches)
        for k, v in stats.items():
            moments.setdefault(k, []).append(v)
    total.update({k: pool_moments(v) for k, v in moments.items()})
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total['grad_norm'] = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip, foreach=True) if cfg.clip > 0 else
                          torch.nn.utils.get_total_norm(grads, foreach=True))
    applied = update_is_finite(total['loss'], total['grad_norm'])
    if applied:
        optimizer.step()
        tau = ema_decay_at(step + 1, cfg.ema_start, cfg.ema_end, cfg.ema_anneal_steps)
        ema_update_(teacher, Teacher.averaged_part(unwrap(model)), tau)      # what the front-end says the EMA covers
    optimizer.zero_grad(set_to_none=True)
    return total, applied

# -------------------------------------------------------------------------------------------- building and curves


def param_groups(model, cfg):
    """--no-decay-1d: biases, norms, LayerScale γ (1-D) without weight decay, and the CLS token (BEiT, v1; fairseq's
    v2 optim_overrides exempt 1-D parameters only); else all decay (fairseq's plain Adam)."""
    if not cfg.no_decay_1d:
        return model.parameters()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim == 1 or (name.endswith('cls_token') and model.cfg.version == 1) else decay).append(p)
    return [dict(params=decay), dict(params=no_decay, weight_decay=0.0)]


def unwrap(model):
    """The plain module under DDP and torch.compile: the one to EMA, save and evaluate."""
    model = getattr(model, 'module', model)
    return getattr(model, '_orig_mod', model)


def build(mcfg, cfg, device, cuda, weights=None):
    """The student (seeded by --seed: the same initial weights on every rank; `weights`: a released encoder's, the
    regression head staying fresh), its EMA teacher (a copy of the student), AdamW (Adam with decoupled weight decay;
    fused on CUDA, foreach on the CPU) and the loss function, compiled with --compile. train.main and bench.py both
    build with this."""
    torch.manual_seed(cfg.seed)
    model = build_student(mcfg)
    if weights is not None:
        model.load_state_dict(weights, strict=False)                  # checked by released.py: all but the head
    model = model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, cfg.adam_beta2), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay, **(dict(fused=True) if cuda else dict(foreach=True)))
    if cfg.compile:                                                    # student, teacher, targets, loss: one graph
        torch._dynamo.config.recompile_limit = max(8, cfg.crop // cfg.crop_step + 2)   # one graph per speech crop length
    loss_fn = torch.compile(forward_loss, dynamic=False) if cfg.compile else forward_loss
    return model, Teacher(model), optimizer, loss_fn


def plot_curves(records, path, warmup_steps):
    """loss, lr, τ, target/prediction std and throughput against step."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    steps = [r['step'] for r in records]
    panels = [('loss', 'loss'), ('lr', 'learning rate'), ('ema_decay', 'teacher EMA decay τ'),
              ('target_var', 'target std (collapse < 0.1)'), ('pred_var', 'prediction std (collapse < 0.01)'),
              ('samples_per_s', 'samples / s')]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot(steps, [r[key] for r in records], lw=1.5)
        ax.set(title=title, xlabel='step')
        ax.axvline(warmup_steps, color='grey', lw=0.8, ls=':')
        ax.grid(alpha=0.3)
    axes[1, 0].axhline(0.1, color='red', lw=1, ls='--')
    axes[1, 1].axhline(0.01, color='red', lw=1, ls='--')
    fig.suptitle('data2vec pretraining (dotted: end of warm-up)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

# -------------------------------------------------------------------------------------------- main


def main(argv=None):
    mcfg, cfg = parse_train_args(argv)
    ddp = 'RANK' in os.environ
    if ddp:
        dist.init_process_group('nccl' if torch.cuda.is_available() and cfg.device != 'cpu' else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device, cuda, autocast = pick_device(cfg.device, int(os.environ.get('LOCAL_RANK', 0)))
    accum = cfg.batch_size // (cfg.micro_batch_size * world)           # the global batch does not depend on the GPU count
    run = RunState(cfg.out, cfg.resume, rank, world, device)           # --out checked now; checkpoint.pt opened (--resume)
    released = None
    if cfg.init:                                                       # a released encoder: its architecture, our training
        released = load_released(cfg.init)
        keep = ('dropout', 'attn_dropout', 'layerdrop', 'drop_path', 'ema_front_end', 'feature_grad_mult')
        if released.mcfg.modality != mcfg.modality:
            raise DataError(f'--init {cfg.init}: a {released.mcfg.modality} model; --modality is {mcfg.modality}')
        mcfg = ModelConfig(**{**asdict(released.mcfg), **{k: getattr(mcfg, k) for k in keep}})
        cfg.tokenizer = cfg.tokenizer or (cfg.init if mcfg.modality == 'text' else '')
        try:
            check_config(mcfg, cfg, world)
        except ValueError as e:
            raise DataError(f'--init {cfg.init}: {e}') from None
        if run.master:
            print(f'{cfg.init}: {mcfg.layers} blocks × {mcfg.dim}; ' + '; '.join(released.notes or ['every tensor loaded']))
    dataset, collate = data.modality(mcfg.modality).pretraining_data(mcfg, cfg, run.out if run.ckpt else None)
    unreadable = getattr(dataset, 'unreadable', None) or []            # files left out at start-up
    changes = run.ckpt and resume_changes({**run.ckpt['config']['model'], **run.ckpt['config']['train']},
                                          {**asdict(mcfg), **asdict(cfg)}, RESUMABLE, run.path,     # after the tokenizer
                                          UNCHANGED_DEFAULTS)
    if run.master:
        (run.out / 'config.json').write_text(json.dumps(dict(model=asdict(mcfg), train=asdict(cfg)), indent=2))
        if hasattr(dataset, 'save') and not run.ckpt:
            dataset.save(run.out)                                      # text: tokenizer.json, to read the ids back
        for note in getattr(dataset, 'notes', []) + (unreadable and [f'skipped {len(unreadable)} unreadable files '
                                                     f'(--strict-data stops instead), e.g. {unreadable[0]}']):
            print(note)

    if released and mcfg.vocab_size != released.mcfg.vocab_size:
        raise DataError(f'--tokenizer {cfg.tokenizer}: {mcfg.vocab_size} tokens; --init {cfg.init} has {released.mcfg.vocab_size}')
    model, teacher, optimizer, loss_fn = build(mcfg, cfg, device, cuda, released and released.encoder)
    seed_all(cfg.seed + rank)                                          # different dropout on every rank

    def load(ckpt):
        model.load_state_dict(ckpt['student'])
        teacher.load_state_dict(ckpt['teacher'])                       # the fp32 EMA weights
        optimizer.load_state_dict(ckpt['optimizer'])
    resumed = run.restore(cfg.steps, load)
    if run.master and resumed:
        print(resumed + (f'; changed: {", ".join(changes)}' if changes else ''))
    stream = batches(dataset, collate, cfg.micro_batch_size, cfg.seed, rank, world, cfg.workers, pin=cuda, start=run.consumed,
                     strict=cfg.strict_data, init_fn=ignore_stop_signals)
    if run.master:
        print(f'torch {torch.__version__} on {device} × {world}; {len(dataset)} {mcfg.modality} samples '
              f'({cfg.data or "embedded synthetic set"}); batch {cfg.batch_size} = {cfg.micro_batch_size} × {accum} accumulation × {world}')
        shared = ', less its ' + ', '.join(unwrap(model).front_end.shared) if unwrap(model).front_end.shared else ''
        print(f'data2vec {"2.0" if mcfg.version == 2 else "v1"}: student {model.num_params() / 1e6:.2f} M parameters + '
              f'{model.head.replace("_", " ")} {(model.num_params(True) - model.num_params()) / 1e6:.2f} M; teacher (EMA of the '
              f'Transformer{" and the front-end" + shared if teacher.front_end is not None else ""}): '
              f'{sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M')
    if ddp:
        model = DDP(model, device_ids=[device.index] if cuda else None)
    run.open_log(unreadable)

    def state():                                                       # what a checkpoint holds besides the run's counters
        return dict(student=unwrap(model).state_dict(), teacher=teacher.state_dict(), optimizer=optimizer.state_dict(),
                    config=dict(model=asdict(mcfg), train=asdict(cfg)))
    warmup_steps = int(cfg.warmup * cfg.steps)
    guard_from = cfg.collapse_check_from or max(warmup_steps, 10)   # a fresh vision student predicts alike at every masked patch
    t0 = t_start = time.time()
    data_s = 0.0                                                       # time spent waiting for data since the last log line
    with StopSignal() as stop, tqdm(total=cfg.steps, initial=run.step, disable=not run.master, desc='pretraining',
                                    dynamic_ncols=True) as bar:      # the bar closes before an error's message
        while run.step < cfg.steps:
            micro, t_wait = [], time.time()
            for _ in range(accum):
                batch, errors = next(stream)                           # errors: samples that could not be read, replaced
                run.took_batch(errors)
                micro.append(to_device(batch, device))
            data_s += time.time() - t_wait                             # waiting for the loader (and the copies' launch)
            stats, applied = train_step(model, teacher, optimizer, micro, run.step, cfg, autocast, loss_fn)
            run.after_update(applied, stats['loss'], stats['grad_norm'], cfg.max_bad_steps)
            bar.update(int(applied))
            if run.due(cfg.log_every, cfg.steps, applied):            # the only other host syncs, once per log interval
                loss = run.loss_sum / (run.step - run.last_log)
                if ddp:
                    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
                loss, (target_var, pred_var) = loss.item(), update_stds(stats, ddp)   # the same collapse decision on every rank
                now = time.time()
                run.log(loss=loss, lr=lr_at(run.step - 1, cfg),
                              ema_decay=ema_decay_at(run.step, cfg.ema_start, cfg.ema_end, cfg.ema_anneal_steps),
                              target_var=target_var, pred_var=pred_var,
                              samples_per_s=(run.step - run.last_log) * cfg.batch_size / (now - t0),
                              data_frac=data_s / (now - t0), elapsed_s=now - t_start)
                t0, data_s = time.time(), 0.0
                bar.set_postfix(loss=f'{loss:.3f}', tgt_std=f'{target_var:.3f}', pred_std=f'{pred_var:.3f}')
                if run.step > guard_from and (target_var < 0.1 or pred_var < 0.01):
                    if run.master:
                        plot_curves(run.records, run.out / 'curves.png', warmup_steps)
                    saved = f'{run.path} is from step {run.last_ckpt}' if run.last_ckpt else 'no checkpoint was written yet'
                    raise SystemExit(f'collapse at step {run.step}: target std {target_var:.4f} (min 0.1), prediction std '
                                     f'{pred_var:.4f} (min 0.01). The paper lists too high a learning rate, too short a '
                                     f'warm-up and too low a τ as causes; {saved}.')
            if run.due(cfg.ckpt_every, cfg.steps, applied):
                run.save(state())
            run.stop_if_signalled(stop, cfg.steps, state, 'train.py', argv or sys.argv[1:], bar)
    if run.master and run.records:
        run.log_file.close()
        plot_curves(run.records, run.out / 'curves.png', warmup_steps)
        first, last = run.records[0], run.records[-1]
        print(f'done: {cfg.steps} steps in {time.time() - t_start:.0f} s; loss {first["loss"]:.3f} → {last["loss"]:.3f}; '
              f'target std {last["target_var"]:.3f}, prediction std {last["pred_var"]:.3f}; wrote {run.out}/'
              '{config.json, log.jsonl, checkpoint.pt, curves.png}')
    if ddp:
        dist.barrier()                     # every rank reaches the end before any tears gloo down (else: SIGABRT under load)
        dist.destroy_process_group()


if __name__ == '__main__':
    try:
        main()
    except (DataError, CheckpointError) as e:                          # one line naming the file, no traceback
        line = str(e).strip().splitlines()[-1]                         # from a loader worker, the message ends with the original
        sys.exit(f'train.py: error: {line.removeprefix("data.DataError: ")}')

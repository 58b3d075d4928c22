"""Benchmark of train.py's pretraining step on one device: step time, throughput, FLOPs, MFU, peak memory.

The model, teacher, optimizer, loss and data pipeline are built with train.py's own functions, and the step timed is
train.train_step itself, on an in-memory synthetic set of the benchmark's shape (noise clips, noise images, random
token blocks) fed through data.batches: masking, augmentation, loader workers and pinned memory cost what they cost
in training. Any other train.py flag is passed on (--top-k 4, --dim 256, …). One JSON line on stdout.

    python bench.py --modality speech --batch-size 8 --seconds 15.6       # data2vec Base, 8 clips of 15.6 s
    python bench.py --modality vision --batch-size 64                     # ViT-B/16 on 224² images
    python bench.py --modality text --batch-size 32                       # RoBERTa-base on blocks of 512 tokens
    python bench.py --modality speech --compile && python .bench/peer_hf.py --modality audio --batch 8   # vs HF

peer_hf.py (../shared/bench, copied into .bench/) is the same step built from HF transformers. Timing: --warmup
untimed steps (torch.compile compiles, workers start), then --steps steps between CUDA syncs. train_step syncs the
host once per update, so `data_frac` (the time in next(stream) and the host → device copies) is the GPU waiting.
`host_syncs` counts the calls in one step that make the host wait for the GPU (CUDA's sync debug mode; the NaN/Inf
check is one). --profile prints where the time of a step goes (torch.profiler, the top 20 ops).

FLOPs: one more eager step (train.forward_loss, never compiled) under FlopCounterMode. It counts matmuls (2·m·n·k;
backward 2×: input and weight gradients), convolutions and attention (SDPA: QKᵀ and AV, 4·B·T²·D forward; backward
5 matmuls, 2.5×, the scores recomputed) in the teacher's forward and the student's forward and backward, not the
elementwise work (norms, GELU, softmax, loss, Adam, EMA), negligible next to them. torch counts no FLOPs for SDPA's
fused CPU kernel; CORRECTED counts it as the CUDA kernels, and grouped convolutions' backward as grouped. SDPA's math path (on the CPU: dropout, vision's float
bias) is counted as its matmuls: backward 2×. mfu = FLOPs / step time / --peak (790e12 as peer_hf.py; peak.py
measured 731e12 on one H100).
"""
import argparse
import json
import sys
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count
from tqdm import tqdm

import data
import train
from config import parse_train_args, pick_device, to_device
from data import batches
from data.speech import MIN_SECONDS

BATCH = dict(speech=8, vision=64, text=32)                            # the base benchmarks' batch per device


def conv_backward_flops(grad_out, x, w, _bias, _stride, _padding, _dilation, transposed, _output_padding, _groups,
                        output_mask, *_, **__):
    """A convolution's backward: each gradient asked for (input, weight) costs one forward pass, 2 · output elements ·
    C_in/groups · kernel. torch 2.13's own count treats a grouped convolution's input gradient as ungrouped (17× too
    much for the positional conv's 16 groups; tests/test_bench.py)."""
    return conv_flop_count(x, w, grad_out, transposed) * (int(output_mask[0]) + int(output_mask[1]))


CORRECTED = {   # FlopCounterMode custom_mapping: shapes in, FLOPs out
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *_, **__: sdpa_backward_flop_count(grad, q, k, v),
    torch.ops.aten.convolution_backward: conv_backward_flops}


def sig(x, digits=4):                                                  # rounded to `digits` significant digits
    return float(f'{x:.{digits}g}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False,
                                epilog='Every other flag goes to train.py (python train.py --help).')
    p.add_argument('--modality', default='speech', choices=list(BATCH))
    p.add_argument('--preset', default='base')
    p.add_argument('--batch-size', type=int, help='samples per step on one device, no accumulation (speech 8, vision 64, text 32)')
    p.add_argument('--steps', type=int, default=20, help='timed steps')
    p.add_argument('--warmup', type=int, default=5, help='untimed steps first (compilation, loader start-up)')
    p.add_argument('--compile', action='store_true', help='torch.compile(train.forward_loss), as train.py --compile (train.build)')
    p.add_argument('--version', type=int, default=1, help='data2vec version')
    p.add_argument('--peak', type=float, default=790e12, help='the device\'s peak FLOP/s, for mfu')
    p.add_argument('--seconds', type=float, default=15.6, help='speech: clip length')
    p.add_argument('--device', default='auto')
    p.add_argument('--workers', type=int, default=4)
    p.add_argument('--profile', action='store_true',
                   help='then 3 more steps under torch.profiler: the top 20 ops by device time, on stderr')
    args, rest = p.parse_known_args(argv)
    B = args.batch_size if args.batch_size is not None else BATCH[args.modality]
    for ok, msg in [(args.version in (1, 2), f'--version {args.version}: choose 1 or 2'),
                    (B >= 1, f'--batch-size {B} must be ≥ 1'), (args.steps >= 1, f'--steps {args.steps} must be ≥ 1'),
                    (args.warmup >= 0, f'--warmup {args.warmup} must be ≥ 0'), (args.peak > 0, f'--peak {args.peak} must be > 0'),
                    (args.seconds >= MIN_SECONDS, f'--seconds {args.seconds} must be ≥ {MIN_SECONDS} (> 0)')]:
        if not ok:
            p.error(msg)
    mcfg, cfg = parse_train_args(rest + ['--modality', args.modality, '--preset', args.preset, '--batch-size', str(B),
                                         '--micro-batch-size', str(B), '--device', args.device, '--workers', str(args.workers),
                                         '--compile' if args.compile else '--no-compile', '--version', str(args.version)])

    # ---- built as train.main builds them, on a synthetic set of the benchmark's shape (noise clips, images, token blocks)
    device, cuda, autocast = pick_device(cfg.device)
    timed = args.warmup + args.steps                                   # + 1 sync step + 2 FLOP steps: one epoch, workers start once
    profiled = 3 if args.profile else 0
    # before build: bench_data sets what the data fix (speech: --crop to the clips' length, which build's recompile limit
    # reads; text: the <pad> id of its specials)
    dataset, collate, shape = data.modality(mcfg.modality).bench_data(mcfg, cfg, (timed + 3 + profiled) * B, args.seconds, cfg.seed)
    model, teacher, optimizer, loss_fn = train.build(mcfg, cfg, device, cuda)
    stream = batches(dataset, collate, B, cfg.seed, workers=cfg.workers, pin=cuda)

    def next_batch():
        batch, _ = next(stream)
        return [to_device(batch, device)]

    # ---- timed steps
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    data_s, skipped = 0.0, 0
    for step in tqdm(range(timed), desc=f'bench {args.modality}', file=sys.stderr, disable=not sys.stderr.isatty()):
        if step == args.warmup:
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t_start, data_s, skipped = time.perf_counter(), 0.0, 0
        t0 = time.perf_counter()
        micro = next_batch()
        data_s += time.perf_counter() - t0
        stats, applied = train.train_step(model, teacher, optimizer, micro, step, cfg, autocast, loss_fn)
        skipped += not applied
    sync()
    step_s = (time.perf_counter() - t_start) / args.steps
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None

    # ---- where the time goes (--profile): the ops of a few more steps, by device time
    if profiled:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
            for i in range(profiled):
                train.train_step(model, teacher, optimizer, next_batch(), timed + i, cfg, autocast, loss_fn)
            sync()
        print(prof.key_averages().table(sort_by='cuda_time_total' if cuda else 'cpu_time_total', row_limit=20,
                                        max_name_column_width=70), file=sys.stderr)

    # ---- host syncs in one step: on CUDA, torch warns at every call that waits for the device
    syncs = None
    if cuda:
        micro = next_batch()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            train.train_step(model, teacher, optimizer, micro, timed, cfg, autocast, loss_fn)
            torch.cuda.set_sync_debug_mode('default')
        syncs = sum('called a synchronizing' in str(w.message) for w in caught)   # not the mode's own 'prototype' notice

    # ---- FLOPs of one eager step
    micro = next_batch()
    with FlopCounterMode(display=False, custom_mapping=CORRECTED) as counter:
        train.train_step(model, teacher, optimizer, micro, timed, cfg, autocast, train.forward_loss)
    flops = counter.get_total_flops()
    # forward FLOPs of the student's blocks, the teacher's and the decoder: one more forward pass (FlopCounterMode
    # attributes forward work to modules; its attribution of the backward pass is not reliable)
    with torch.no_grad(), autocast, FlopCounterMode(display=False, custom_mapping=CORRECTED) as forward:
        train.forward_loss(model, teacher, next_batch()[0], cfg)
    stream.close()                                                     # stops the loader workers
    by_module = forward.get_flop_counts()                             # {'Data2Vec2.encoder': {op: FLOPs}, 'Teacher.encoder': …}
    part = lambda *names: sum(sum(by_module.get(n, {}).values()) for n in names)
    parts = dict(student_blocks=part('Data2Vec.encoder', 'Data2Vec2.encoder'), teacher_blocks=part('Teacher.encoder'),
                 decoder=part('Data2Vec2.decoder'))
    result = dict(bench='data2vec-reference', modality=args.modality, preset=args.preset, version=args.version,
                  compile=args.compile, batch=B, **shape, step_ms=sig(step_s * 1000), samples_per_s=sig(B / step_s),
                  tokens_per_s=sig(B * shape['tokens_per_sample'] / step_s),
                  step_tflop=sig(flops / 1e12), **{f'{k}_fwd_tflop': sig(v / 1e12) for k, v in parts.items()},
                  mfu=sig(flops / step_s / args.peak),
                  peak_mem_gb=round(peak_mem, 2) if cuda else None, data_frac=sig(data_s / (step_s * args.steps), 3),
                  host_syncs=syncs, loss=sig(float(stats['loss'])), skipped_updates=skipped,
                  device=torch.cuda.get_device_name(device) if cuda else 'cpu', torch=torch.__version__)
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()

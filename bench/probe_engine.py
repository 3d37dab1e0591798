"""Probe: the engine decoder (tools.imagenet.nvjpeg) alone, in several threads, and beside a
training step, with its host time split into header probes, the pinned copy, the call's set-up,
the wait for the decode lock and the decode call.

    python bench/probe_engine.py --images 5120          # GPU machine, under a minute
    python bench/probe_engine.py --threads 2,3 --turns lock,free   # decoders taking turns or not
    python bench/probe_engine.py --threads 2 --loads gil,gpu --states 1,2   # what slows the call
    python bench/probe_engine.py --threads 2 --loads gil --turns lock,native   # the turn without the GIL
    python bench/probe_engine.py --threads 2 --loads gpu --outputs rgb,yuv,rgbi   # the call without conversion
    python bench/probe_engine.py --threads 2 --loads gpu --call-images 256,512,1024   # fewer, larger calls

Answers whether the decode call slows down beside the step (the GPU: nvJPEG waits on its own work
per image) or the Python around it does (the GIL). --turns free runs each row again with the
process's decoders entering nvJPEG's decode call at once (NvjpegDecoder(turn="free")): phase 5
of bench/NOTES-gpu.md saw two of them hang in it beside a step, and phase 19 again, with the buffers
sized up front (driver 580); a hang ends the probe with every thread's stack (faulthandler).

Beside a step the decode call takes 2-3 times as long as alone, and in a DDP rank longer still
(phase 19). --loads asks which half of the step does it: "gil" runs pure Python beside the decode
(holds the GIL, no GPU work: the call ends only once its thread has the GIL back), "gpu"
back-to-back bf16 matmuls (every SM busy, one Python operation a millisecond: the decode's GPU work
queues behind them). --states N gives each thread N decoders used in turn. Phase 20's answer
(1 x H200): both, the GPU most: 4.7 ms per batch alone, 11 beside the GIL load, 139 beside the
matmuls (7.6 with the matmuls on a green context of 112 SMs, --step-sms 112); two decoders per
thread made it longer, not shorter. Phase 21's answer: the wait was in the GPU's hardware work
queues, which a process's streams share (8 by default): with --cuda-connections 32 (tools.train's
default since) the call beside the matmuls took 27 ms instead of 120. --outputs (what the engines
write) and --call-images (images per call) did not change it: the wait is per image.

    python bench/probe_engine.py --threads 2 --loads gil --switch-ms 5,1,0.5

--switch-ms runs each row per GIL switch interval: the thread back from the call holds the
decoders' lock until it has the GIL again, up to one interval, while the engines idle. --turns
native takes the turn in native code instead (tools.imagenet.engine_turn), where it passes to the
next thread without the GIL.
"""
import argparse
import faulthandler
import functools
import itertools
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_loader as bl  # noqa: E402
from tools.imagenet import gpu_data as gd  # noqa: E402
from tools.imagenet.distributed import add_cuda_connections_flag, cuda_connections  # noqa: E402
from tools.imagenet.nvjpeg import OUTPUTS, TURNS, NvjpegDecoder  # noqa: E402


STEP_STREAM = []  # set by --step-sms: the step's stream on part of the SMs


def run(batches, n_threads, seconds, step=None, crop=None, turn="lock", per_call=256, states=1, output="rgb"):
    """n_threads decode threads (own stream, `states` decoders each, used in turn) for `seconds`,
    optionally beside a thread calling `step` flat out: (decode img/s, step calls/s x per_call, ms per
    batch per part)."""
    # a row that takes 20 times its time hung (e.g. in nvJPEG's decode call): every thread's stack, exit
    faulthandler.dump_traceback_later(seconds * 20 + 30, exit=True)
    stop = threading.Event()
    mine = [[NvjpegDecoder("cuda", turn=turn, output=output) for _ in range(states)] for _ in range(n_threads)]
    decoders = [d for ds in mine for d in ds]
    counts = [0] * (n_threads + 1)

    def decode(k):
        with torch.cuda.stream(torch.cuda.Stream()):
            j, pending = k, []
            while not stop.is_set():
                data, offsets = batches[j % len(batches)]
                decoder = mine[k][(j // n_threads) % states]
                out = gd.decode_packed(data, offsets, [""] * (len(offsets) - 1), "cuda", decoder)[0]
                if crop is not None:
                    crop(out, j)
                # at most two batches ahead of the GPU, as the pipeline's slots allow
                pending.append(torch.cuda.Event())
                pending[-1].record()
                if len(pending) > 2:
                    pending.pop(0).synchronize()
                counts[k] += len(offsets) - 1
                j += n_threads
            torch.cuda.current_stream().synchronize()

    def train():
        with torch.cuda.stream(STEP_STREAM[0] if STEP_STREAM else torch.cuda.Stream()):
            calls = 0
            while not stop.is_set():
                step()
                counts[-1] += per_call
                calls += 1
                if calls % 10 == 0:  # a bounded queue, as a training loop has
                    torch.cuda.current_stream().synchronize()
            torch.cuda.current_stream().synchronize()
    threads = [threading.Thread(target=decode, args=(k,)) for k in range(n_threads)]
    if step is not None:
        threads.append(threading.Thread(target=train))
    for t in threads:
        t.start()
    time.sleep(1.0)
    start = list(counts)
    for d in decoders:
        d.seconds = dict.fromkeys(d.seconds, 0.0)
    t0 = time.perf_counter()
    time.sleep(seconds)
    end = list(counts)
    parts = {k: sum(d.seconds[k] for d in decoders) for k in gd.ENGINE_PARTS}
    n = sum(d.seconds["batches"] for d in decoders)
    dt = time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join()
    rates = [(e - s) / dt for s, e in zip(start, end)]
    return (sum(rates[:n_threads]), rates[-1] if step else 0.0,
            {k: round(v / max(n, 1) * 1000, 2) for k, v in parts.items()})


def train_step(kind):
    """tools.train's step: AlexNet-BN, fused SGD, bf16; eager, or (graph, --cuda-graphs) captured
    after WARMUP eager steps on the stream of the thread that first calls it and replayed. Both
    kinds share everything but the capture, so their rows differ by it alone."""
    from tools.imagenet.graphed import GraphedStep
    from tools.imagenet.models import build_model
    from tools.imagenet.step import eager_step, sgd
    model = build_model("alexnetowtbn", 1000).cuda().to(memory_format=torch.channels_last).train()
    opt = sgd(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, kernel="fused")
    if kind == "graph":
        return GraphedStep(model, opt, torch.bfloat16, 256)
    return eager_step(model, opt, torch.bfloat16, torch.device("cuda"))


def step_name(kind):
    return "step" if kind == "eager" else f"{kind} step"


def gil_load():
    """Pure Python, about a millisecond a call: holds the GIL (but for the interpreter's switch
    interval) and gives the GPU nothing."""
    def call():
        total = 0
        for i in range(20000):
            total += i * i
        return total
    return call


def gpu_load():
    """One bf16 8192 x 8192 matmul a call: about a millisecond of every SM on an H100/H200 for one
    Python operation (little GIL)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b, out = torch.randn_like(a), torch.empty_like(a)
    return functools.partial(torch.mm, a, b, out=out)


LOADS = {"gil": gil_load, "gpu": gpu_load}


def comma_list(parser, flag, text, allowed):
    """The names in `text` (comma-separated), each one of `allowed`, else the parser's error."""
    names = [x for x in text.split(",") if x]
    if not set(names) <= set(allowed):
        parser.error(f"{flag} {text}: give some of {', '.join(allowed)}")
    return names


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=5120)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--step-sms", type=int, default=0, help="run the step on this many SMs (green context)")
    p.add_argument("--threads", default="1,3", help="decode threads beside the step")
    p.add_argument("--steps", default="eager", help="comma-separated kinds of step to run beside the "
                   "decode: eager (tools.train's), graph (tools.train --cuda-graphs: AlexNet-BN with "
                   "fused SGD captured as one CUDA graph, replayed)")
    p.add_argument("--turns", default="lock", help="comma list of how the process's decoders take turns at "
                   "the decode call: lock (a Python lock, tools.train's default), native (a mutex taken "
                   "and given up within the call, tools.train --engine-turn native), free (no turns)")
    p.add_argument("--loads", default="", help="comma list of loads beside the decode (x --threads) "
                   "instead of a step: gil (pure Python) and/or gpu (bf16 matmuls); their rate is "
                   "in calls/s")
    p.add_argument("--states", default="1", help="comma list: decoders per decode thread, used in turn "
                   "(each row runs once per value)")
    p.add_argument("--switch-ms", default="", help="comma list: sys.setswitchinterval values in ms, each "
                   "row run once per value (default: Python's, 5 ms). A decode thread back from the "
                   "decode call waits up to that long for the GIL, holding the decoders' lock")
    p.add_argument("--outputs", default="rgb", help="comma list of what the engines write: rgb (planar, what "
                   "training uses), yuv (planar, chroma subsampled as in the JPEG), rgbi (interleaved); "
                   "each row runs once per value, the crop rows with rgb only. Asks whether the call "
                   "waits for a colour conversion kernel on the SMs")
    add_cuda_connections_flag(p)
    p.add_argument("--call-images", default="256", help="comma list: images per decode call (each row runs "
                   "once per value). Asks whether the call's wait for the SMs is per call or per image")
    args = p.parse_args()
    cuda_connections(args.cuda_connections)
    call_images = [int(n) for n in args.call_images.split(",")]
    if min(call_images) < 1 or max(call_images) > args.images:
        p.error(f"--call-images: give numbers from 1 to --images ({args.images})")
    outputs = comma_list(p, "--outputs", args.outputs, OUTPUTS)
    all_turns = comma_list(p, "--turns", args.turns, TURNS)
    loads = comma_list(p, "--loads", args.loads, LOADS)
    all_states = [int(n) for n in args.states.split(",")]
    if min(all_states) < 1:
        p.error("--states: give numbers of at least 1")
    switch_ms = [float(v) for v in args.switch_ms.split(",") if v] or [sys.getswitchinterval() * 1000]
    if min(switch_ms) <= 0:
        p.error("--switch-ms: give milliseconds above 0")
    kinds = comma_list(p, "--steps", args.steps, ("eager", "graph"))
    if args.step_sms:
        from tools.imagenet.sm_partition import partitioned_stream
        stream, got, total = partitioned_stream("cuda", args.step_sms)
        STEP_STREAM.append(stream)
        print(f"step on {got} of {total} SMs", flush=True)
    blobs = bl.make_jpegs(args.images)
    packed = {}  # images per decode call -> that many JPEGs per packed batch
    for size in call_images:
        packed[size] = [(data, offsets.numpy()) for data, offsets in
                        (gd.pack_jpegs(blobs[i:i + size]) for i in range(0, len(blobs) - size + 1, size))]
    batches = packed[call_images[0]]
    print(f"{len(blobs)} JPEGs, {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    steps = {kind: train_step(kind) for kind in kinds}
    x = torch.randn(256, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (256,), device="cuda")
    aug = gd.GpuAugment(224, mode="rrc", mean=bl.MEAN, std=bl.STD, dtype=torch.bfloat16)
    rows = []

    def row(name, *result):
        rows.append((name, *result))
        print(name, result, flush=True)
    beside = [int(t) for t in args.threads.split(",")]
    load_calls = {name: LOADS[name]() for name in loads}
    for kind in kinds:  # each step, then each load, alone once
        row(f"{step_name(kind)} alone", 0.0, run(batches, 0, args.seconds, step=lambda: steps[kind](x, y))[1], {})
    for name, call in load_calls.items():
        row(f"{name} load alone (calls/s)", 0.0, run(batches, 0, args.seconds, step=call, per_call=1)[1], {})
    for ms, states, turns, output, size in itertools.product(switch_ms, all_states, all_turns, outputs, call_images):
        sys.setswitchinterval(ms / 1000)
        tag = (("" if turns == "lock" else f", {turns}") + (f", {states} states" if states > 1 else "")
               + (f", switch {ms:g} ms" if len(switch_ms) > 1 else "") + ("" if output == "rgb" else f", {output}")
               + ("" if size == 256 else f", {size} a call"))
        go = functools.partial(run, packed[size], seconds=args.seconds, turn=turns, states=states, output=output)
        for threads in sorted({1, 2, 3} | set(beside)):
            row(f"decode x{threads}{tag}", *go(threads))
        if output == "rgb":
            row(f"decode+crop x3{tag}", *go(3, crop=aug))
        for kind in kinds:
            step = functools.partial(steps[kind], x, y)
            for threads in beside:
                row(f"{step_name(kind)} + decode x{threads}{tag}", *go(threads, step=step))
            if output == "rgb":
                row(f"{step_name(kind)} + decode+crop x3{tag}", *go(3, step=step, crop=aug))
        for name, call in load_calls.items():
            for threads in beside:
                row(f"{name} load + decode x{threads}{tag}", *go(threads, step=call, per_call=1))
    print("\n| run | decode img/s | step img/s (loads: calls/s) | host ms per decode call: probe / copy / call "
          "set-up / lock wait / decode call / after the call |\n|---|---|---|---|")
    for name, dec, st, parts in rows:
        split = " / ".join(str(parts.get(k, "-")) for k in gd.ENGINE_PARTS)
        print(f"| {name} | {dec:.0f} | {st:.0f} | {split} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One GPU against several, same data, same call: the training rate of tools.train on shards the
workflow prepared once, each setting repeated (runs interleaved, so drift of the machine hits all
alike; every second repeat in reverse order, so a steady drift does too), medians and the N-GPU /
1-GPU ratio printed last.

    python bench/bench_scaling.py --work /tmp/scaling --gpus 1,2 --repeats 2
    python bench/bench_scaling.py --work /tmp/scaling --variant 'sync-step:--bn-stats-sync step' \\
        --variant 'nch4:NCCL_MAX_NCHANNELS=4' --variant-gpus 2 --independent --gil 2

Each run is `torchrun --nproc-per-node G -m tools.train` (AlexNet-BN, bf16, channels_last, decode
gpu, batch --batch-per-gpu per GPU); the 1-GPU runs are pinned to --cpus-per-gpu CPUs (the issue's
one GPU with 16 cores), the others use the whole machine. Its rate is the median of the last
epoch's 10-step log intervals (the first dropped), with every rank's data wait, host time issuing
the steps, GPU time in steps, and on the GPU data path its fetch thread's wait for the loader
workers and its decode threads' busy time (tools.train's per-rank log fields: a rank slow for
data waits on its workers or its decoders). Every epoch has
--epoch-images images whatever the GPU count (tools.train --epoch-size; the train stream goes
round the 50,000 generated images again): 240,000 give 2-GPU epochs of 468 steps, 46 measured
intervals, ~7 s. Epochs of one pass over 80,000 images (15 intervals, ~2.5 s) were too short: a
few seconds' slowdown decided a run, and one setting's 2-GPU runs spread from 23.5k to 38.6k img/s
on 2 x H200 (bench/NOTES-gpu.md, phase 9). Each run
ends with every rank timing --step-alone train steps on synthetic batches (tools.train --step-alone),
printed per run: a slow run whose ranks are slow alone too kept slow kernels (e.g. cuDNN's choice).
The summary json is rewritten after every run, so a call cut short keeps what it measured. A run
that logs nothing for --timeout seconds is counted as hung: py-spy (where on PATH) writes the native and
Python stacks of every thread of its processes to runs/<label>.stacks.txt (each thread's innermost
frames printed too), its whole process tree is
killed, and the other runs go on (medians leave hung runs out; the tables count them). On GPUs
nvidia-smi samples every GPU's SM clock, power, temperature and clock-limit reasons through each run
(bench/gpu_sampler.py), printed on the run's line: a machine slowing within a call shows there.

--independent adds N separate 1-GPU trainings at once (own GPU and CPUs each): what the data path
gives N GPUs when no gradients are exchanged, so the DDP run's shortfall from it is DDP's cost.

--gil G adds one run on G GPUs, sampled from its second epoch on by py-spy (`record --gil`: only
the thread holding the GIL is sampled), and prints per process and thread the functions holding
the GIL: a training thread starved of the GIL shows as the pipeline threads' frames. Needs py-spy
on PATH, and ptrace rights on the run's processes.
"""
import argparse
import collections
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench_e2e  # noqa: E402
from gpu_sampler import GpuSampler, describe  # noqa: E402


def parse_variant(text):
    """'name:[VAR=value ...] --flag value ...' -> (name, [flags], {env}); leading VAR=value words
    set environment variables of the run (e.g. NCCL settings), as in a shell."""
    name, _, rest = text.partition(":")
    if not name or not re.fullmatch(r"[\w.-]+", name):
        raise argparse.ArgumentTypeError(f"variant {text!r}: give NAME:FLAGS, NAME in letters, digits, . _ -")
    words, env = rest.split(), {}
    while words and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):
        var, _, value = words.pop(0).partition("=")
        env[var] = value
    return name, words, env


def prepare(args):
    """Shards from the real workflow (make_mini -> extract -> resize -> shard); returns their folder."""
    if args.shards:
        return args.shards
    cfg = argparse.Namespace(work=args.work, classes=args.classes, train_per_class=args.train_per_class,
                             val_per_class=args.val_per_class, shard_size=args.shard_size, noise=args.noise,
                             gpus=1, device=args.device, workers_per_gpu=args.workers_per_gpu,
                             batch_per_gpu=args.batch_per_gpu, epochs=args.epochs, decode="auto",
                             cpu_fraction=0.0, gpu_decoder="auto", decode_threads=2)
    config_path = args.work / "bench.yaml"
    config_path.write_text(yaml.safe_dump(bench_e2e.workflow_config(cfg)))
    bench_e2e.run([sys.executable, "-m", "snakemake", "--cores", os.cpu_count(), "prepare",
                   "--configfile", config_path])
    return args.work / "work/shards"


def train_command(args, shards, out, gpus, flags, first_cpu=0):
    """One torchrun of tools.train; a 1-GPU run is pinned to --cpus-per-gpu CPUs from first_cpu
    (where the machine has more, as the issue's one GPU with 16 cores)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", gpus]
    cpus, machine = args.cpus_per_gpu, os.cpu_count() or 1
    if gpus == 1 and cpus and shutil.which("taskset") and machine > cpus and machine >= first_cpu + cpus:
        launcher = ["taskset", "-c", f"{first_cpu}-{first_cpu + cpus - 1}", *launcher]
    return [*launcher, "-m", "tools.train", "--shards", shards, "--out", out, "--arch", args.arch,
            "--batch-size", args.batch_per_gpu * gpus, "--workers", args.workers_per_gpu,
            "--epochs", args.epochs, "--log-every", 10, "--seed", 1, "--device", args.device,
            "--step-alone", args.step_alone, *epoch_size(args, gpus), *args.train_args.split(), *flags]


def epoch_size(args, gpus):
    """tools.train flags for epochs of --epoch-images images on `gpus` GPUs (none: one pass)."""
    if not args.epoch_images:
        return []
    return ["--epoch-size", max(1, args.epoch_images // (args.batch_per_gpu * gpus))]


def run_order(settings, repeat):
    """The settings in order on even repeats and reversed on odd ones (A B B A ...): a machine that
    drifts steadily through a call (phase 12 of bench/NOTES-gpu.md saw one slow down by 20 %) then
    weighs on every setting alike instead of always on the last."""
    return list(reversed(settings)) if repeat % 2 else list(settings)


def sample_gil(proc, out, log, raw, seconds, stall):
    """Once `proc` (a training run writing to `out`, its output to `log`) logs its first line of
    epoch 2, py-spy samples the thread holding the GIL in it and its children for `seconds` into
    `raw`: the steady state, not the start-up's imports. Gives up when the run ends first or its
    log stays still for `stall` seconds."""
    metrics, idle = out / "metrics.jsonl", idle_clock(log)
    while not (metrics.is_file() and '"epoch": 2' in metrics.read_text()):
        if proc.poll() is not None or idle() > stall:
            raise SystemExit(f"error: the run for --gil ended or stalled before epoch 2 ({out})")
        time.sleep(0.2)
    subprocess.run([shutil.which("py-spy"), "record", "--pid", str(proc.pid), "--gil", "--nonblocking",
                    "--subprocesses", "--threads", "--format", "raw", "--rate", "200",
                    "--duration", str(seconds), "--output", str(raw)],
                   check=True, stdout=subprocess.DEVNULL, timeout=seconds + 60)


def dump_stacks(pid, path):
    """Every thread's native and Python stacks in process `pid` and its children (py-spy dump) into
    `path`: where a hung run's ranks wait (phase 13 of bench/NOTES-gpu.md: a lock in the CUDA
    driver). Without py-spy on PATH the file says so."""
    spy = shutil.which("py-spy")
    if spy is None:
        path.write_text("py-spy is not on PATH: no stacks (pip install py-spy)\n")
        return path
    with open(path, "w") as f:
        subprocess.run([spy, "dump", "--pid", str(pid), "--subprocesses", "--native"], stdout=f,
                       stderr=subprocess.STDOUT, timeout=300)
    return path


def stacks_digest(text, frames=6):
    """The innermost `frames` frames of every thread in a py-spy dump, under its process and thread
    lines: printed with the bench's own output, so a device call that brings back only that log
    still tells where a hung run's threads waited (phase 16 of bench/NOTES-gpu.md lost a hang's
    stacks file)."""
    out, left = [], 0
    for line in text.splitlines():
        if line.startswith(("Process ", "Thread ")):
            out.append(line)
            left = frames if line.startswith("Thread ") else 0
        elif left and line.strip():
            out.append(line)
            left -= 1
    return "\n".join(out)


def idle_clock(path):
    """A callable: seconds since `path` last changed size, as seen by its calls (the first call
    starts the clock)."""
    seen = {"size": -1, "at": time.monotonic()}

    def idle():
        size = path.stat().st_size if path.exists() else 0
        if size != seen["size"]:
            seen.update(size=size, at=time.monotonic())
        return time.monotonic() - seen["at"]
    return idle


def wait_progressing(proc, log, stall):
    """proc's exit code once it ends, or None once `log` (its output) has not grown for `stall`
    seconds: a hung run, told from a slow one that still logs its intervals (phase 14 of
    bench/NOTES-gpu.md: a run at a third of the usual rate had been counted as hung)."""
    idle = idle_clock(log)
    while (code := proc.poll()) is None:
        if idle() > stall:
            return None
        time.sleep(0.2)
    return code


def run_once(args, shards, label, gpus, flags, env=None, independent=False, gil_raw=None):
    """One setting's run: rate and per-rank figures. independent: `gpus` separate 1-GPU runs at
    once, each on its own GPU and CPUs, no gradient exchange; their rates add up: what the
    pipeline gives N GPUs when DDP costs nothing (the N-GPU ceiling of the data path).
    A run whose log stays still for --timeout seconds: {"hung": True, "stacks": file} (dump_stacks),
    its processes killed."""
    runs, stacks = [], None
    # the GPUs' clocks, power and limits while this run trains: a machine slowing within a call shows
    with GpuSampler(args.work / "runs" / f"{label}.gpu.csv", enabled=args.device == "cuda") as sampler:
        for i in range(gpus if independent else 1):
            out = args.work / "runs" / (f"{label}-{i}" if independent else label)
            shutil.rmtree(out, ignore_errors=True)
            cmd = train_command(args, shards, out, 1 if independent else gpus, flags,
                                first_cpu=i * args.cpus_per_gpu if independent else 0)
            run_env = {**os.environ, **(env or {})}
            if independent and args.device == "cuda":
                run_env["CUDA_VISIBLE_DEVICES"] = str(i)
            log = out.parent / f"{out.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            print("+", " ".join(f"{k}={v}" for k, v in (env or {}).items()), " ".join(map(str, cmd)), flush=True)
            with open(log, "w") as f:
                # a session of its own: a hung run's ranks and loader workers die with it
                runs.append((out, log, subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=run_env, stdout=f,
                                                        stderr=subprocess.STDOUT, start_new_session=True)))
        try:
            if gil_raw is not None:
                sample_gil(runs[0][2], runs[0][0], runs[0][1], gil_raw, args.gil_seconds, args.timeout)
            for out, log, proc in runs:
                code = wait_progressing(proc, log, args.timeout)
                if code is None:
                    stacks = dump_stacks(proc.pid, args.work / "runs" / f"{label}.stacks.txt")
                    print(f"{label}: HUNG (nothing logged for {args.timeout:.0f} s); stacks in {stacks}; "
                          f"innermost frames:\n{stacks_digest(stacks.read_text())}", flush=True)
                    break
                if code != 0:
                    raise SystemExit(f"error: {label} exited with {code}; see {log}")
        finally:
            for _, _, proc in runs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    if stacks:
        return {"hung": True, "stacks": str(stacks), "gpu": sampler.summary}
    measured = [bench_e2e.train_rate(out) for out, _, _ in runs]
    joined = {k: [v for _, _, ranks in measured for v in ranks[k]] for k in measured[0][2]}
    joined["step_alone_ranks"] = [v for out, _, _ in runs for v in
                                  json.loads((out / "final.json").read_text()).get("step_alone_images_per_s", [])]
    joined["images_per_s_intervals"] = [round(sum(x)) for x in zip(*(r["images_per_s_intervals"]
                                                                       for _, _, r in measured))]
    return {"rate": sum(rate for rate, _, _ in measured), **joined, "gpu": sampler.summary}


def _short_process(frame):
    """'process 12:"python -u -m tools.train --shards ..."' -> 'process 12 (tools.train)'."""
    pid, _, cmdline = frame.partition(":")
    words = cmdline.strip('"').split()
    what = words[words.index("-m") + 1] if "-m" in words[:-1] else " ".join(words[1:2])
    return f"{pid} ({what})" if what else pid


def gil_summary(raw_text, top=8, groups=16):
    """py-spy raw output ('frames;...;leaf count' per line, frames outermost first; with
    --subprocesses and --threads the process chain and the thread come first) -> text: per
    process and thread (the `groups` largest), its share of the GIL samples and the `top`
    (caller > function) that held it. Each process has a GIL of its own: read a training process's
    threads against each other."""
    per_thread = collections.defaultdict(collections.Counter)
    total = 0
    for line in raw_text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        processes = [f for f in frames if f.startswith("process ")]
        threads = [f for f in frames if f.startswith("thread ")]
        code = [f for f in frames if not f.startswith(("process ", "thread "))]
        key = " / ".join([_short_process(f) for f in processes[-1:]] + threads[-1:]) or "?"
        per_thread[key][" > ".join(code[-2:]) or "?"] += int(count)
        total += int(count)
    lines = [f"{total} GIL samples"]
    for key, leaves in sorted(per_thread.items(), key=lambda kv: -sum(kv[1].values()))[:groups]:
        n = sum(leaves.values())
        lines.append(f"{100 * n / max(total, 1):5.1f} %  {key}")
        for leaf, c in leaves.most_common(top):
            lines.append(f"         {100 * c / max(total, 1):5.1f} %  {leaf}")
    return "\n".join(lines) + "\n"


def summarize(results, base_gpus, path):
    """Rows per (setting, GPU count): runs, median, ratio to the base setting on base_gpus GPUs,
    per-rank medians, hung runs (left out of the figures) and their stacks; written to `path` after
    every run, so a call cut short keeps what it measured."""
    def finished(runs):
        return [x for x in runs or [] if not x.get("hung")]

    def median_rate(runs):
        return statistics.median(x["rate"] for x in runs) if runs else float("nan")

    base = median_rate(finished(results.get(("base", base_gpus))))
    rows = []
    shares = tuple(bench_e2e.RANK_SHARES)
    for (name, g), all_runs in results.items():
        runs = finished(all_runs)
        med = median_rate(runs)
        per_rank = {k: [round(statistics.median(x[k][i] for x in runs), 2) if runs else float("nan")
                        for i in range(g)] for k in shares}
        rows.append({"variant": name, "gpus": g, "runs": [round(x["rate"]) for x in runs], "median": med,
                     "vs_base_1": med / base, **per_rank,
                     "hung": [x["stacks"] for x in all_runs if x.get("hung")],
                     # each run's own: a slow run shows which rank held the others up, and
                     # whether that rank's step alone was slow too
                     "runs_ranks": [{**{k: [round(v, 2) for v in x[k]] for k in (*shares, "step_alone_ranks")},
                                     "data_path_ms_ranks": x.get("data_path_ms_ranks", []),
                                     "gpu": x.get("gpu", {})} for x in runs],
                     "intervals": [x["images_per_s_intervals"] for x in runs]})
    path.write_text(json.dumps(rows, indent=2))
    return rows


def rank_shares(figures):
    """'data wait, host issuing, GPU in steps, fetch waiting for workers, decode threads busy'
    per rank (bench_e2e.RANK_SHARES), ranks separated by |."""
    return " | ".join(" ".join(f"{v:.0%}" for v in rank) for rank in
                      zip(*(figures[k] for k in bench_e2e.RANK_SHARES)))


def data_path_text(ranks, batches_per_s=None):
    """A run's GPU data path, host ms per batch per rank (tools.train's data_path_ms_per_batch):
    'fetch 5.1 decode 21.3 (copy 1.2 setup 0.7 lock 8.0 call 9.1 after 0.2) crop 2.9 | ...'; '' on the
    CPU path. batches_per_s, each rank's training rate in batches: adds the share of time the rank's
    decode turn was held (call x batches/s; near 100 %, one turn at a time is the limit)."""
    def held(r):
        return f", turn held {r['decode_call'] * batches_per_s / 1000:.0%}" if batches_per_s else ""
    return " | ".join(f"fetch {r['fetch']:.1f} decode {r['decode']:.1f} (copy {r['decode_copy']:.1f} setup "
                      f"{r['decode_setup']:.1f} lock {r['decode_lock']:.1f} call {r['decode_call']:.1f} "
                      f"after {r.get('decode_after', 0.0):.1f}{held(r)}) crop {r['crop']:.1f}" for r in ranks)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_scaling"), help="folder for data and runs")
    p.add_argument("--shards", type=Path, default=None, help="use these shards instead of preparing some")
    p.add_argument("--classes", type=int, default=100, help="generated classes")
    p.add_argument("--train-per-class", type=int, default=500, help="generated train images per class")
    p.add_argument("--val-per-class", type=int, default=20, help="generated val images per class")
    p.add_argument("--shard-size", type=int, default=250, help="images per shard")
    bench_e2e.add_noise_flag(p, ", the phases' data so far")
    p.add_argument("--gpus", default="1,2", help="GPU counts to compare, the first is the baseline")
    p.add_argument("--variant", action="append", type=parse_variant, default=[],
                   help="NAME:[VAR=value ...] FLAGS: extra tools.train flags (and environment "
                   "variables) run beside the default (repeatable)")
    p.add_argument("--variant-gpus", default=None, help="GPU counts the variants run on "
                   "(default: all of --gpus)")
    p.add_argument("--independent", action="store_true", help="also run, for each GPU count N "
                   "above 1, N separate 1-GPU trainings at once (own GPU and CPUs each, no "
                   "gradient exchange): the sum of their rates is the data path's N-GPU ceiling")
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (the last is measured)")
    p.add_argument("--epoch-images", type=int, default=240_000, help="train images per epoch, "
                   "whatever the GPU count (0: one pass over the train set); the generated images "
                   "repeat within an epoch")
    p.add_argument("--arch", default="alexnetowtbn", help="model")
    p.add_argument("--batch-per-gpu", type=int, default=256, help="batch per GPU")
    p.add_argument("--workers-per-gpu", type=int, default=8, help="loader workers per GPU")
    p.add_argument("--cpus-per-gpu", type=int, default=16, help="CPUs the 1-GPU runs are pinned to (0: all)")
    p.add_argument("--train-args", default="--amp bf16 --channels-last --decode gpu",
                   help="tools.train flags of every run")
    p.add_argument("--gil", type=int, default=0, help="one more run on this many GPUs (4 epochs "
                   "longer), sampled by py-spy --gil from its second epoch on")
    p.add_argument("--gil-seconds", type=int, default=6, help="how long py-spy samples (s)")
    p.add_argument("--step-alone", type=int, default=20, help="train steps each rank times on "
                   "synthetic batches after its run (tools.train --step-alone; 0: none): a slow run "
                   "whose ranks are slow alone too kept slow kernels, not slow data")
    p.add_argument("--timeout", type=float, default=300, help="seconds a run may go without logging a line before it counts as hung")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a smoke test on a machine without GPU (gloo processes stand in for GPUs)")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    gpu_counts = [int(g) for g in args.gpus.split(",")]
    variant_gpus = [int(g) for g in args.variant_gpus.split(",")] if args.variant_gpus else gpu_counts
    variants = [("base", [], {})] + args.variant
    shards = prepare(args)

    results = collections.defaultdict(list)
    settings = [(name, flags, env, g) for name, flags, env in variants
                for g in (gpu_counts if name == "base" else variant_gpus)]
    for r in range(args.repeats):
        for name, flags, env, g in run_order(settings, r):
            results[(name, g)].append(run_once(args, shards, f"{name}-g{g}-r{r}", g, flags, env))
            summarize(results, gpu_counts[0], args.work / "bench_scaling.json")
        if args.independent:
            for g in gpu_counts[1:]:
                results[("independent", g)].append(run_once(args, shards, f"independent-g{g}-r{r}", g, [],
                                                            independent=True))
                summarize(results, gpu_counts[0], args.work / "bench_scaling.json")

    gil_text = None
    if args.gil:
        spy = shutil.which("py-spy")
        if spy is None:
            raise SystemExit("error: --gil needs py-spy on PATH (pip install py-spy)")
        raw = args.work / "gil_raw.txt"
        run_once(args, shards, f"gil-g{args.gil}", args.gil, ["--epochs", args.epochs + 4], gil_raw=raw)
        gil_text = gil_summary(raw.read_text())
        (args.work / "gil_summary.txt").write_text(gil_text)

    rows = summarize(results, gpu_counts[0], args.work / "bench_scaling.json")
    if gil_text:
        print("\n== GIL holders (py-spy --gil) ==\n" + gil_text)
    print(f"\n== images/s, median of {args.repeats} runs (ratio: to base on {gpu_counts[0]} GPU(s)) ==")
    print(f"{'variant':14s} {'gpus':>4s} {'median':>9s} {'ratio':>6s}  {'runs':24s} per rank: "
          f"{' / '.join(bench_e2e.RANK_SHARES.values())}")
    for row in rows:
        hung = f"  + {len(row['hung'])} hung" if row["hung"] else ""
        print(f"{row['variant']:14s} {row['gpus']:4d} {row['median']:9,.0f} {row['vs_base_1']:5.2f}x  "
              f"{str(row['runs']):24s} {rank_shares(row)}{hung}")
    # A slow multi-GPU run shows here as one rank that hardly waits for data and issues its steps
    # most of the time while the others wait (bench/NOTES-gpu.md phase 10).
    print(f"\n== each run: images/s, per rank {' / '.join(bench_e2e.RANK_SHARES.values())}"
          "[, its train step alone afterwards (synthetic batches)][, the GPUs' SM clock (median, min), power, "
          "peak temperature and clock limits, sampled by nvidia-smi][, then the GPU data path's host ms per batch "
          "per rank, last epoch] ==")
    for row in rows:
        for rate, x in zip(row["runs"], row["runs_ranks"]):
            alone = f"  alone: {', '.join(f'{v:,.0f}' for v in x['step_alone_ranks'])}" if x["step_alone_ranks"] else ""
            gpu = f"  {describe(x['gpu'])}" if x.get("gpu") else ""
            print(f"{row['variant']:14s} {row['gpus']:4d} {rate:9,d}  {rank_shares(x)}{alone}{gpu}")
            if x["data_path_ms_ranks"]:
                print(f"{'':29s} data path, host ms per batch: "
                      f"{data_path_text(x['data_path_ms_ranks'], rate / row['gpus'] / args.batch_per_gpu)}")
        for stacks in row["hung"]:
            print(f"{row['variant']:14s} {row['gpus']:4d}      hung  stacks: {stacks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

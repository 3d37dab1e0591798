"""End to end on a GPU machine: the real workflow (make_mini -> extract -> resize -> shard -> train ->
evaluate) on generated ImageNet-like data, then the synthetic ceiling of the same models, one table.

    python bench/bench_e2e.py --gpus 1 --work /tmp/e2e          # one GPU
    python bench/bench_e2e.py --gpus 2 --work /tmp/e2e          # DDP over two GPUs

Reports per stage wall time, training images/s from metrics.jsonl (median of the last epoch's log
intervals, the first one dropped), data-wait share, evaluation images/s from eval.json, and the
images/s of the same train step and of inference on synthetic in-memory tensors (bench/ceiling.py)
measured in the same call. All of it on the same card: name it when quoting the figures.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tools.imagenet.interval_meter import IntervalMeter  # noqa: E402
from tools.make_mini import NOISE  # noqa: E402


def add_noise_flag(parser, note=""):
    """--noise: the generated images' pixel noise, as tools.make_mini takes it (sets the JPEGs' size)."""
    parser.add_argument("--noise", type=float, default=NOISE, help="generated images' pixel noise "
                        f"(tools.make_mini --noise: {NOISE:g} gives ~23 KiB JPEGs at 256 px{note}; 16 ~31 KiB, "
                        "like bench_loader's photo-like scenes)")


def run(cmd, **kwargs):
    print("+", " ".join(map(str, cmd)), flush=True)
    t = time.perf_counter()
    subprocess.run(list(map(str, cmd)), cwd=ROOT, check=True, **kwargs)
    return time.perf_counter() - t


def workflow_config(args):
    return {
        "raw_dir": str(args.work / "raw"), "work_dir": str(args.work / "work"),
        "val_labels": str(args.work / "raw/val_labels.csv"),
        "mini": {"classes": args.classes, "train_per_class": args.train_per_class,
                 "val_per_class": args.val_per_class, "quirks": True, "seed": 0,
                 "min_side": 256, "max_side": 500, "noise": args.noise},
        "resize": {"short_side": 256, "quality": 90, "max_rejected_fraction": 0.05},
        "shard": {"train_shard_size": args.shard_size, "val_shard_size": args.shard_size, "seed": 0},
        "train": {"gpus": args.gpus, "device": args.device, "workers": args.workers_per_gpu,
                  "batch_size": args.batch_per_gpu * args.gpus, "epochs": args.epochs, "amp": "bf16",
                  "channels_last": True, "compile": False, "log_every": 10, "schedule": "regime",
                  "decode": args.decode, "cpu_fraction": args.cpu_fraction, "gpu_decoder": args.gpu_decoder,
                  "decode_threads": args.decode_threads},
        "evaluate": {"batch_size": args.batch_per_gpu, "workers": args.workers_per_gpu, "decode": args.decode,
                     "gpu_decoder": args.gpu_decoder},
    }


# tools.train's per-rank shares of each log interval, by their log field: what each says
RANK_SHARES = {f"{name}_ranks": label for name, label in IntervalMeter.PER_RANK.items()}


def train_rate(run_dir):
    """Of the last epoch's log intervals (first dropped): median images/s, rank 0's median
    data-wait share, and a dict of per-rank medians (RANK_SHARES: data wait, host issuing steps,
    GPU in steps, the GPU data path's fetch thread waiting for workers and decode threads busy),
    that epoch's data path stages per rank (tools.train's data_path_ms_per_batch: host ms per
    batch; [] on the CPU path) and the intervals' images/s."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("kind") == "train"]
    last = [r for r in train if r["epoch"] == train[-1]["epoch"]][1:] or train[-1:]

    def per_rank(key):
        ranks = len(last[0].get(key, []))
        return [statistics.median(r[key][i] for r in last) for i in range(ranks)]

    epochs = [r for r in recs if r.get("kind") == "epoch" and r["epoch"] == last[0]["epoch"]]
    stages = epochs[-1].get("data_path_ms_per_batch", {}) if epochs else {}
    return (statistics.median(r["images_per_s"] for r in last),
            statistics.median(r.get("data_share", 0.0) for r in last),
            {**{key: per_rank(key) for key in RANK_SHARES},
             "data_path_ms_ranks": [dict(zip(stages, ms)) for ms in zip(*stages.values())],
             "images_per_s_intervals": [round(r["images_per_s"]) for r in last]})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=1, help="GPUs (torchrun processes) for training")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_e2e"), help="folder for data and runs")
    p.add_argument("--classes", type=int, default=100, help="generated classes")
    p.add_argument("--train-per-class", type=int, default=160, help="generated train images per class")
    p.add_argument("--val-per-class", type=int, default=50, help="generated val images per class")
    p.add_argument("--shard-size", type=int, default=100, help="images per shard")
    add_noise_flag(p)
    p.add_argument("--epochs", type=int, default=3, help="training epochs per model")
    p.add_argument("--batch-per-gpu", type=int, default=256, help="batch per GPU")
    p.add_argument("--workers-per-gpu", type=int, default=None,
                   help="loader workers per GPU (default: all cores but one, divided by --gpus)")
    p.add_argument("--models", default="alexnet,overfeat", help="workflow models to train and evaluate")
    p.add_argument("--decode", default="auto", choices=["auto", "cpu", "gpu"], help="train/evaluate decode path")
    p.add_argument("--cpu-fraction", type=float, default=0.0, help="hybrid share decoded by CPU workers")
    p.add_argument("--gpu-decoder", default="auto", help="train/evaluate GPU decoder (auto, engine, nvjpeg, hardware)")
    p.add_argument("--decode-threads", type=int, default=2, help="train decode threads")
    p.add_argument("--skip-workflow", action="store_true", help="only the synthetic ceilings")
    p.add_argument("--skip-ceiling", action="store_true", help="only the workflow (e.g. variants "
                   "of a run whose ceiling was measured before in the same call)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a smoke test of the workflow part on a machine without GPU (no ceilings)")
    args = p.parse_args(argv)
    if args.workers_per_gpu is None:
        args.workers_per_gpu = max(1, ((os.cpu_count() or 2) - 1) // args.gpus)
    args.work.mkdir(parents=True, exist_ok=True)
    config_path = args.work / "bench.yaml"
    config_path.write_text(yaml.safe_dump(workflow_config(args)))
    snakemake = [sys.executable, "-m", "snakemake", "--cores", os.cpu_count()]
    models = args.models.split(",")
    arch = {"alexnet": "alexnetowtbn", "overfeat": "overfeat"}
    rows, stage_times = [], {}

    if not args.skip_workflow:
        stage_times["prepare (generate+extract+resize+shard)"] = run(
            [*snakemake, "prepare", "--configfile", config_path])
        for model in models:
            stage_times[f"train_{model}"] = run([*snakemake, f"train_{model}", "--configfile", config_path])
            stage_times[f"evaluate_{model}"] = run([*snakemake, f"evaluate_{model}", "--configfile", config_path])

    ceilings = {}
    for model in models if args.device == "cuda" and not args.skip_ceiling else []:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", args.gpus]
        out = subprocess.run(list(map(str, [*launcher, "bench/ceiling.py", "--arch", arch[model],
                                            "--batch", args.batch_per_gpu])),
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout
        ceilings[model] = json.loads(out.strip().splitlines()[-1])

    for model in models:
        c = ceilings.get(model, {"train_images_per_s": float("nan"), "infer_images_per_s_per_gpu": float("nan")})
        row = {"model": f"{model} ({arch[model]})", "gpus": args.gpus,
               "ceiling_train": c["train_images_per_s"], "ceiling_infer_per_gpu": c["infer_images_per_s_per_gpu"]}
        run_dir = args.work / "work/runs" / model
        if (run_dir / "metrics.jsonl").exists():
            row["train"], row["data_share"], row["ranks"] = train_rate(run_dir)
            ev = json.loads((run_dir / "eval.json").read_text())
            row["eval"] = ev["count"] / ev["seconds"]
            row["val_top1_err"] = ev["top1_error"]
        rows.append(row)

    print("\n== stage wall times (s) ==")
    for name, seconds in stage_times.items():
        print(f"{name:45s} {seconds:8.1f}")
    print("\n== images/s (train: global, all GPUs; eval: one process) ==")
    print(f"{'model':24s} {'gpus':>4s} {'train':>9s} {'ceiling':>9s} {'share':>6s} {'data':>5s} "
          f"{'eval':>9s} {'infer ceil/GPU':>14s} {'val top1 err':>12s}")
    for r in rows:
        train, eval_rate = r.get("train", float("nan")), r.get("eval", float("nan"))
        print(f"{r['model']:24s} {r['gpus']:4d} {train:9,.0f} {r['ceiling_train']:9,.0f} "
              f"{train / r['ceiling_train']:6.0%} {r.get('data_share', float('nan')):5.0%} {eval_rate:9,.0f} "
              f"{r['ceiling_infer_per_gpu']:14,.0f} {r.get('val_top1_err', float('nan')):11.2f}%")
    for r in rows:
        if r.get("ranks"):
            shares = "; ".join(f"{label} {', '.join(f'{v:.0%}' for v in r['ranks'][key])}"
                               for key, label in RANK_SHARES.items())
            print(f"{r['model']}: per rank median {shares}; intervals "
                  f"{r['ranks']['images_per_s_intervals']}")
    (args.work / "bench_e2e.json").write_text(json.dumps({"rows": rows, "stages": stage_times}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

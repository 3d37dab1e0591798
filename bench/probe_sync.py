"""Probe: does the engine decoder's call (tools.imagenet.nvjpeg) wait on the host for other,
unrelated GPU work of the process, such as a rank's NCCL all-reduce that waits for the other rank?

    python bench/probe_sync.py                  # GPU machine, about 40 s

A hung 2-GPU run (bench/NOTES-gpu.md, phase 14) had each rank's decode thread inside
nvjpegDecodeBatched, in cuMemFree (rank 0) and cuEventSynchronize (rank 1). cuMemFree waits for
the device: if the decode call does that, a rank's data path waits for its all-reduce, which waits
for the other rank. Here a one-block kernel sleeps `--sleep-ms` on another stream (it takes no SMs
from the decode) while the decoder takes a batch; a call whose host time is near the sleep waited
for it. Runs: the same batch again and again ("steady"), batches of ever larger images ("grow",
where nvJPEG's buffers are reallocated unless sized up front), then ImageNet-like batches; with
the sleeper on a plain side stream ("side", as NCCL's) or on a green context's stream ("green", as
the step with --step-sms); the decoder as it was (max_side 0: its buffers grow with the images)
and as it is (buffers sized for nvjpeg.MAX_SIDE on the first batch).
"""
import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.imagenet import gpu_data as gd  # noqa: E402
from tools.imagenet.nvjpeg import MAX_SIDE, NvjpegDecoder  # noqa: E402


def jpeg_batch(n, height, width, seed):
    """n RGB JPEGs of about height x width (widths vary a little), packed as the loader packs them."""
    rng = np.random.default_rng(seed)
    return jpegs([(height, width + int(rng.integers(0, width // 3 + 1))) for _ in range(n)], seed)


def jpegs(shapes, seed, noise=20.0, quality=90):
    """Packed RGB JPEGs of the given (height, width)s: a ramp plus noise (more noise, more bytes)."""
    rng = np.random.default_rng(seed)
    blobs = []
    for h, w in shapes:
        ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
        pixels = np.clip(ramp + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=quality)
        blobs.append(out.getvalue())
    return gd.pack_jpegs(blobs)


def imagenet_like(n, seed):
    """n shapes as the resize stage writes ImageNet: short side 256, aspect 1:2 to 2:1 either way."""
    rng = np.random.default_rng(seed)
    long = (256 * rng.uniform(1.0, 2.0, n)).astype(int)
    return [(256, int(x)) if rng.random() < 0.7 else (int(x), 256) for x in long]


def sleep_cycles(ms):
    """Clock cycles of torch.cuda._sleep for about `ms` milliseconds on this GPU."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return int(10_000_000 * ms / start.elapsed_time(end))


def call_ms(decoder, batch, sleeper, cycles, decode_stream):
    """Host ms of one decode call, with a sleeping kernel queued just before it on `sleeper`."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if sleeper is not None:
        with torch.cuda.stream(sleeper):
            torch.cuda._sleep(cycles)
    with torch.cuda.stream(decode_stream):
        decoder.decode_packed(*batch)
        ms = (time.perf_counter() - t0) * 1000
    torch.cuda.synchronize()
    return ms


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128, help="images per decode call")
    p.add_argument("--sleep-ms", type=float, default=300.0, help="how long the other stream's kernel runs")
    p.add_argument("--calls", type=int, default=6, help="steady calls per setting")
    p.add_argument("--sms", type=int, default=120, help="SMs of the green context's stream")
    args = p.parse_args()
    torch.cuda.init()
    from tools.imagenet.sm_partition import partitioned_stream
    sleepers = {"side": torch.cuda.Stream(), "green": partitioned_stream("cuda", args.sms)[0]}
    cycles = sleep_cycles(args.sleep_ms)
    t0 = time.perf_counter()
    torch.cuda._sleep(cycles)
    torch.cuda.synchronize()
    print(f"the sleeper runs {(time.perf_counter() - t0) * 1000:.0f} ms", flush=True)
    steady = jpeg_batch(args.batch, 256, 256, 0)
    grows = [jpeg_batch(args.batch, h, w, k) for k, (h, w) in enumerate([(256, 400), (320, 500), (400, 560), (512, 600)], 1)]
    imagenet = [jpegs(imagenet_like(args.batch, k), k) for k in range(10, 16)]
    # what makes a fresh decoder (buffers grow) wait: larger images, more bytes per image, or more images
    side = sleepers["side"]
    base = jpegs([(256, 256)] * args.batch, 20, noise=20, quality=90)
    tests = {"larger images, few bytes": jpegs([(700, 700)] * args.batch, 21, noise=0, quality=50),
             "same size, 4x the bytes": jpegs([(256, 256)] * args.batch, 22, noise=80, quality=98),
             "2x the images": jpegs([(256, 256)] * (2 * args.batch), 23, noise=20, quality=90),
             "one image of 4x the bytes": jpegs([(256, 256)] * (args.batch - 1) + [(512, 512)], 24, noise=80, quality=98)}
    for what, batch in tests.items():
        decoder, stream = NvjpegDecoder("cuda", max_side=0), torch.cuda.Stream()
        call_ms(decoder, base, None, 0, stream)
        again = call_ms(decoder, base, side, cycles, stream)
        print(f"trigger? {what}: {call_ms(decoder, batch, side, cycles, stream):.1f} ms "
              f"(the first batch again: {again:.1f}; bytes {batch[1][-1] / len(batch[1][:-1]) / 1e3:.0f} kB/image "
              f"vs {base[1][-1] / args.batch / 1e3:.0f})", flush=True)
    rows = []
    for max_side in (0, MAX_SIDE):
        for name, sleeper in sleepers.items():
            decoder, stream = NvjpegDecoder("cuda", max_side=max_side), torch.cuda.Stream()
            call_ms(decoder, steady, None, 0, stream)  # first call: nvJPEG sets itself up
            times = [call_ms(decoder, steady, sleeper, cycles, stream) for _ in range(args.calls)]
            grown = [call_ms(decoder, g, sleeper, cycles, stream) for g in grows]
            mixed = [call_ms(decoder, b, sleeper, cycles, stream) for b in imagenet]
            waited = sum(t > args.sleep_ms / 2 for t in times + grown + mixed)
            rows.append((max_side, name, statistics.median(times), grown, statistics.median(mixed), waited,
                         len(times) + len(grown) + len(mixed)))
            print(f"max_side {max_side}, {name}: steady {[round(t, 1) for t in times]} grow "
                  f"{[round(t, 1) for t in grown]} ImageNet-like {[round(t, 1) for t in mixed]}", flush=True)
    print(f"\n{torch.cuda.get_device_name()}, batch {args.batch}, sleeper {args.sleep_ms:.0f} ms; "
          f"grow: batches of larger images each; ImageNet-like: short side 256, aspect up to 2:1")
    print("| decoder | sleeper on | steady median ms | grow ms | ImageNet-like median ms | calls that waited |")
    print("|---|---|---|---|---|---|")
    for max_side, name, med, grown, mixed, waited, n in rows:
        label = f"max_side {max_side}" if max_side else "buffers grow (before)"
        print(f"| {label} | {name} | {med:.1f} | {', '.join(f'{t:.1f}' for t in grown)} | {mixed:.1f} | "
              f"{waited} of {n} |")


if __name__ == "__main__":
    main()

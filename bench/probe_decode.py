"""Probe: the GPU JPEG decoders alone, together, and beside a running training step.

    python bench/probe_decode.py --images 2560          # GPU machine, about a minute

Generates 256-px JPEGs like bench_loader's, then prints images/s of: torchvision's batched nvJPEG;
nvImageCodec on the hardware JPEG engines (from bytes, from numpy, with and without wrapping each
output; gpu_data.hardware_jpeg_decoder and decode_jpegs around it), its other backends and batch
sizes; two decoders in two threads; and each decoder in a thread beside a thread that runs the
AlexNet-BN train step flat out (who gets the GPU). bench/NOTES-gpu.md says what the figures meant.
Needs nvidia-nvimgcodec for the hardware rows (the rest runs without it).
"""
import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_loader as bl  # noqa: E402
from tools.imagenet import gpu_data as gd  # noqa: E402


def rate(fn, n_images, seconds=3.0):
    fn()
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        fn()
        n += n_images
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def together(fns, seconds=4.0):
    """Run each (fn, images per call[, stream priority]) in its own thread with its own stream;
    img/s of each."""
    stop = threading.Event()
    counts = [0] * len(fns)

    def loop(k, fn, n, priority=0):
        with torch.cuda.stream(torch.cuda.Stream(priority=priority)):
            fn()
            torch.cuda.current_stream().synchronize()
            while not stop.is_set():
                fn()
                counts[k] += n
            torch.cuda.current_stream().synchronize()
    ths = [threading.Thread(target=loop, args=(k, *spec)) for k, spec in enumerate(fns)]
    for t in ths:
        t.start()
    time.sleep(1.0)
    start = list(counts)
    t0 = time.perf_counter()
    time.sleep(seconds)
    end = list(counts)
    dt = time.perf_counter() - t0
    stop.set()
    for t in ths:
        t.join()
    return [round((e - s) / dt) for s, e in zip(start, end)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=2560)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    blobs = bl.make_jpegs(args.images)
    B = args.batch
    batches = [blobs[i:i + B] for i in range(0, len(blobs) - B + 1, B)]
    tensors = [[torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in bt] for bt in batches]
    print(f"{len(blobs)} jpegs, mean {statistics.mean(map(len, blobs)) / 1024:.1f} KiB", flush=True)
    import torchvision
    from torchvision.io import decode_jpeg
    print("torch", torch.__version__, "torchvision", torchvision.__version__, torch.cuda.get_device_name())
    res = {}
    it = {"tv": 0, "hw": 0}

    def tv():
        k = it["tv"] = (it["tv"] + 1) % len(tensors)
        decode_jpeg(tensors[k], device="cuda")
    res["tv_alone"] = rate(tv, B)

    nv = gd.import_nvimgcodec()
    hw = None
    if nv is not None:
        print("nvimgcodec", getattr(nv, "__version__", "?"), flush=True)
        dec_hw = nv.Decoder(backends=[nv.Backend(nv.BackendKind.HW_GPU_ONLY)])
        out = dec_hw.decode(batches[0])
        print("hw decode from bytes:", sum(o is not None for o in out), "of", len(out),
              getattr(out[0], "shape", None), flush=True)

        def make(dec, convert):
            def f():
                k = it["hw"] = (it["hw"] + 1) % len(batches)
                out = dec.decode(batches[k], cuda_stream=torch.cuda.current_stream().cuda_stream)
                if convert:
                    [torch.as_tensor(o, device="cuda") for o in out]
            return f
        hw = make(dec_hw, True)
        arrays = [[torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in bt] for bt in batches]
        j = {"k": 0}

        def numpy_in():
            j["k"] = (j["k"] + 1) % len(arrays)
            return dec_hw.decode([t.numpy() for t in arrays[j["k"]]],
                                 cuda_stream=torch.cuda.current_stream().cuda_stream)
        res["hw_numpy_in"] = rate(numpy_in, B)
        res["hw_numpy_in+DeviceImage"] = rate(lambda: [gd.DeviceImage(o, torch.device("cuda")) for o in numpy_in()], B)
        out0 = numpy_in()
        t0 = time.perf_counter()
        for _ in range(20):
            imgs = [gd.DeviceImage(o, torch.device("cuda")) for o in out0]
        res["DeviceImage_us_per_image"] = (time.perf_counter() - t0) / 20 / B * 1e6
        t0 = time.perf_counter()
        for _ in range(20):
            gd.image_table(imgs, torch.ones(B, 2, dtype=torch.int32))
        res["image_table_ms_per_batch"] = (time.perf_counter() - t0) / 20 * 1e3
        hwdec = gd.hardware_jpeg_decoder("cuda")
        res["gpu_data.hardware_jpeg_decoder"] = rate(lambda: hwdec(arrays[0]), B)
        res["decode_jpegs(hardware)"] = rate(lambda: gd.decode_jpegs(arrays[1], "cuda", decoder=hwdec), B)
        hw2 = gd.hardware_jpeg_decoder("cuda")
        res["2 threads gpu_data hardware"] = together([(lambda: hwdec(arrays[0]), B), (lambda: hw2(arrays[1]), B)])
        res["hw_alone"] = rate(hw, B)
        res["hw_alone_noconvert"] = rate(make(dec_hw, False), B)
        for name, kinds in (("nvimg_hybrid_cpu", ["HYBRID_CPU_GPU"]), ("nvimg_cuda", ["GPU_ONLY"]),
                            ("nvimg_hw_then_cuda", ["HW_GPU_ONLY", "GPU_ONLY"])):
            try:
                d = nv.Decoder(backends=[nv.Backend(getattr(nv.BackendKind, k)) for k in kinds])
                res[name] = rate(make(d, True), B)
            except Exception as exc:  # noqa: BLE001
                print(name, "failed:", exc, flush=True)
        for bs in (64, 512):
            try:
                bb = [blobs[i:i + bs] for i in range(0, len(blobs) - bs + 1, bs)]
                j = {"k": 0}

                def fb(bb=bb, j=j):
                    j["k"] = (j["k"] + 1) % len(bb)
                    [torch.as_tensor(o, device="cuda") for o in dec_hw.decode(bb[j["k"]], cuda_stream=torch.cuda.current_stream().cuda_stream)]
                res[f"hw_batch{bs}"] = rate(fb, bs)
            except Exception as exc:  # noqa: BLE001
                print("batch", bs, "failed:", exc, flush=True)
        res["tv+hw"] = together([(tv, B), (hw, B)])
        dec_hw2 = nv.Decoder(backends=[nv.Backend(nv.BackendKind.HW_GPU_ONLY)])
        res["hw+hw(2 decoders)"] = together([(hw, B), (make(dec_hw2, True), B)])
    engines = []
    try:
        engines = [gd.gpu_decoder("engine", "cuda") for _ in range(2)]
    except RuntimeError as exc:
        print("engine decoder unusable:", exc, flush=True)
    if engines:
        ref = decode_jpeg(tensors[0], device="cuda")
        got = engines[0](tensors[0])
        res["engine_vs_tv_max_abs"] = max((a.int() - b.int()).abs().max().item() for a, b in zip(got, ref))
        e_it = [0, 0]

        def engine_fn(k):
            def f():
                e_it[k] = (e_it[k] + 1) % len(tensors)
                engines[k](tensors[e_it[k]])
            return f
        res["engine_alone"] = rate(engine_fn(0), B)
        t0 = time.perf_counter()
        for _ in range(20):
            engines[0](tensors[0])
        res["engine_host_ms_per_batch"] = (time.perf_counter() - t0) / 20 * 1e3
        torch.cuda.synchronize()
        res["2 engines"] = together([(engine_fn(0), B), (engine_fn(1), B)])
    step = bl.make_step("alexnetowtbn", False)
    x = torch.randn(B, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (B,), device="cuda")

    def train():
        step(x, y)
    res["train_alone"] = together([(train, B)])
    res["train+tv"] = together([(train, B), (tv, B)])
    if engines:
        res["train+engine"] = together([(train, B), (engine_fn(0), B)])
        res["train+engine(high priority)"] = together([(train, B), (engine_fn(0), B, -1)])
        res["train+2 engines(high priority)"] = together([(train, B), (engine_fn(0), B, -1), (engine_fn(1), B, -1)])
        res["train+tv(thread stream high priority)"] = together([(train, B), (tv, B, -1)])
    if hw is not None:
        res["train+hw"] = together([(train, B), (hw, B)])
        res["train+hw(high priority)"] = together([(train, B), (hw, B, -1)])
        res["train+tv+hw"] = together([(train, B), (tv, B), (hw, B)])
    print("\n| probe | img/s |\n|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v if isinstance(v, list) else round(v)} |")


if __name__ == "__main__":
    main()

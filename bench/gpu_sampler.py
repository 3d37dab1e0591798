"""The GPUs' SM clock, power, temperature and clock-limit reasons, sampled by nvidia-smi while a
benchmark runs: a machine that slows down within a call (bench/NOTES-gpu.md phase 12) shows here
as falling clocks and the reason the driver gives, not as a mystery in the img/s column.

    with GpuSampler(Path("/tmp/run/gpu.csv")) as sampler:
        run_the_benchmark()
    print(describe(sampler.summary))   # GPU0 1980 MHz (min 1755 MHz) 612 W 71 C limits: SW power cap

Where nvidia-smi is missing or answers none of the queries, the sampler records nothing and the
summary is empty: the benchmark runs the same.
"""
import shutil
import statistics
import subprocess

BASE_FIELDS = "index,clocks.sm,power.draw,temperature.gpu"
# drivers from R535 on call the reasons "event reasons"; older ones only know "throttle reasons"
REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active", None)
# nvmlClocksEventReasons bits (NVML API reference); GPU idle (0x1) is left out: not a limit
REASONS = {0x2: "application clocks", 0x4: "SW power cap", 0x8: "HW slowdown", 0x10: "sync boost",
           0x20: "SW thermal", 0x40: "HW thermal", 0x80: "HW power brake", 0x100: "display clocks"}


def _query(smi, fields):
    """fields when this nvidia-smi answers them, else None."""
    try:
        proc = subprocess.run([smi, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return fields if proc.returncode == 0 and proc.stdout.strip() else None


def _number(text):
    try:
        return float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def _mask(text):
    """'0x0000000000000004' -> 4; anything else (N/A) -> 0."""
    try:
        return int(text, 16) if text.lower().startswith("0x") else 0
    except ValueError:
        return 0


def summarize(csv_text):
    """nvidia-smi csv lines (index, clock MHz, power W, temperature C[, reasons bit mask]) -> per GPU
    index: median and min SM clock, median power, max temperature, the OR of the limit reasons.
    Samples the driver marks idle (start-up, a GPU the run does not use) are left out."""
    per_gpu = {}
    for line in csv_text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 4 or not cells[0].isdigit():
            continue
        if len(cells) > 4 and _mask(cells[4]) & 0x1:
            continue
        per_gpu.setdefault(int(cells[0]), []).append(cells[1:])
    out = {}
    for gpu, rows in sorted(per_gpu.items()):
        clocks = [v for v in (_number(r[0]) for r in rows) if v is not None]
        power = [v for v in (_number(r[1]) for r in rows) if v is not None]
        temps = [v for v in (_number(r[2]) for r in rows) if v is not None]
        reasons = 0
        for r in rows:
            reasons |= _mask(r[3]) if len(r) > 3 else 0
        out[gpu] = {"samples": len(rows),
                    "sm_clock_mhz": statistics.median(clocks) if clocks else None,
                    "sm_clock_min_mhz": min(clocks) if clocks else None,
                    "power_w": statistics.median(power) if power else None,
                    "temperature_max_c": max(temps) if temps else None,
                    "limits": [name for bit, name in REASONS.items() if reasons & bit]}
    return out


def describe(summary):
    """One line for a summary: 'GPU0 1980 MHz (min 1755 MHz) 612 W 71 C; GPU1 ...' ('' when empty)."""
    def fmt(value, unit):
        return f"{value:.0f} {unit}" if value is not None else f"? {unit}"
    parts = []
    for gpu, s in sorted(summary.items()):
        text = (f"GPU{gpu} {fmt(s['sm_clock_mhz'], 'MHz')} (min {fmt(s['sm_clock_min_mhz'], 'MHz')}) "
                f"{fmt(s['power_w'], 'W')} {fmt(s['temperature_max_c'], 'C')}")
        parts.append(text + (f" limits: {', '.join(s['limits'])}" if s["limits"] else ""))
    return "; ".join(parts)


class GpuSampler:
    """Context manager: nvidia-smi samples every `interval_ms` into `path` while the block runs;
    .summary afterwards (see summarize). enabled=False or no nvidia-smi: does nothing."""

    def __init__(self, path, interval_ms=1000, enabled=True):
        self.path, self.interval_ms, self.summary = path, interval_ms, {}
        self.smi = shutil.which("nvidia-smi") if enabled else None
        self.proc = self.file = None

    def __enter__(self):
        if self.smi is None:
            return self
        for reason in REASON_FIELDS:
            fields = _query(self.smi, f"{BASE_FIELDS},{reason}" if reason else BASE_FIELDS)
            if fields:
                break
        else:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w")
        self.proc = subprocess.Popen([self.smi, f"--query-gpu={fields}", "--format=csv,noheader,nounits",
                                      f"--loop-ms={self.interval_ms}"], stdout=self.file, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.file.close()
            self.summary = summarize(self.path.read_text())
        return False

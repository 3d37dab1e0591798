"""Extract the ILSVRC2012 archives into one folder per class, val arranged by its labels.

    python -m tools.extract --raw-dir /data/imagenet-raw --out work/extracted --workers 16

reads `<raw-dir>/ILSVRC2012_img_train.tar` (one inner `<wnid>.tar` per class) and
`<raw-dir>/ILSVRC2012_img_val.tar` (flat) and writes

    <out>/train/<wnid>/<file>     byte-identical to the archive members
    <out>/val/<wnid>/<file>       placed by the val labels
    <out>/extract.json            counts per split and the class list

Val labels come from the official devkit when --devkit is given (reading it needs scipy), else
from --val-labels (a `filename,wnid` CSV), else from `ILSVRC2012_devkit_t12.tar.gz` if it sits in
the raw dir, else from the CSV bundled in tools/data/.

The archives are streamed, never copied: the outer train tar's headers are scanned once, then
each worker seeks to one class's inner tar and extracts it. Members that would land outside the
destination (absolute paths, `..`, links, devices, FIFOs) are refused. Counts are checked (every
val file labelled, train and val classes equal, no empty class; the real totals 1,281,167 / 50,000
/ 1000 when the archive has 1000 classes). Output is built under a temporary name and renamed at
the end, so an interrupted run leaves nothing that looks complete and a rerun starts clean.
"""
import argparse
import io
import json
import multiprocessing
import re
import shutil
import sys
import tarfile
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

from tqdm import tqdm

from tools.imagenet import classes as C
from tools.imagenet.fsutil import atomic_path, default_workers, exit_on_sigterm

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
INNER_TAR = re.compile(r"(n\d{8})\.tar")
SHOW = 5  # how many names an error lists before "... (N in all)"


class ExtractError(Exception):
    """Bad input: the message says what is wrong and what to do."""


def listing(names):
    names = sorted(names)
    more = f", ... ({len(names)} in all)" if len(names) > SHOW else ""
    return ", ".join(names[:SHOW]) + more


# ---------------------------------------------------------------- member safety

def safe_name(member, where):
    """The member's plain file name, or None for a harmless directory entry; raise for anything unsafe.

    Archive members here are flat plain files: anything that is a link, device, FIFO, absolute,
    contains `..` or a sub folder is refused, on top of tarfile's own "data" filter.
    """
    name = member.name
    if member.issym() or member.islnk():
        raise ExtractError(f"{where}: refusing link member {name!r} -> {member.linkname!r}; "
                           "the archive is damaged or not the ILSVRC2012 archive")
    if not (member.isfile() or member.isdir()):
        raise ExtractError(f"{where}: refusing special member {name!r} (device, FIFO or other non-file); "
                           "the archive is damaged or not the ILSVRC2012 archive")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:
        raise ExtractError(f"{where}: refusing member {name!r}: it would be written outside the destination")
    parts = [p for p in parts if p not in ("", ".")]
    if member.isdir():
        if parts:
            raise ExtractError(f"{where}: unexpected folder {name!r}; members must be plain files without folders")
        return None
    if len(parts) != 1:
        raise ExtractError(f"{where}: unexpected member {name!r}; members must be plain files without folders")
    data_filter = getattr(tarfile, "data_filter", None)  # Python >= 3.11.4
    if data_filter is not None:
        try:
            data_filter(member, "/nonexistent-destination")
        except tarfile.FilterError as e:
            raise ExtractError(f"{where}: refusing member {name!r}: {e}") from None
    return parts[0]


def write_member(tar, member, name, dest_dir, where):
    """Copy one member's bytes to dest_dir/name; a second member of the same name is an error."""
    src = tar.extractfile(member)
    try:
        with open(dest_dir / name, "xb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
    except FileExistsError:
        raise ExtractError(f"{where}: member {name!r} appears twice") from None


# ---------------------------------------------------------------- train

class Window(io.RawIOBase):
    """A read-only view of bytes [start, start+size) of a file, so tarfile can read an inner tar in place."""

    def __init__(self, f, start, size):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf):
        n = max(0, min(len(buf), self.size - self.pos))
        if n == 0:
            return 0
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buf)[:n])
        self.pos += got
        return got


def scan_train(train_tar):
    """[(wnid, offset_data, size)] of the inner class tars, from one pass over the outer headers."""
    classes, seen = [], set()
    try:
        with tarfile.open(train_tar, "r:") as tar:
            for member in tar:
                name = safe_name(member, train_tar)
                if name is None:
                    continue
                match = INNER_TAR.fullmatch(name)
                if not match:
                    raise ExtractError(f"{train_tar}: unexpected member {member.name!r}; the train archive must "
                                       "hold one '<wnid>.tar' per class (e.g. n01440764.tar)")
                if match[1] in seen:
                    raise ExtractError(f"{train_tar}: class tar {name!r} appears twice")
                seen.add(match[1])
                classes.append((match[1], member.offset_data, member.size))
    except tarfile.TarError as e:
        raise ExtractError(f"{train_tar}: not a readable tar archive ({e}); download it again") from None
    if not classes:
        raise ExtractError(f"{train_tar}: holds no class tars")
    return classes


def extract_class(train_tar, wnid, offset, size, dest_root):
    """Extract one inner class tar into dest_root/train/<wnid>/; returns (wnid, number of files)."""
    where = f"{train_tar}:{wnid}.tar"
    dest = Path(dest_root) / "train" / wnid
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(train_tar, "rb") as f:
        window = io.BufferedReader(Window(f, offset, size), 1 << 20)
        try:
            with tarfile.open(fileobj=window, mode="r:") as tar:
                for member in tar:
                    name = safe_name(member, where)
                    if name is not None:
                        write_member(tar, member, name, dest, where)
                        count += 1
        except tarfile.TarError as e:
            raise ExtractError(f"{where}: not a readable tar ({e}); download the train archive again") from None
    return wnid, count


# ---------------------------------------------------------------- val

def extract_val(val_tar, labels, dest_root, progress=False):
    """One streaming pass over the flat val tar; each labelled file goes to dest_root/val/<wnid>/.

    Returns ({wnid: count}, [file names seen], [file names without a label]).
    """
    dest_root = Path(dest_root) / "val"
    counts, seen, unlabelled, made = {}, [], [], set()
    try:
        with tarfile.open(val_tar, "r|") as tar:
            for member in tqdm(tar, desc="val files", unit="file", disable=not progress, file=sys.stderr):
                name = safe_name(member, val_tar)
                if name is None:
                    continue
                seen.append(name)
                wnid = labels.get(name)
                if wnid is None:
                    unlabelled.append(name)
                    continue
                if wnid not in made:
                    (dest_root / wnid).mkdir(parents=True, exist_ok=True)
                    made.add(wnid)
                write_member(tar, member, name, dest_root / wnid, val_tar)
                counts[wnid] = counts.get(wnid, 0) + 1
    except tarfile.TarError as e:
        raise ExtractError(f"{val_tar}: not a readable tar archive ({e}); download it again") from None
    return counts, seen, unlabelled


# ---------------------------------------------------------------- labels

def devkit_labels(devkit):
    """{val file name: wnid} from the official devkit (data/meta.mat + validation ground truth)."""
    try:
        import scipy.io
    except ImportError:
        raise ExtractError(f"reading the devkit {devkit} needs scipy: install it (pip install scipy) "
                           "or pass --val-labels with a filename,wnid CSV (the bundled one is used by default "
                           "when no devkit is in the raw dir)") from None
    try:
        with tarfile.open(devkit, "r:gz") as tar:
            files = {m.name.rsplit("data/", 1)[-1]: m for m in tar if m.isfile() and "data/" in m.name}
            meta = tar.extractfile(files["meta.mat"]).read()
            truth = tar.extractfile(files["ILSVRC2012_validation_ground_truth.txt"]).read().decode()
    except (tarfile.TarError, KeyError, OSError) as e:
        raise ExtractError(f"{devkit}: not a readable ILSVRC2012 devkit ({e!r}); "
                           "download it again or pass --val-labels") from None
    synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    return labels_from_ground_truth(truth, id_to_wnid, devkit)


def labels_from_ground_truth(text, id_to_wnid, source="ground truth"):
    """Line i (1-based) of the ground truth holds the ILSVRC2012_ID of ILSVRC2012_val_%08d.JPEG % i."""
    labels = {}
    for i, line in enumerate(text.split(), start=1):
        ilsvrc_id = int(line)
        if ilsvrc_id not in id_to_wnid:
            raise ExtractError(f"{source}: line {i} has ILSVRC2012_ID {ilsvrc_id}, which meta.mat does not define")
        labels[f"ILSVRC2012_val_{i:08d}.JPEG"] = id_to_wnid[ilsvrc_id]
    return labels


def load_labels(val_labels, devkit, raw_dir):
    """(labels, description, is_full_list): --devkit, else --val-labels, else a devkit in raw_dir, else bundled."""
    if val_labels is not None and devkit is not None:
        # The workflow always passes its CSV; a devkit named on top of it is the more specific choice.
        print(f"note: taking val labels from the devkit {devkit}, not {val_labels}", file=sys.stderr)
        val_labels = None
    if val_labels is None and devkit is None and (raw_dir / DEVKIT).exists():
        devkit = raw_dir / DEVKIT
    if devkit is not None:
        if not Path(devkit).exists():
            raise ExtractError(f"devkit {devkit} not found; put {DEVKIT} there or pass --val-labels")
        return devkit_labels(devkit), f"devkit {devkit}", True
    path = Path(val_labels) if val_labels is not None else C.BUNDLED_VAL_LABELS
    if not path.exists():
        raise ExtractError(f"val labels {path} not found; pass a filename,wnid CSV with --val-labels")
    try:
        labels = C.read_val_labels(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise ExtractError(str(e)) from None
    if not labels:
        raise ExtractError(f"val labels {path} hold no rows; expected 'filename,wnid' lines")
    is_full = path.resolve() == C.BUNDLED_VAL_LABELS.resolve()
    return labels, str(path), is_full


# ---------------------------------------------------------------- checks

def check_counts(train_counts, val_counts, val_seen, unlabelled, labels, labels_desc, labels_full, expect):
    """Raise ExtractError naming what is missing; returns whether the real totals were checked."""
    problems = []
    if unlabelled:
        problems.append(f"{len(unlabelled)} val files have no label in {labels_desc}: {listing(unlabelled)}")
    train_classes, val_classes = set(train_counts), set(val_counts)
    real = expect == "real" or (expect == "auto" and len(train_classes) == C.REAL_CLASSES)
    # Labels whose file is absent: with a full list (bundled/devkit) only meaningful on the real archive;
    # with a user's own CSV, for the classes this archive has.
    if real or not labels_full:
        seen = set(val_seen)
        missing = [f for f, w in labels.items() if f not in seen and (real or w in train_classes)]
        if missing:
            problems.append(f"{len(missing)} val files named in {labels_desc} are not in the val archive: "
                            f"{listing(missing)}")
    if train_classes - val_classes:
        problems.append(f"{len(train_classes - val_classes)} train classes have no val images: "
                        f"{listing(train_classes - val_classes)}")
    if val_classes - train_classes:
        problems.append(f"{len(val_classes - train_classes)} val classes (from the labels) are not train classes: "
                        f"{listing(val_classes - train_classes)}")
    empty = [w for w, n in train_counts.items() if n == 0]
    if empty:
        problems.append(f"{len(empty)} train class tars are empty: {listing(empty)}")
    if real:
        totals = (("train images", sum(train_counts.values()), C.REAL_TRAIN_IMAGES),
                  ("val images", sum(val_counts.values()), C.REAL_VAL_IMAGES),
                  ("classes", len(train_classes), C.REAL_CLASSES))
        for what, got, want in totals:
            if got != want:
                problems.append(f"the real ILSVRC2012 archives have {want:,} {what}, found {got:,} "
                                "(incomplete download? use --expect none for a custom dataset)")
    if problems:
        raise ExtractError("counts do not match:\n  " + "\n  ".join(problems))
    return real


# ---------------------------------------------------------------- driver

def run_tasks(train_tar, classes, val_tar, labels, dest, workers):
    """Extract every class and the val split; returns ({wnid: count}, val results)."""
    bar = tqdm(total=len(classes), desc="train classes", unit="class", file=sys.stderr)
    train_counts = {}
    try:
        if workers <= 1:
            for wnid, offset, size in classes:
                train_counts[wnid] = extract_class(train_tar, wnid, offset, size, dest)[1]
                bar.update()
            bar.close()
            return train_counts, extract_val(val_tar, labels, dest, progress=True)
        with ProcessPoolExecutor(workers) as pool:
            try:
                # Val is one long sequential stream: start it first so it overlaps the class tars.
                val_future = pool.submit(extract_val, val_tar, labels, dest)
                pending = {pool.submit(extract_class, train_tar, *c, dest) for c in classes} | {val_future}
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        if fut.exception() is not None:
                            pool.shutdown(wait=True, cancel_futures=True)
                            raise fut.exception()
                        if fut is not val_future:
                            wnid, n = fut.result()
                            train_counts[wnid] = n
                            bar.update()
                return train_counts, val_future.result()
            except (SystemExit, KeyboardInterrupt):
                # SIGTERM or Ctrl-C: stop the workers now; the pool's exit would otherwise finish every
                # queued class tar before the caller's atomic_path can remove the partial output.
                pool.shutdown(wait=False, cancel_futures=True)
                children = multiprocessing.active_children()
                for child in children:
                    child.terminate()
                for child in children:  # gone before the clean-up removes the folder they write into
                    child.join(10)
                raise
    finally:
        bar.close()


def extract(raw_dir, out, val_labels=None, devkit=None, workers=1, expect="auto"):
    """Extract both archives of raw_dir into out (see module doc); returns the summary dict."""
    raw_dir, out = Path(raw_dir), Path(out)
    train_tar, val_tar = raw_dir / TRAIN_TAR, raw_dir / VAL_TAR
    for path in (train_tar, val_tar):
        if not path.is_file():
            raise ExtractError(f"{path} not found: put {path.name} into {raw_dir} (download it from "
                               "https://image-net.org/download-images after accepting the terms)")
    labels, labels_desc, labels_full = load_labels(val_labels, devkit, raw_dir)
    classes = scan_train(train_tar)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        train_counts, (val_counts, val_seen, unlabelled) = run_tasks(train_tar, classes, val_tar, labels, tmp,
                                                                     workers)
        real = check_counts(train_counts, val_counts, val_seen, unlabelled, labels, labels_desc, labels_full,
                            expect)
        summary = {
            "classes": sorted(train_counts),
            "num_classes": len(train_counts),
            "train": {"num_images": sum(train_counts.values()), "per_class": dict(sorted(train_counts.items()))},
            "val": {"num_images": sum(val_counts.values()), "per_class": dict(sorted(val_counts.items()))},
            "val_labels": labels_desc,
            "real_totals_checked": real,
        }
        (tmp / "extract.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw-dir", required=True, type=Path,
                   help=f"folder holding {TRAIN_TAR} and {VAL_TAR} (and optionally {DEVKIT})")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder (replaced as a whole at the end; built beside it under a temporary name)")
    p.add_argument("--val-labels", type=Path, default=None,
                   help="CSV 'filename,wnid' giving each val file's class (default: the devkit if found in "
                        "--raw-dir, else the bundled tools/data/imagenet_val_labels.csv)")
    p.add_argument("--devkit", type=Path, default=None,
                   help=f"official {DEVKIT} to take val labels from (needs scipy; wins over --val-labels); "
                        "used automatically when it sits in --raw-dir and --val-labels is not given")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes extracting class tars in parallel (1 = all in this process; default: the CPU "
                        "cores this process may use, e.g. those Slurm allotted)")
    p.add_argument("--expect", choices=("auto", "real", "none"), default="auto",
                   help="check the real ILSVRC2012 totals (1,281,167 train, 50,000 val, 1000 classes): "
                        "'auto' when the train archive has 1000 classes, 'real' always, 'none' never")
    args = p.parse_args(argv)
    exit_on_sigterm()
    try:
        summary = extract(args.raw_dir, args.out, args.val_labels, args.devkit, args.workers, args.expect)
    except ExtractError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"extracted {summary['train']['num_images']} train and {summary['val']['num_images']} val images "
          f"of {summary['num_classes']} classes into {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

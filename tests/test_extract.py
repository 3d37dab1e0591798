"""The extract stage: byte-identical files, val by labels, unsafe members refused, counts checked, atomic output."""
import io
import json
import os
import tarfile

import pytest

from tests.conftest import run_tool
from tools import extract as X
from tools.imagenet.classes import read_val_labels
from tools.make_mini import generate


def tree(root):
    """{relative path: bytes} of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def archive_members(raw):
    """{extracted relative path: bytes} as the archives and labels say it should come out."""
    labels = read_val_labels(raw["labels_csv"])
    want = {}
    with tarfile.open(raw["train_tar"]) as outer:
        for m in outer.getmembers():
            with tarfile.open(fileobj=io.BytesIO(outer.extractfile(m).read())) as inner:
                for f in inner.getmembers():
                    want[f"train/{m.name[:-4]}/{f.name}"] = inner.extractfile(f).read()
    with tarfile.open(raw["val_tar"]) as val:
        for m in val.getmembers():
            want[f"val/{labels[m.name]}/{m.name}"] = val.extractfile(m).read()
    return want


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("small"), num_classes=3, train_per_class=4, val_per_class=2, seed=5)


def run_main(capsys, *args):
    code = X.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_mini_extracted_matches_archives(mini_raw, mini_extracted):
    got = tree(mini_extracted)
    summary = json.loads(got.pop("extract.json"))
    want = archive_members(mini_raw)
    assert got.keys() == want.keys()
    assert all(got[k] == want[k] for k in want)  # byte-identical, quirks and the non-image included
    assert summary["classes"] == mini_raw["wnids"]
    assert summary["train"]["num_images"] == mini_raw["num_train"]
    assert summary["val"]["num_images"] == mini_raw["num_val"]
    for name, rel in mini_raw["quirks"].items():
        assert rel in got, name
    assert not list(mini_extracted.parent.glob(".extracted.tmp-*"))


def test_workers_1_and_2_same_tree(small, tmp_path):
    for w in (1, 2):
        run_tool("extract", "--raw-dir", small["raw_dir"], "--val-labels", small["labels_csv"],
                 "--out", tmp_path / f"w{w}", "--workers", w)
    one, two = tree(tmp_path / "w1"), tree(tmp_path / "w2")
    assert one == two
    assert {k: v for k, v in one.items() if k != "extract.json"} == archive_members(small)


def test_missing_archive(tmp_path, capsys):
    code, err = run_main(capsys, "--raw-dir", tmp_path, "--out", tmp_path / "out", "--workers", 1)
    assert code == 2
    assert f"put ILSVRC2012_img_train.tar into {tmp_path}" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- unsafe members

def member(name, data=b"x", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def write_tar(path, members):
    target = {"fileobj": path} if isinstance(path, io.BytesIO) else {"name": path}
    with tarfile.open(mode="w", format=tarfile.GNU_FORMAT, **target) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def evil_raw(tmp_path, outer=(), inner=(), val=()):
    """A raw dir of one class plus the given extra members in the outer train tar, its class tar, the val tar."""
    raw = tmp_path / "raw"
    raw.mkdir()
    inner_tar = io.BytesIO()
    write_tar(inner_tar, [member("n01440764_1.JPEG", b"jpeg"), *inner])
    write_tar(raw / X.TRAIN_TAR, [member("n01440764.tar", inner_tar.getvalue()), *outer])
    write_tar(raw / X.VAL_TAR, [member("ILSVRC2012_val_00000001.JPEG", b"v"), *val])
    labels = raw / "labels.csv"
    labels.write_text("filename,wnid\nILSVRC2012_val_00000001.JPEG,n01440764\n")
    return raw, labels


EVIL = {
    "dotdot": member("../escaped.JPEG"),
    "absolute": member("/tmp/escaped.JPEG"),
    "symlink": member("link.JPEG", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
    "hardlink": member("hard.JPEG", kind=tarfile.LNKTYPE, linkname="../../etc/passwd"),
    "device": member("dev.JPEG", kind=tarfile.CHRTYPE),
    "fifo": member("fifo.JPEG", kind=tarfile.FIFOTYPE),
}


@pytest.mark.parametrize("where", ["outer", "inner", "val"])
@pytest.mark.parametrize("kind", sorted(EVIL))
def test_unsafe_member_refused(tmp_path, capsys, where, kind):
    raw, labels = evil_raw(tmp_path, **{where: [EVIL[kind]]})
    out = tmp_path / "work" / "extracted"
    code, err = run_main(capsys, "--raw-dir", raw, "--val-labels", labels, "--out", out, "--workers", 1)
    assert code == 2
    assert EVIL[kind][0].name in err
    archive = X.VAL_TAR if where == "val" else X.TRAIN_TAR
    assert archive in err and ("n01440764.tar" in err) == (where == "inner")
    assert not out.exists() and not list(out.parent.glob("*"))
    assert not (tmp_path / "escaped.JPEG").exists() and not (tmp_path / "work" / "escaped.JPEG").exists()


def test_inner_tar_must_be_named_by_wnid(tmp_path, capsys):
    raw, labels = evil_raw(tmp_path, outer=[member("notes.txt")])
    code, err = run_main(capsys, "--raw-dir", raw, "--val-labels", labels, "--out", tmp_path / "o", "--workers", 1)
    assert code == 2 and "notes.txt" in err and "<wnid>.tar" in err


def test_unsafe_member_refused_with_workers(tmp_path, capsys):
    raw, labels = evil_raw(tmp_path, inner=[EVIL["dotdot"]])
    code, err = run_main(capsys, "--raw-dir", raw, "--val-labels", labels, "--out", tmp_path / "o", "--workers", 2)
    assert code == 2 and "../escaped.JPEG" in err and not (tmp_path / "o").exists()


# ---------------------------------------------------------------- counts

def labels_csv(tmp_path, small, edit):
    rows = read_val_labels(small["labels_csv"])
    edit(rows)
    path = tmp_path / "labels.csv"
    path.write_text("filename,wnid\n" + "".join(f"{f},{w}\n" for f, w in rows.items()))
    return path


def test_val_file_without_label(small, tmp_path, capsys):
    dropped = "ILSVRC2012_val_00000003.JPEG"
    path = labels_csv(tmp_path, small, lambda rows: rows.pop(dropped))
    code, err = run_main(capsys, "--raw-dir", small["raw_dir"], "--val-labels", path, "--out", tmp_path / "o",
                         "--workers", 1)
    assert code == 2 and "1 val files have no label" in err and dropped in err
    assert not (tmp_path / "o").exists()


def test_label_without_file(small, tmp_path, capsys):
    ghost = "ILSVRC2012_val_00000099.JPEG"
    path = labels_csv(tmp_path, small, lambda rows: rows.update({ghost: small["wnids"][0]}))
    code, err = run_main(capsys, "--raw-dir", small["raw_dir"], "--val-labels", path, "--out", tmp_path / "o",
                         "--workers", 1)
    assert code == 2 and "not in the val archive" in err and ghost in err


def test_class_missing_in_val(small, tmp_path, capsys):
    gone = small["wnids"][1]
    other = small["wnids"][0]
    path = labels_csv(tmp_path, small, lambda rows: rows.update({f: other for f, w in rows.items() if w == gone}))
    code, err = run_main(capsys, "--raw-dir", small["raw_dir"], "--val-labels", path, "--out", tmp_path / "o",
                         "--workers", 1)
    assert code == 2 and "train classes have no val images" in err and gone in err


def test_expect_real_checks_totals(small, tmp_path, capsys):
    code, err = run_main(capsys, "--raw-dir", small["raw_dir"], "--val-labels", small["labels_csv"],
                         "--out", tmp_path / "o", "--workers", 1, "--expect", "real")
    assert code == 2 and "1,281,167 train images, found 12" in err and "50,000 val images" in err


def test_bundled_labels_only_require_every_val_file_labelled(small, tmp_path):
    """A full label list (bundled/devkit) on a non-real archive: no complaint about the other 49,994 labels."""
    bundled = read_val_labels()
    labels = {f"ILSVRC2012_val_{i:08d}.JPEG": bundled[f"ILSVRC2012_val_{i:08d}.JPEG"] for i in (1, 2, 3)}
    with pytest.raises(X.ExtractError, match="val classes .from the labels. are not train classes"):
        X.check_counts({"n01440764": 3}, {w: 1 for w in labels.values()}, list(labels), [], bundled,
                       "bundled", True, "auto")
    wnid = bundled["ILSVRC2012_val_00000001.JPEG"]
    assert X.check_counts({wnid: 3}, {wnid: 1}, ["ILSVRC2012_val_00000001.JPEG"], [], bundled, "b", True,
                          "auto") is False


# ---------------------------------------------------------------- atomic output, devkit

def test_rerun_after_kill_starts_clean(small, tmp_path):
    out = tmp_path / "extracted"
    stale = tmp_path / ".extracted.tmp-999999999"  # a pid that cannot be alive
    (stale / "train" / "n00000000").mkdir(parents=True)
    (out / "junk").mkdir(parents=True)
    X.extract(small["raw_dir"], out, val_labels=small["labels_csv"], workers=1)
    assert not stale.exists()
    assert not (out / "junk").exists() and (out / "extract.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extracted"]


def test_ground_truth_to_labels():
    labels = X.labels_from_ground_truth("2\n1\n2\n", {1: "n01440764", 2: "n01443537"})
    assert labels == {"ILSVRC2012_val_00000001.JPEG": "n01443537", "ILSVRC2012_val_00000002.JPEG": "n01440764",
                      "ILSVRC2012_val_00000003.JPEG": "n01443537"}
    with pytest.raises(X.ExtractError, match="ILSVRC2012_ID 7"):
        X.labels_from_ground_truth("7\n", {1: "n01440764"})


def test_devkit_in_raw_dir_without_scipy(small, tmp_path, capsys, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    for p in small["raw_dir"].glob("*.tar"):
        os.symlink(p, raw / p.name)
    with tarfile.open(raw / X.DEVKIT, "w:gz") as tar:
        for name in ("meta.mat", "ILSVRC2012_validation_ground_truth.txt"):
            tar.addfile(member(f"ILSVRC2012_devkit_t12/data/{name}", b"1\n")[0], io.BytesIO(b"1\n"))
    monkeypatch.setitem(os.sys.modules, "scipy", None)
    monkeypatch.setitem(os.sys.modules, "scipy.io", None)
    code, err = run_main(capsys, "--raw-dir", raw, "--out", tmp_path / "o", "--workers", 1)
    assert code == 2 and "scipy" in err and "--val-labels" in err and X.DEVKIT in err
    # An explicit CSV wins over the devkit found in the raw dir.
    code, err = run_main(capsys, "--raw-dir", raw, "--val-labels", small["labels_csv"], "--out", tmp_path / "o",
                         "--workers", 1)
    assert code == 0, err


def test_explicit_devkit_wins_over_csv(small, tmp_path, capsys, monkeypatch):
    """The workflow passes --val-labels always and --devkit when configured: the devkit is used."""
    monkeypatch.setitem(os.sys.modules, "scipy", None)
    monkeypatch.setitem(os.sys.modules, "scipy.io", None)
    devkit = tmp_path / X.DEVKIT
    with tarfile.open(devkit, "w:gz"):
        pass
    code, err = run_main(capsys, "--raw-dir", small["raw_dir"], "--val-labels", small["labels_csv"],
                         "--devkit", devkit, "--out", tmp_path / "o", "--workers", 1)
    assert code == 2 and "needs scipy" in err

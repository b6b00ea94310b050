"""SA-1B, JourneyDB and DiffusionDB (2M and Large) converted from fixtures in their publishers' layouts, as download
lays them out: counts, captions paired to the right images, rejections per reason, resumption, download's commands."""
from __future__ import annotations

import io
import json
import shlex
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from test_convert import image_bytes, read_mds, run_convert, run_convert_cli, sample_set, write_tar

from data_prep import chunks, convert, download


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (80, 64), fmt: str = "JPEG") -> bytes:
    """An encoded image of one colour, so a stored sample shows which input it came from."""
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


COLOURS = {k: ((37 * i) % 256, (91 * i + 40) % 256, (53 * i + 120) % 256) for i, k in enumerate("abcdefghij", 1)}
CORRUPT = solid((9, 9, 9), (64, 64))[:200]  # a JPEG cut off inside its data


def colour_of(sample: dict) -> str:
    """The fixture letter whose colour the stored image has."""
    px = Image.open(io.BytesIO(sample["image"])).convert("RGB").getpixel((5, 5))
    return min(COLOURS, key=lambda k: sum(abs(a - b) for a, b in zip(COLOURS[k], px, strict=True)))


def write_tgz(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A gzip-compressed tar holding the given (name, bytes) members in order (a name may repeat, as tar allows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def convert_as_download_says(name: str, raw: Path, out: Path, *extra: str) -> dict:
    """Run the exact convert command `download NAME --out RAW` prints, into OUT; return the summary."""
    argv = shlex.split(download.convert_command(name, raw, out))
    assert argv[:3] == ["python", "-m", "data_prep.convert"]
    return run_convert_cli(*argv[3:], "--workers", "0", *extra)


def make_sa1b(raw: Path) -> None:
    """SA-1B: sa_NNNNNN.tar of sa_K.jpg + sa_K.json, and the LLaVA captions as SA1B_caption.tar.gz of sa_K.txt."""
    (raw / "tars").mkdir(parents=True)
    mask = json.dumps({"annotations": [{"segmentation": {"counts": "x", "size": [40, 48]}}]}).encode()
    write_tar(raw / "tars" / "sa_000000.tar", [
        ("./sa_1.jpg", solid(COLOURS["a"], (300, 200))), ("./sa_1.json", mask),  # large: shrunk by --max-side
        ("./sa_2.jpg", solid(COLOURS["b"])), ("./sa_2.json", mask),
        ("./sa_3.jpg", solid(COLOURS["c"])), ("./sa_3.json", mask),  # no caption
        ("./sa_4.jpg", CORRUPT), ("./sa_4.json", mask)])
    write_tar(raw / "tars" / "sa_000001.tar", [
        ("./sa_5.jpg", solid(COLOURS["e"])), ("./sa_5.json", mask),
        ("./sa_2.jpg", solid(COLOURS["f"])), ("./sa_2.json", mask)])  # duplicate id: the first one wins
    write_tgz(raw / "SA1B_caption.tar.gz", [
        ("sa_1.txt", b"caption of sa_1"), ("sa_2.txt", b"caption of sa_2"), ("sa_4.txt", b"caption of sa_4"),
        ("part2/sa_5.txt", b"caption of sa_5"), ("sa_99.txt", b"an image not downloaded")])


def check_sa1b(out: Path, summary: dict) -> None:
    samples = read_mds(out)
    assert {k: (s["caption"], colour_of(s)) for k, s in samples.items()} == {
        "sa_1": ("caption of sa_1", "a"), "sa_2": ("caption of sa_2", "b"), "sa_5": ("caption of sa_5", "e")}
    assert (samples["sa_1"]["width"], samples["sa_1"]["height"]) == (96, 64)
    assert summary["inputs"] == 6 and summary["written"] == 3
    assert summary["rejected_by_reason"] == {"corrupt_image": 1, "duplicate_id": 1, "missing_caption": 1}
    lines = [json.loads(ln) for ln in (out / "rejected.jsonl").read_text().splitlines()]
    assert {(ln["id"], ln["reason"]) for ln in lines} == {("sa_3", "missing_caption"), ("sa_4", "corrupt_image"),
                                                          ("sa_2", "duplicate_id")}
    assert next(ln for ln in lines if ln["id"] == "sa_3")["source"].endswith("sa_000000.tar::./sa_3.jpg")


def test_sa1b_tars_with_caption_archive_or_folder(tmp_path):
    raw = tmp_path / "raw" / "sa1b"
    make_sa1b(raw)
    out = tmp_path / "sa1b"
    check_sa1b(out, convert_as_download_says("sa1b", raw, out, "--max-side", "64"))

    folder = tmp_path / "captions"  # the same captions unpacked: a folder of sa_K.txt, nested or not
    with tarfile.open(raw / "SA1B_caption.tar.gz") as tf:
        tf.extractall(folder, filter="data")
    out_folder = tmp_path / "sa1b_folder"
    check_sa1b(out_folder, run_convert(f"{raw}/tars/sa_00000{{0..1}}.tar", out_folder, "sa1b", captions=folder,
                                       max_side=64))


def make_journeydb(raw: Path) -> None:
    """JourneyDB: data/train/imgs/NNN.tgz of NNN/<name>.jpg and the annotation jsonl inside a .jsonl.tgz."""
    imgs = raw / "data" / "train" / "imgs"
    write_tgz(imgs / "000.tgz", [("000/a.jpg", solid(COLOURS["a"])), ("000/b.jpg", solid(COLOURS["b"])),
                                 ("000/c.jpg", solid(COLOURS["c"])),  # not in the annotations
                                 ("000/d.jpg", CORRUPT),
                                 ("000/a.jpg", solid(COLOURS["f"]))])  # the same name again: duplicate id
    write_tgz(imgs / "001.tgz", [("001/e.jpg", solid(COLOURS["e"]))])
    lines = [{"img_path": "./000/a.jpg", "prompt": "prompt a", "Task2": {"Caption": "caption a"}},
             {"img_path": "./000/b.jpg", "prompt": "prompt b"},  # a release without the Task2 caption
             {"img_path": "./000/d.jpg", "prompt": "prompt d", "Task2": {"Caption": "caption d"}},
             {"img_path": "./001/e.jpg", "prompt": "prompt e", "Task2": {"Caption": "caption e"}},
             {"img_path": "./001/f.jpg", "prompt": "prompt f"},  # listed, but 001.tgz lacks it
             {"img_path": "./002/g.jpg", "prompt": "prompt g"}]  # archive 002 not downloaded: not an input
    jsonl = "".join(json.dumps(ln) + "\n" for ln in lines).encode()
    write_tgz(raw / "data" / "train" / "train_anno_realease_repath.jsonl.tgz", [("train_anno_realease_repath.jsonl",
                                                                                  jsonl)])


def test_journeydb_archives_and_annotation_tgz(tmp_path):
    raw = tmp_path / "raw" / "journeydb"
    make_journeydb(raw)
    out = tmp_path / "jdb"
    summary = convert_as_download_says("journeydb", raw, out)
    samples = read_mds(out)
    assert {k: (s["caption"], colour_of(s)) for k, s in samples.items()} == {
        "000/a": ("prompt a", "a"), "000/b": ("prompt b", "b"), "001/e": ("prompt e", "e")}
    assert summary["inputs"] == 7 and summary["written"] == 3
    assert summary["rejected_by_reason"] == {"corrupt_image": 1, "duplicate_id": 1, "missing_caption": 1,
                                             "missing_image": 1}

    out_cap = tmp_path / "jdb_caption"
    summary = convert_as_download_says("journeydb", raw, out_cap, "--caption-field", "caption")
    assert {k: s["caption"] for k, s in read_mds(out_cap).items()} == {"000/a": "caption a", "001/e": "caption e"}
    assert summary["rejected_by_reason"]["missing_caption"] == 2  # 000/c unlisted, 000/b without a Task2 caption
    lines = (out_cap / "rejected.jsonl").read_text()
    assert "no Task2.Caption for 000/b.jpg" in lines and "listed in train_anno_realease_repath" in lines



def test_journeydb_plain_jsonl_cut_archive_and_bad_line(tmp_path, capsys):
    raw = tmp_path / "raw" / "journeydb"
    make_journeydb(raw)
    with tarfile.open(raw / "data" / "train" / "train_anno_realease_repath.jsonl.tgz") as tf:
        tf.extractall(tmp_path, filter="data")
    jsonl = tmp_path / "train_anno_realease_repath.jsonl"
    big = image_bytes(400, 300, "PNG")  # noise: large even compressed, so the cut falls inside its data
    write_tgz(raw / "data" / "train" / "imgs" / "001.tgz", [("001/e.jpg", solid(COLOURS["e"])), ("001/f.jpg", big)])
    cut = raw / "data" / "train" / "imgs" / "001.tgz"
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 2])
    out = tmp_path / "out"
    summary = run_convert(raw / "data" / "train" / "imgs", out, "journeydb", annotations=jsonl, workers=0)
    assert {k: s["caption"] for k, s in read_mds(out).items()} == {"000/a": "prompt a", "000/b": "prompt b",
                                                                     "001/e": "prompt e"}
    assert summary["rejected_by_reason"] == {"corrupt_image": 1, "corrupt_tar": 1, "duplicate_id": 1,
                                             "missing_caption": 1}  # 001/f was being read when the data ran out

    jsonl.write_text(jsonl.read_text() + "{not json\n")
    assert convert.main([str(raw / "data" / "train" / "imgs"), "--format", "journeydb", "--annotations", str(jsonl),
                         "--out", str(tmp_path / "o2")]) == 1
    assert f"{jsonl}:7" in capsys.readouterr().err


def make_diffusiondb(raw: Path, large: bool = False) -> None:
    """DiffusionDB 2M (images/part-NNNNNN.zip of PNGs) or Large (diffusiondb-large-part-{1,2}/ of WebP zips), each zip
    with its part-NNNNNN.json, and metadata(-large).parquet with prompts and NSFW scores."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ext, fmt = ("webp", "WEBP") if large else ("png", "PNG")
    parts = ([(1, "diffusiondb-large-part-1", "abc"), (10001, "diffusiondb-large-part-2", "ea")] if large
             else [(1, "images", "abc"), (2, "images", "ea")])
    rows = []
    for part, folder, letters in parts:
        zpath = raw / folder / f"part-{part:06d}.zip"
        zpath.parent.mkdir(parents=True, exist_ok=True)
        prompts = {}
        with zipfile.ZipFile(zpath, "w") as zf:
            for k in letters:
                name = f"uuid-{k}.{ext}"
                zf.writestr(name, CORRUPT if k == "c" else solid(COLOURS[k], fmt=fmt))
                prompts[name] = {"p": f"json prompt {k}", "se": 1, "c": 7.0, "st": 50, "sa": "k_lms"}
                scores = {"b": (0.9, 0.0), "e": (0.01, 0.5)}.get(k, (0.05, 0.01))  # b: NSFW image, e: NSFW prompt
                rows.append((name, part, f"meta prompt {k}", *scores))
            zf.writestr("uuid-d." + ext, solid(COLOURS["d"], fmt=fmt))  # in neither the json nor the parquet
            zf.writestr(f"part-{part:06d}.json", json.dumps(prompts))
    rows.append((f"uuid-g.{ext}", 3, "a part not downloaded", 0.0, 0.0))
    cols = dict(zip(("image_name", "part_id", "prompt", "image_nsfw", "prompt_nsfw"), zip(*rows, strict=True),
                    strict=True))
    table = pa.table({**cols, "part_id": pa.array(cols["part_id"], pa.uint16()),
                      "seed": pa.array([1] * len(rows), pa.uint32())})
    pq.write_table(table, raw / ("metadata-large.parquet" if large else "metadata.parquet"))


@pytest.mark.parametrize("large", [False, True], ids=["2m", "large"])
def test_diffusiondb_parts_metadata_and_nsfw_filter(tmp_path, capsys, large):
    name = "diffusiondb-large" if large else "diffusiondb"
    raw = tmp_path / "raw" / name
    make_diffusiondb(raw, large)
    out = tmp_path / "ddb"
    summary = convert_as_download_says(name, raw, out)
    samples = read_mds(out)
    assert {k: (s["caption"], colour_of(s)) for k, s in samples.items()} == {"uuid-a": ("meta prompt a", "a")}
    assert summary["inputs"] == 7
    assert summary["rejected_by_reason"] == {"corrupt_image": 1, "duplicate_id": 1, "missing_caption": 2,
                                             "nsfw_image": 1, "nsfw_prompt": 1}

    # Without the parquet the filter has no scores: refused unless switched off, then the parts' own json captions.
    zips = shlex.split(download.convert_command(name, raw))[3]
    assert convert.main([zips, "--format", "diffusiondb", "--out", str(tmp_path / "x")]) == 1
    assert "--nsfw-threshold off" in capsys.readouterr().err
    out_json = tmp_path / "ddb_json"
    summary = run_convert(zips, out_json, "diffusiondb", nsfw_threshold="off", workers=0)
    assert {k: (s["caption"], colour_of(s)) for k, s in read_mds(out_json).items()} == {
        "uuid-a": ("json prompt a", "a"), "uuid-b": ("json prompt b", "b"), "uuid-e": ("json prompt e", "e")}
    assert summary["rejected_by_reason"] == {"corrupt_image": 1, "duplicate_id": 1, "missing_caption": 2}


class Interrupted(Exception):
    """Stands in for a crash between writing a chunk's shards and committing it."""


@pytest.mark.parametrize("name, make", [("sa1b", make_sa1b), ("journeydb", make_journeydb),
                                        ("diffusiondb", make_diffusiondb)])
def test_interrupted_run_resumes_to_the_same_output(tmp_path, monkeypatch, name, make):
    raw = tmp_path / "raw" / name
    make(raw)
    ref = tmp_path / "ref"
    convert_as_download_says(name, raw, ref, "--chunk-size", "2")

    real_mark_done, calls = chunks.mark_done, []

    def crash_on_second(root, index, payload):
        calls.append(index)
        if len(calls) == 2:
            raise Interrupted(f"stopped before committing chunk {index}")
        real_mark_done(root, index, payload)

    monkeypatch.setattr(chunks, "mark_done", crash_on_second)
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        convert_as_download_says(name, raw, out, "--chunk-size", "2")
    assert (out / "part-00000.done").is_file() and (out / "part-00001").is_dir()
    assert not (out / "part-00001.done").exists() and not (out / "index.json").exists()
    monkeypatch.setattr(chunks, "mark_done", real_mark_done)
    summary = convert_as_download_says(name, raw, out, "--chunk-size", "2")  # the same command again
    assert sample_set(out) == sample_set(ref)
    assert (out / "rejected.jsonl").read_text() == (ref / "rejected.jsonl").read_text()
    assert summary == json.loads((ref / "convert_summary.json").read_text())


def test_globs_and_patterns_name_the_missing_file(tmp_path, capsys):
    raw = tmp_path / "raw" / "sa1b"
    make_sa1b(raw)
    for pattern, message in ((f"{raw}/tars/nothing_*.tar", "no file matches"),
                             (f"{raw}/tars/sa_00000{{0..2}}.tar", "sa_000002.tar")):
        assert convert.main([pattern, "--format", "sa1b", "--captions", str(raw / "SA1B_caption.tar.gz"),
                             "--out", str(tmp_path / "o")]) == 1
        assert message in capsys.readouterr().err
    assert convert.main([str(raw / "tars"), "--format", "sa1b", "--out", str(tmp_path / "o")]) == 1
    assert "--captions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert.main([str(raw), "--format", "folder", "--captions", str(raw), "--out", str(tmp_path)])
    assert "--captions (for sa1b)" in capsys.readouterr().err

    # A glob that matches more files on a rerun (a download still going on) must not resume into the old output.
    out = tmp_path / "grow"
    run_convert(f"{raw}/tars/sa_*.tar", out, "sa1b", captions=raw / "SA1B_caption.tar.gz", workers=0)
    write_tar(raw / "tars" / "sa_000002.tar", [("./sa_7.jpg", solid(COLOURS["g"]))])
    assert convert.main([f"{raw}/tars/sa_*.tar", "--format", "sa1b", "--captions", str(raw / "SA1B_caption.tar.gz"),
                         "--out", str(out)]) == 1
    assert "input_files" in capsys.readouterr().err


def test_download_plans_every_hub_source_offline_and_prints_its_convert_command(tmp_path, capsys):
    for name, n_all, fraction, n_planned in (("journeydb", 200, 0.01, 2), ("diffusiondb", 2000, 0.01, 20),
                                             ("diffusiondb-large", 14000, 0.01, 140)):
        out = tmp_path / name
        assert download.main([name, "--out", str(out), "--fraction", str(fraction), "--dry-run"]) == 0
        plan = [json.loads(ln) for ln in (out / "plan.jsonl").read_text().splitlines()]
        assert len(plan) == n_planned and len(download.DATASETS[name].listing()) == n_all
        assert {p.name for p in out.iterdir()} == {"plan.jsonl"}  # the numbering is the manifest: nothing fetched
        assert f"convert with:\n  {download.convert_command(name, out)}" in capsys.readouterr().out
    large = [json.loads(ln)["url"] for ln in (tmp_path / "diffusiondb-large" / "plan.jsonl").read_text().split("\n")
             if ln]
    for url in large:
        part = int(url.rsplit("part-", 1)[1].split(".")[0])
        assert f"/diffusiondb-large-part-{1 if part <= 10000 else 2}/part-{part:06d}.zip" in url
    assert download.convert_command("diffusiondb-large", tmp_path).endswith("--out data/mds/diffusiondb")
    assert {url.rsplit("/", 1)[1] for url, _ in download.DATASETS["diffusiondb-large"].extras} == {
        "metadata-large.parquet"}

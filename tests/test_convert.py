"""data_prep.convert: every source format to MDS, bad inputs, kill -9 resumption, command errors, download manifests."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import convert
from micro_diffusion.data.integrity import SHARD_HASH, check_folder

REPO = Path(__file__).resolve().parents[1]


def image_bytes(w: int, h: int, fmt: str = "JPEG", mode: str = "RGB", seed: int = 0) -> bytes:
    """An encoded random image."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def read_mds(out: Path) -> dict[str, dict]:
    """All samples of an MDS output folder by id, read with StreamingDataset (fails on duplicate ids)."""
    from streaming import StreamingDataset

    from micro_diffusion.data.shm import remove_dead_leftovers  # Streaming's own cleaner would unlink live runs' too

    remove_dead_leftovers()
    ds = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    samples = {}
    for s in ds:
        assert set(s) == {"image", "caption", "width", "height", "id"}
        assert s["id"] not in samples, f"duplicate id {s['id']}"
        samples[s["id"]] = s
    assert len(samples) == ds.num_samples
    del ds
    remove_dead_leftovers()
    return samples


def check_sizes(samples: dict[str, dict], max_side: int) -> None:
    """Stored width/height match the decoded image, which is RGB with short side <= max_side."""
    for s in samples.values():
        im = Image.open(io.BytesIO(s["image"]))
        assert im.size == (s["width"], s["height"]) and im.mode == "RGB"
        assert min(im.size) <= max_side


def run_convert(input: str | Path, out: Path, format: str, **options) -> dict:
    """Run convert in this process; return its summary. Test images are small on purpose: no min_size unless given."""
    options.setdefault("min_size", 0)
    result = convert.convert(input, out, format, progress=False, **options)
    summary = json.loads((Path(out) / "convert_summary.json").read_text())
    assert result.summary() == summary and result.out == Path(out)
    return summary


def run_convert_cli(*argv: str) -> dict:
    """Run `python -m data_prep.convert INPUT ...` in this process; return its summary (no --min-size unless given)."""
    if "--min-size" not in argv:
        argv = (*argv, "--min-size", 0)
    assert convert.main(["--no-progress", *map(str, argv)]) == 0
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "convert_summary.json").read_text())


def test_folder_txt_and_captions_jsonl(tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "big.png").write_bytes(image_bytes(300, 120, "PNG", seed=1))
    (src / "a" / "b" / "big.txt").write_text("from txt")
    (src / "small.jpg").write_bytes(image_bytes(40, 50, seed=2))
    (src / "small.txt").write_text("txt loses")
    (src / "only_jsonl.jpg").write_bytes(image_bytes(70, 60, seed=3))
    (src / "captions.jsonl").write_text(json.dumps({"file": "small.jpg", "caption": "jsonl wins"}) + "\n"
                                        + json.dumps({"file": "only_jsonl.jpg", "caption": "jsonl only"}) + "\n")
    out = tmp_path / "out"
    summary = run_convert(src, out, "folder", max_side=64, workers=0)
    samples = read_mds(out)
    assert {k: s["caption"] for k, s in samples.items()} == {
        "a/b/big": "from txt", "small": "jsonl wins", "only_jsonl": "jsonl only"}
    check_sizes(samples, 64)
    assert (samples["a/b/big"]["width"], samples["a/b/big"]["height"]) == (160, 64)  # aspect kept, short side 64
    assert (samples["small"]["width"], samples["small"]["height"]) == (40, 50)  # never enlarged
    assert summary["written"] == 3 and summary["rejected"] == 0
    assert summary["written_by_fix"] == {"downscaled": 1, "unchanged": 2}

    crop = tmp_path / "crop"
    run_convert(src, crop, "folder", center_crop_resize=32, workers=0)
    assert {(s["width"], s["height"]) for s in read_mds(crop).values()} == {(32, 32)}

    # The default --min-size (64 px, for photographs) rejects the 40x50 and 70x60 images; the shards carry hashes.
    default = tmp_path / "default"
    assert convert.main([str(src), "--no-progress", "--format", "folder", "--out", str(default), "--workers", "0"]) == 0
    assert set(read_mds(default)) == {"a/b/big"} and convert.MIN_SIZE >= 64
    rejected = [json.loads(x) for x in (default / "rejected.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["reason"]) for r in rejected) == [("only_jsonl", "too_small"), ("small", "too_small")]
    assert check_folder(default, hashes=True) == [] and SHARD_HASH in (default / "index.json").read_text()

    # Bit rot in a committed chunk: the same command with --verify-hashes writes that chunk again.
    shard = next((default / "part-00000").glob("*.mds"))
    good = shard.read_bytes()
    shard.write_bytes(good[:-16] + b"\xff" * 16)
    assert "(corrupted)" in check_folder(default, hashes=True)[0]
    assert convert.main([str(src), "--no-progress", "--format", "folder", "--out", str(default), "--workers", "0",
                         "--verify-hashes"]) == 0
    assert check_folder(default, hashes=True) == [] and shard.read_bytes() == good


def test_coco_first_caption_and_all_captions(tmp_path):
    images = tmp_path / "val2014"
    images.mkdir()
    for i in (1, 2, 3):
        (images / f"COCO_val2014_{i:012d}.jpg").write_bytes(image_bytes(64 + i, 64, seed=i))
    ann = {"images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (1, 2, 3)],
           "annotations": [{"id": 30, "image_id": 1, "caption": "one late"},
                           {"id": 10, "image_id": 1, "caption": "one"}, {"id": 20, "image_id": 2, "caption": "two"}]}
    ann_file = tmp_path / "captions_val2014.json"
    ann_file.write_text(json.dumps(ann))
    out = tmp_path / "out"
    summary = run_convert(images, out, "coco", annotations=ann_file)
    samples = read_mds(out)
    assert {k: s["caption"] for k, s in samples.items()} == {"1": "one", "2": "two"}
    assert summary["rejected_by_reason"] == {"missing_caption": 1}
    check_sizes(samples, 512)

    out_all = tmp_path / "out_all"
    run_convert(images, out_all, "coco", annotations=ann_file, all_captions=True)
    assert {k: s["caption"] for k, s in read_mds(out_all).items()} == {"1_10": "one", "1_30": "one late",
                                                                         "2_20": "two"}


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar holding the given (name, bytes) members in order."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_webdataset_tars_and_brace_pattern(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for t in range(2):
        members = []
        for k in range(3):
            key = f"{t:05d}{k:04d}"
            members += [(f"{key}.jpg", image_bytes(48, 40, seed=t * 10 + k)), (f"{key}.txt", f"cap {key}".encode()),
                        (f"{key}.json", json.dumps({"key": key}).encode())]
        members.append(("000099999.json", b"{}"))  # a failed download: metadata, no image
        write_tar(shards / f"{t:05d}.tar", members)
    out = tmp_path / "out"
    summary = run_convert(f"{shards}/{{00000..00001}}.tar", out, "webdataset")
    samples = read_mds(out)
    assert len(samples) == 6 and all(s["caption"] == f"cap {k}" for k, s in samples.items())
    check_sizes(samples, 512)
    assert summary["rejected_by_reason"] == {"missing_image": 2}

    cut = shards / "00002.tar"
    write_tar(cut, [("k1.jpg", image_bytes(48, 40)), ("k1.txt", b"kept"), ("k2.jpg", image_bytes(400, 300))])
    cut.write_bytes(cut.read_bytes()[:60_000])  # cut inside the ~100 KB k2.jpg
    out_dir = tmp_path / "out_dir"
    summary = run_convert(shards, out_dir, "webdataset")
    assert set(read_mds(out_dir)) == set(samples) | {"k1"}
    assert summary["rejected_by_reason"] == {"missing_image": 2, "corrupt_tar": 1}


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"key": ["k0", "k1"], "caption": ["first", "second"],
                      "jpg": [image_bytes(40, 40, seed=0), image_bytes(50, 40, seed=1)]})
    pq.write_table(table, tmp_path / "part.parquet")
    out = tmp_path / "out"
    run_convert(tmp_path / "part.parquet", out, "parquet")
    assert {k: s["caption"] for k, s in read_mds(out).items()} == {"k0": "first", "k1": "second"}


def make_bad_inputs(src: Path) -> tuple[dict[str, str], dict[str, str], int]:
    """Write good and bad inputs; return (id -> expected fix of written ones, id -> expected rejection, n inputs)."""
    src.mkdir()
    written, rejected = {}, {}

    def put(name: str, data: bytes, caption: bytes | None = b"a caption") -> None:
        (src / name).write_bytes(data)
        if caption is not None:
            (src / name).with_suffix(".txt").write_bytes(caption)

    for i in range(4):
        put(f"good{i}.jpg", image_bytes(64, 48 + i, seed=i))
        written[f"good{i}"] = "unchanged"
    put("corrupt.jpg", os.urandom(2000))
    rejected["corrupt"] = "not_an_image"
    put("truncated.jpg", image_bytes(64, 64, seed=9)[:900])
    rejected["truncated"] = "corrupt_image"
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    put("alpha.png", buf.getvalue())
    written["alpha"] = "alpha_composited"
    put("cmyk.jpg", image_bytes(40, 40, mode="CMYK"))
    written["cmyk"] = "cmyk_converted"
    put("grey.png", image_bytes(40, 40, "PNG", mode="L"))
    written["grey"] = "greyscale_converted"
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16)).save(buf, format="PNG")
    put("deep16.png", buf.getvalue())
    written["deep16"] = "high_bit_depth_converted"
    frames = [Image.new("RGB", (40, 40), c) for c in ((0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    put("anim.gif", buf.getvalue())
    written["anim"] = "animated_first_frame"
    put("tiny.jpg", image_bytes(8, 30))
    rejected["tiny"] = "too_small"
    put("bomb_warn.png", image_bytes(150, 150, "PNG"))  # between Pillow's warning and error limits
    put("bomb.png", image_bytes(300, 300, "PNG"))  # beyond: Pillow raises DecompressionBombError itself
    rejected.update(bomb_warn="decompression_bomb", bomb="decompression_bomb")
    put("nocap.jpg", image_bytes(40, 40), caption=None)
    rejected["nocap"] = "missing_caption"
    put("emptycap.jpg", image_bytes(40, 40), caption=b" \n ")
    rejected["emptycap"] = "empty_caption"
    put("latin1.jpg", image_bytes(40, 40), caption="café au lait".encode("latin-1"))
    written["latin1"] = "caption_non_utf8"
    put("long.jpg", image_bytes(40, 40), caption=b"word " * 100)
    written["long"] = "caption_truncated"
    put("dup.jpg", image_bytes(40, 40, seed=5))
    put("dup.png", image_bytes(40, 40, "PNG", seed=6))  # same id "dup", later in sorted order: rejected
    written["dup"] = "unchanged"
    put("empty.jpg", b"")
    rejected["empty"] = "empty_file"
    os.symlink(src / "nowhere.jpg", src / "dangling.jpg")
    (src / "dangling.txt").write_text("a caption")
    rejected["dangling"] = "unreadable"
    return written, rejected, len(written) + len(rejected) + 1  # + the duplicate


def test_bad_inputs_are_fixed_or_rejected_exactly_once(tmp_path):
    written, rejected, n_inputs = make_bad_inputs(tmp_path / "src")
    out = tmp_path / "out"
    summary = run_convert(tmp_path / "src", out, "folder", min_size=16, max_pixels=20000, max_caption_chars=100,
                          workers=2, chunk_size=7)
    samples = read_mds(out)
    assert set(samples) == set(written)
    check_sizes(samples, 512)
    lines = (out / "rejected.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))
    got = {}
    for line in map(json.loads, lines):
        assert line["source"].startswith(str(tmp_path / "src")) and line["reason"]
        got.setdefault(line["id"], []).append(line["reason"])
    assert got.pop("dup") == ["duplicate_id"]
    assert {k: v[0] for k, v in got.items()} == rejected
    assert summary["inputs"] == n_inputs == summary["written"] + summary["rejected"] == len(samples) + len(lines)
    for fix in set(written.values()) - {"unchanged"}:
        assert summary["written_by_fix"][fix] >= 1, fix
    assert samples["latin1"]["caption"] == "caf\ufffd au lait"
    assert len(samples["long"]["caption"]) <= 100
    assert Image.open(io.BytesIO(samples["alpha"]["image"])).getpixel((5, 5)) > (240, 240, 240)  # white, not red
    assert Image.open(io.BytesIO(samples["deep16"]["image"])).getpixel((5, 5))[0] > 240
    assert Image.open(io.BytesIO(samples["anim"]["image"])).getpixel((5, 5))[2] > 200  # blue first frame


def sample_set(out: Path) -> dict[str, tuple[str, str]]:
    """id -> (sha256 of image bytes, caption)."""
    return {k: (hashlib.sha256(s["image"]).hexdigest(), s["caption"]) for k, s in read_mds(out).items()}


@pytest.mark.slow
def test_kill9_then_rerun_matches_uninterrupted_run(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"{i:03d}.png").write_bytes(image_bytes(200, 150, "PNG", seed=i))
        (src / f"{i:03d}.txt").write_text(f"caption {i}")
    (src / "zz_bad.jpg").write_bytes(b"not an image")
    (src / "zz_bad.txt").write_text("bad")
    argv = [str(src), "--format", "folder", "--max-side", 96, "--chunk-size", 4, "--workers", 1,
            "--min-size", 64, "--no-progress"]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep.convert", *map(str, argv), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out / "part-00000.done").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no chunk finished within 60 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "index.json").exists() and len(list(out.glob("*.done"))) < 11  # killed mid-run
    run_convert_cli(*argv, "--out", out)  # the same command again, in this process to skip a second torch import

    ref = tmp_path / "ref"
    run_convert_cli(*argv, "--out", ref)
    assert sample_set(out) == sample_set(ref)
    assert len(sample_set(ref)) == 40
    lines = (out / "rejected.jsonl").read_text().splitlines()
    assert lines == (ref / "rejected.jsonl").read_text().splitlines() and len(lines) == 1


def test_command_errors_name_the_problem(tmp_path, capsys):
    missing = tmp_path / "no_such_dir"
    assert convert.main([str(missing), "--format", "folder", "--out", str(tmp_path / "o")]) == 2  # a usage error
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        convert.main([str(tmp_path), "--format", "tiff_stack", "--out", str(tmp_path / "o")])
    assert e.value.code != 0 and "tiff_stack" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    src = tmp_path / "src"
    src.mkdir()
    assert convert.main([str(src), "--format", "folder", "--out", str(blocker / "out")]) == 1
    assert str(blocker / "out") in capsys.readouterr().err
    assert convert.main([str(src), "--format", "coco", "--out", str(tmp_path / "o2")]) == 1
    assert "--annotations" in capsys.readouterr().err
    (src / "captions.jsonl").write_text('{"file": "x.jpg"}\n')
    assert convert.main([str(src), "--format", "folder", "--out", str(tmp_path / "o3")]) == 1
    assert f"{src / 'captions.jsonl'}:1" in capsys.readouterr().err


def test_download_manifests_and_fraction(tmp_path, capsys):
    from data_prep import download

    tsv = tmp_path / "cc12m.tsv"
    tsv.write_text("".join(f"https://example.com/{i}.jpg\tcaption {i}\n" for i in range(200)))
    items = download.parse_cc12m(tsv)
    assert len(items) == 200 and items[7].meta["caption"] == "caption 7"
    tenth, half = download.select_fraction(items, 0.1), download.select_fraction(items, 0.5)
    assert len(tenth) == 20 and len(half) == 100 and {i.key for i in tenth} <= {i.key for i in half}
    assert download.select_fraction(items[::-1], 0.1) == tenth  # independent of manifest order
    with pytest.raises(ValueError, match="fraction"):
        download.select_fraction(items, 0.0)

    coco = {"images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg",
                        "coco_url": f"http://images.cocodataset.org/train2014/COCO_train2014_{i:012d}.jpg"}
                       for i in range(10)],
            "annotations": [{"id": 100 + i, "image_id": i % 10, "caption": f"c{i}"} for i in range(20)]}
    (tmp_path / "captions_train2014.json").write_text(json.dumps(coco))
    assert download.main(["coco2014", "--out", str(tmp_path / "coco"), "--fraction", "0.3", "--dry-run",
                          "--manifest", str(tmp_path / "captions_train2014.json")]) == 0
    plan = [json.loads(ln) for ln in (tmp_path / "coco" / "plan.jsonl").read_text().splitlines()]
    assert len(plan) == 3 and all(len(p["meta"]["captions"]) == 2 for p in plan)
    assert all(p["url"].endswith(p["meta"]["file_name"]) for p in plan)

    links = tmp_path / "links.txt"
    links.write_text("file_name\tcdn_link\n" + "".join(f"sa_{i:06d}.tar\thttps://cdn/x{i}\n" for i in range(8)))
    assert [i.dest for i in download.plan("sa1b", links, 0.25)] == sorted(
        i.dest for i in download.select_fraction(download.parse_sa1b_links(links), 0.25))
    listing = tmp_path / "files.txt"
    listing.write_text("README.md\nmetadata.parquet\n" + "".join(f"images/part-{i:06d}.zip\n" for i in range(1, 11)))
    parts = download.plan("diffusiondb", listing, 1.0)
    assert len(parts) == 10 and parts[0].url.startswith("https://huggingface.co/datasets/poloclub/diffusiondb/")
    with pytest.raises(download.DownloadError, match="licence"):
        download.plan_download("sa1b", tmp_path / "sa")


@pytest.mark.parametrize("module, argv, old, new", [
    ("convert", ["src", "--format", "folder", "--output", "o"], "--output", "use --out"),
    ("convert", ["--input", "src", "--format", "folder", "--out", "o"], "--input", "give INPUT as the first argument"),
    ("precompute", ["mds", "--output", "o", "--resolution", "8"], "--output", "use --out"),
    ("precompute", ["--input", "mds", "--out", "o", "--resolution", "8"], "--input", "give INPUT as the first"),
    ("download", ["coco2014", "--out", "o", "--plan-only"], "--plan-only", "use --dry-run"),
])
def test_old_flags_fail_naming_the_new_ones(capsys, module, argv, old, new):
    import importlib

    with pytest.raises(SystemExit) as stop:
        importlib.import_module(f"data_prep.{module}").main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"{old} was renamed" in err and new in err


def test_help_shows_defaults_and_that_precompute_encoders_download(capsys, monkeypatch):
    from data_prep import download, precompute
    from micro_diffusion.encoders import DEFAULT_TEXT_ENCODER, DEFAULT_VAE

    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps help at hyphens too (hf-hub)
    helps = {}
    for module in (convert, precompute, download):
        with pytest.raises(SystemExit) as stop:
            module.main(["--help"])
        assert stop.value.code == 0
        helps[module.__name__] = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 64)" in helps["data_prep.convert"] and "(default: 512)" in helps["data_prep.convert"]
    assert "(default: 1.0)" in helps["data_prep.download"] and "--dry-run" in helps["data_prep.download"]
    pre = helps["data_prep.precompute"]
    assert f"(default: {DEFAULT_VAE})" in pre and f"(default: {DEFAULT_TEXT_ENCODER})" in pre
    assert pre.count("downloaded on first use") >= 2 and "(default: 77)" in pre


def test_a_rerun_removes_unfinished_chunks_and_interrupted_markers(tmp_path):
    """What a kill leaves (a chunk without its marker, a marker's temporary file) goes; committed chunks stay."""
    from data_prep import chunks

    for k in (0, 1):
        chunks.chunk_dir(tmp_path, k).mkdir()
    chunks.done_path(tmp_path, 0).write_text("{}")
    stray = [tmp_path / ".part-00001.done.tmp-12345-0badc0de", tmp_path / "part-00001.done.tmp"]
    for p in stray:
        p.write_text("{")
    (tmp_path / "notes.txt").write_text("keep")
    removed = chunks.remove_unfinished(tmp_path)
    assert sorted(removed) == sorted([chunks.chunk_dir(tmp_path, 1), *stray])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "part-00000", "part-00000.done"]

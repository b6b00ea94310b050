"""data_prep.download: --dry-run never touches the network, a network error is one line and leaves nothing behind,
and `coco2014 --split val` lays out what `make eval-coco` reads (served by a local HTTP server on 127.0.0.1)."""
from __future__ import annotations

import functools
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
from PIL import Image

from data_prep import download, fetching

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = {1: "a red square on grey", 2: "a green circle", 3: "two blue triangles"}


def tree(root: Path) -> set[str]:
    """Every path under root, relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


class Quiet(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; no request log on stderr (the tests count stderr lines); a stalled client times out."""

    timeout = 5

    def log_message(self, *args: object) -> None:
        """No request log."""


class Fails(Quiet):
    """Answers every GET with 500."""

    def do_GET(self) -> None:
        """500 Internal Server Error."""
        self.send_error(500)


@contextmanager
def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 (a free port) for the block; its base URL. Stopped and joined after."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def coco_site(root: Path) -> None:
    """A tiny copy of images.cocodataset.org: the annotation zip (val: 3 images, 3 captions; train: 1) and 3 JPEGs."""
    def captions(split: str, ids: list[int]) -> bytes:
        images = [{"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg", "height": 8, "width": 12,
                   "coco_url": f"http://images.cocodataset.org/{split}2014/COCO_{split}2014_{i:012d}.jpg"} for i in ids]
        anns = [{"id": 900 + i, "image_id": i, "caption": CAPTIONS[i]} for i in ids]
        return json.dumps({"info": {}, "images": images, "annotations": anns}).encode()

    (root / "annotations").mkdir(parents=True)
    with zipfile.ZipFile(root / "annotations" / "annotations_trainval2014.zip", "w") as z:
        z.writestr("annotations/captions_val2014.json", captions("val", [1, 2, 3]))
        z.writestr("annotations/captions_train2014.json", captions("train", [1]))
    (root / "val2014").mkdir()
    for i in CAPTIONS:
        buf = io.BytesIO()
        Image.new("RGB", (12, 8), (40 * i, 90, 200)).save(buf, format="JPEG")
        (root / "val2014" / f"COCO_val2014_{i:012d}.jpg").write_bytes(buf.getvalue())


@pytest.fixture
def no_network(monkeypatch):
    """urlopen raises if called: a test using this asserts that nothing was fetched."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access in a dry run: {args}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.parametrize("name", sorted(download.DATASETS))
def test_dry_run_fetches_nothing_and_writes_at_most_the_plan(tmp_path, capsys, no_network, name):
    out = tmp_path / "raw" / name
    code = download.main([name, "--out", str(out), "--fraction", "0.01", "--dry-run"])
    captured = capsys.readouterr()
    if name == "sa1b":  # Meta hands out its links file after licence acceptance: the real run would fail the same way
        assert code == 1 and "needs --manifest" in captured.err and len(captured.err.splitlines()) == 1
        assert tree(tmp_path) == set()
        return
    assert code == 0 and captured.err == ""
    url = download.manifest_source(name)
    if download.DATASETS[name].listing is None:  # coco2014, cc12m, textcaps: the plan needs a manifest from the web
        local = out / "manifest" / url.rsplit("/", 1)[1]
        assert f"curl -fL --create-dirs -o {local} {url}" in captured.out
        assert tree(tmp_path) == set()  # not even OUT: no empty manifest/ folder
    else:  # the hub datasets plan from their fixed file numbering
        assert tree(tmp_path) == {"raw", f"raw/{name}", f"raw/{name}/plan.jsonl"}
    assert "after the download, convert with:" in captured.out


def test_dry_run_plans_from_the_manifest_a_previous_run_fetched(tmp_path, capsys, no_network):
    coco_site(tmp_path / "site")
    out = tmp_path / "coco"
    (out / "manifest").mkdir(parents=True)
    (out / "manifest" / "annotations_trainval2014.zip").write_bytes(
        (tmp_path / "site" / "annotations" / "annotations_trainval2014.zip").read_bytes())
    assert download.main(["coco2014", "--out", str(out), "--split", "val", "--dry-run"]) == 0
    assert f"make eval-coco CKPT=<run folder, checkpoint or export> COCO={out}" in capsys.readouterr().out
    plan = [json.loads(line) for line in (out / "plan.jsonl").read_text().splitlines()]
    assert [p["dest"] for p in plan] == [f"val2014/COCO_val2014_{i:012d}.jpg" for i in (1, 2, 3)]
    assert plan[0]["url"] == "http://images.cocodataset.org/val2014/COCO_val2014_000000000001.jpg"


@pytest.mark.parametrize("where", ["nothing listening", "HTTP 500"])
def test_a_network_error_is_one_line_naming_the_url_and_leaves_no_folder(tmp_path, capsys, monkeypatch, where):
    out = tmp_path / "data" / "coco"
    with serve(Fails) if where == "HTTP 500" else nullcontext(f"http://127.0.0.1:{closed_port()}") as base:
        monkeypatch.setenv(download.COCO_URL_ENV, base)
        code = download.main(["coco2014", "--out", str(out), "--split", "val"])
    err = capsys.readouterr().err
    url = f"{base}/annotations/annotations_trainval2014.zip"
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"data_prep.download: could not fetch {url} (") and "rerun the same command" in err
    assert ("500" in err) == (where == "HTTP 500")
    assert tree(tmp_path) == set()  # neither data/ nor data/coco/manifest/ is left


def test_a_failed_image_leaves_no_partial_file_and_no_empty_folder(tmp_path, capsys, monkeypatch):
    site = tmp_path / "site"
    coco_site(site)
    (site / "val2014" / "COCO_val2014_000000000002.jpg").unlink()  # 404 for the second image
    out = tmp_path / "coco"
    with serve(functools.partial(Quiet, directory=str(site))) as base:
        monkeypatch.setenv(download.COCO_URL_ENV, base)
        assert download.main(["coco2014", "--out", str(out), "--split", "val"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"{base}/val2014/COCO_val2014_000000000002.jpg (HTTP 404" in err
    assert not any(p.name.endswith(".part") for p in out.rglob("*"))
    assert not (out / "annotations").exists()  # written only once every image is here
    assert (out / "val2014" / "COCO_val2014_000000000001.jpg").is_file()  # kept: the rerun resumes from it


def test_val_split_writes_what_make_eval_coco_reads(tmp_path, capsys, monkeypatch):
    from micro_diffusion.cli import main as cli
    from micro_diffusion.eval.coco import draw_captions, prepare_reference

    site, out = tmp_path / "site", tmp_path / "data" / "coco"
    coco_site(site)
    with serve(functools.partial(Quiet, directory=str(site))) as base:
        monkeypatch.setenv(download.COCO_URL_ENV, base)
        assert download.main(["coco2014", "--split", "val", "--out", str(out)]) == 0
    assert f"make eval-coco CKPT=<run folder, checkpoint or export> COCO={out}" in capsys.readouterr().out
    # The paths the Makefile's eval-coco target passes, under COCO=out:
    ann_rel, images_rel = re.search(r"--annotations \$\(COCO\)/(\S+) --images \$\(COCO\)/(\S+)",
                                    (ROOT / "Makefile").read_text()).groups()
    annotations, images = out / ann_rel, out / images_rel
    assert (ann_rel, images_rel) == ("annotations/captions_val2014.json", "val2014")
    data = json.loads(annotations.read_text())
    assert {a["id"]: a["caption"] for a in data["annotations"]} == {900 + i: c for i, c in CAPTIONS.items()}
    for i in CAPTIONS:
        name = f"COCO_val2014_{i:012d}.jpg"
        assert (images / name).read_bytes() == (site / "val2014" / name).read_bytes()
    draw = draw_captions(annotations, num=3)  # the eval's own reader, over every image
    assert sorted(d["caption"] for d in draw) == sorted(CAPTIONS.values())
    assert prepare_reference(draw, images, tmp_path / "ref", size=8) == 3

    assert cli(["eval", "coco", str(tmp_path / "model"), "--out", str(tmp_path / "eval"), "--annotations",
                str(annotations), "--images", str(images), "--dry-run"]) == 0
    present = json.loads(capsys.readouterr().out)["inputs_present"]
    assert present["annotations"] and present["images"]


def test_fetch_renames_a_complete_file_only(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "f.bin").write_bytes(b"x" * 3000)
    with serve(functools.partial(Quiet, directory=str(site))) as base:
        fetching.fetch(f"{base}/f.bin", tmp_path / "got" / "f.bin")
        with pytest.raises(fetching.DownloadError, match=re.escape(f"{base}/missing.bin (HTTP 404")):
            fetching.fetch(f"{base}/missing.bin", tmp_path / "got" / "missing.bin")
    assert tree(tmp_path / "got") == {"f.bin"} and (tmp_path / "got" / "f.bin").read_bytes() == b"x" * 3000


def test_split_is_checked_before_anything_is_created(tmp_path, capsys):
    assert download.main(["cc12m", "--out", str(tmp_path / "o"), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--split val: only coco2014" in err and tree(tmp_path) == set()


def test_the_command_reports_a_network_error_without_a_traceback(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    env = {**os.environ, download.COCO_URL_ENV: url, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "data_prep.download", "coco2014", "--out", str(tmp_path / "coco")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [f"data_prep.download: could not fetch {url}/annotations/"
                                        "annotations_trainval2014.zip (Connection refused): check the network or the "
                                        "host, then rerun the same command (files already fetched are kept)"]
    assert tree(tmp_path) == set()

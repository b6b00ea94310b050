"""Hub-ready exports: the model card (metadata read back by huggingface_hub's own parsers, the ledgers' cost, the
evaluations of these weights beside the export) and `micro-diffusion push` against a stub Hub on 127.0.0.1."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load
from pipeline_exports import tiny_export, tiny_vae

from micro_diffusion.cost.ledger import Totals, chain_summary
from micro_diffusion.eval.card import _hub_ids, card_text, write_card
from micro_diffusion.exported import check_files, load_exported, read_config

REPO = Path(__file__).resolve().parents[1]


def _run_folder(runs: Path, stage: str, spent: Totals, total: Totals, init_from: str | None) -> Path:
    """A run folder with a two-record cost ledger and the config.yaml training writes (its recipe's chain)."""
    run = runs / stage
    run.mkdir(parents=True)
    half = Totals(device_hours=spent.device_hours / 2, usd=spent.usd / 2, flops=spent.flops / 2)
    records = [{"stage": stage, "devices": 8, "device_type": "h100", "batch": b, "stage_totals": t.to_dict(),
                "total": t.to_dict() if init_from is None else total.to_dict()}
               for b, t in ((10, half), (20, spent))]
    (run / "cost.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "config.yaml").write_text(yaml.safe_dump({"recipe": {"stage": stage, "init_from": init_from,
                                                                "init_checkpoint": None, "runs_root": str(runs)}}))
    return run


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    return tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


def test_chain_summary_follows_init_from_through_the_ledgers(tmp_path):
    a = Totals(device_hours=10.0, usd=20.0, samples=1000, flops=1e18)
    b = Totals(device_hours=5.0, usd=10.0, samples=500, flops=4e17)
    _run_folder(tmp_path / "runs", "res256_masked", a, a, None)
    second = _run_folder(tmp_path / "runs", "res256_finetune", b, a.plus(b), "res256_masked")
    summary = chain_summary(second)
    assert [s["stage"] for s in summary["stages"]] == ["res256_masked", "res256_finetune"]
    assert summary["stages"][0]["usd"] == 20.0 and summary["stages"][1]["flops"] == 4e17
    assert summary["total"]["device_hours"] == 15.0 and summary["total"]["usd"] == 30.0
    assert chain_summary(tmp_path / "nothing") is None


def _write_eval(folder: Path, name: str, data: dict) -> None:
    folder.mkdir(parents=True)
    (folder / name).write_text(json.dumps(data))


def test_export_writes_a_card_the_hub_parsers_read(vae, tmp_path):
    """README.md: licence, library, pipeline tag, tags, datasets, the ledgers' cost, the usage lines and, once written
    again, the evaluations that record these weights' xxh64 (another export's are left out), in model-index form."""
    a, b = Totals(device_hours=10.0, usd=20.0, samples=1000, flops=1e18), Totals(device_hours=5.0, usd=10.0, flops=4e17)
    _run_folder(tmp_path / "runs", "stage_a", a, a, None)
    run = _run_folder(tmp_path / "runs", "stage_b", b, a.plus(b), "stage_a")
    out = tmp_path / "exports" / "tiny"
    extra = {"training_cost": chain_summary(run), "datasets": ["shapes"]}
    model = tiny_export(out, vae, extra=extra, card=lambda record: card_text(record, out))
    card = ModelCard.load(model / "README.md")
    assert card.data.library_name == "micro-diffusion" and card.data.pipeline_tag == "text-to-image"
    assert card.data.license == "apache-2.0" and "microdit" in card.data.tags and card.data.datasets == ["shapes"]
    assert card.data.eval_results is None  # nothing evaluated these weights yet
    assert "$30 and 1.4e+18 FLOPs over 2 stage(s)" in card.text and "| stage_a | 8 x h100 | 10 | $20 |" in card.text
    assert f'Pipeline.from_pretrained("{out}")' in card.text and "steps=3, guidance=2.5, seed=0" in card.text
    config = read_config(model)
    assert "README.md" not in config["files"]  # documentation: an edited card leaves the weights loadable
    (model / "README.md").write_text("edited by hand\n")
    check_files(model, config, hashed=("model.safetensors", "null_caption.npy"))
    load_exported(model)

    mine = config["files"]["model.safetensors"]["xxh64"]
    coco = {"fid": 21.5, "clip_score": 0.31, "kid_mean": 0.01, "settings": {
        "num_captions": 1000, "weights_xxh64": mine, "sampling": {"sampler": "heun", "steps": 30, "guidance": 5.0}}}
    _write_eval(tmp_path / "exports" / "eval" / "coco", "metrics.json", coco)
    _write_eval(tmp_path / "exports" / "eval" / "old", "metrics.json", {**coco, "fid": 99.0, "settings": {
        **coco["settings"], "weights_xxh64": "0123456789abcdef"}})  # another export's weights
    geneval = tmp_path / "exports" / "geneval"
    _write_eval(geneval, "scores.json", {"overall": 0.5, "tasks": {"colors": {"accuracy": 0.75}}})
    (geneval / "sampling.json").write_text(json.dumps({"weights_xxh64": mine, "sampling": {"steps": 3}}))
    path = write_card(model, repo_id="org/tiny")
    card, meta = ModelCard.load(path), metadata_load(path)
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("coco", "fid"): 21.5, ("coco", "clip_score"): 0.31, ("geneval-style", "geneval"): 0.5,
                       ("geneval-style", "geneval_colors"): 0.75}
    assert meta["model-index"][0]["name"] == "tiny" and meta["library_name"] == "micro-diffusion"
    assert 'Pipeline.from_pretrained("hf://org/tiny")' in card.text and "| FID | 21.5 |" in card.text


def test_sampling_records_tie_images_to_the_weights(vae, tmp_path):
    """What `sample` records names the xxh64 of the weights it used: the link from an evaluation to the card."""
    from micro_diffusion.cli import main

    model = tiny_export(tmp_path / "model", vae)
    assert main(["sample", str(model), "--prompt", "a", "--steps", "1", "--out", str(tmp_path / "s")]) == 0
    record = json.loads((tmp_path / "s" / "prompts.json").read_text())
    assert record["weights_xxh64"] == read_config(model)["files"]["model.safetensors"]["xxh64"]


def test_encoders_that_are_hub_models_are_base_models():
    assert _hub_ids({"vae": "madebyollin/sdxl-vae-fp16-fix",
                     "text_encoder": "open_clip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"}) == [
        "madebyollin/sdxl-vae-fp16-fix", "apple/DFN5B-CLIP-ViT-H-14-378"]
    assert _hub_ids({"vae": "stabilityai/stable-diffusion-xl-base-1.0/vae", "text_encoder": "minilm"}) == [
        "stabilityai/stable-diffusion-xl-base-1.0"]
    assert _hub_ids({"vae": "/weights/vae", "text_encoder": "open_clip:ViT-B-32:laion2b_s34b_b79k"}) == []


def test_push_refuses_before_uploading(vae, tmp_path, monkeypatch):
    """No token, an id that is not ORG/NAME, a folder that is not an export, offline: usage errors naming them."""
    from huggingface_hub import constants

    from micro_diffusion.errors import UsageError
    from micro_diffusion.eval.hub import push

    model = tiny_export(tmp_path / "model", vae)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(UsageError, match="HF_TOKEN"):
        push(model, "org/tiny")
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    with pytest.raises(UsageError, match="REPO_ID 'tiny' is not ORG/NAME"):
        push(model, "tiny")
    with pytest.raises(UsageError, match="is not an exported model folder"):
        push(tmp_path, "org/tiny")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE=1 forbids uploads"):
        push(model, "org/tiny")


class StubHub(BaseHTTPRequestHandler):
    """Just enough of the Hub's API for create_repo and upload_folder: repos/create, validate-yaml, preupload (every
    file 'regular', so no LFS transfer) and commit (NDJSON with base64 contents)."""

    received: dict = {}

    def log_message(self, *args) -> None:  # quiet test output
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        got = self.received
        got.setdefault("paths", []).append(self.path)
        got.setdefault("auth", set()).add(self.headers.get("Authorization"))
        endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        if self.path == "/api/repos/create":
            got["create"] = json.loads(body)
            return self._answer(200, {"url": f"{endpoint}/{got['create']['organization']}/{got['create']['name']}"})
        if self.path == "/api/validate-yaml":
            return self._answer(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._answer(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                for f in files]})
        if "/commit/" in self.path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            got["files"] = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                            for item in lines if item["key"] == "file"}
            got["lfs"] = [item for item in lines if item["key"] == "lfsFile"]
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            return self._answer(200, {"commitUrl": f"{endpoint}/{repo}/commit/abc", "commitOid": "abc"})
        return self._answer(404, {"error": f"stub: no {self.path}"})


@pytest.mark.slow
def test_push_uploads_the_export_and_its_card_to_a_stub_hub(vae, tmp_path):
    model = tiny_export(tmp_path / "model", vae, extra={"datasets": ["shapes"]},
                        card=lambda record: card_text(record, tmp_path / "model"))
    StubHub.received = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
           "HF_TOKEN": "hf_dummy", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "micro_diffusion.cli", "push", str(model), "org/tiny",
                               "--private"], env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr
    got = StubHub.received
    assert got["create"] == {"name": "tiny", "organization": "org", "private": True, "type": "model"}
    assert got["auth"] == {"Bearer hf_dummy"} and not got["lfs"]
    assert sorted(got["files"]) == ["README.md", "config.json", "model.safetensors", "null_caption.npy"]
    for name in ("config.json", "model.safetensors", "null_caption.npy"):
        assert got["files"][name] == (model / name).read_bytes()
    (tmp_path / "received.md").write_bytes(got["files"]["README.md"])
    card = ModelCard.load(tmp_path / "received.md")
    assert card.data.library_name == "micro-diffusion" and card.data.datasets == ["shapes"]
    assert 'Pipeline.from_pretrained("hf://org/tiny")' in card.text  # written again for the repository it went to
    assert metadata_load(tmp_path / "received.md")["pipeline_tag"] == "text-to-image"
    assert proc.stdout.strip().endswith("-> org/tiny: " + env["HF_ENDPOINT"] + "/org/tiny/commit/abc")

"""The cost ledger under a real Composer Trainer (crash, resume, stages, budget cap), estimates and the dashboard."""
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from composer import Callback, Trainer
from composer.models import ComposerModel
from torch.utils.data import DataLoader, TensorDataset

from micro_diffusion.cost.callback import CostCallback
from micro_diffusion.cost.ledger import read_records
from micro_diffusion.cost.prices import PRICE_ENV, usd_per_device_hour
from micro_diffusion.cost.report import write_report
from micro_diffusion.training.callbacks import JSONLLogger

BATCH, FLOPS = 4, 1.0e9
PRICE = 0.5  # dollars per core-hour in these tests


class TinyRegressor(ComposerModel):
    """The smallest model Composer trains: one linear layer, mean squared error."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(8, 1)

    def forward(self, batch):
        return self.net(batch[0])

    def loss(self, outputs, batch):
        return torch.nn.functional.mse_loss(outputs, batch[1])


class FakeClock:
    """Monotonic seconds that only move when the test moves them, so spend is exact."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Drive(Callback):
    """Advances the fake clock 10 s per batch; optionally crashes at the end of one batch, after the ledger's record."""

    def __init__(self, clock, crash_at=None):
        self.clock, self.crash_at = clock, crash_at

    def before_forward(self, state, logger):
        self.clock.now += 10.0

    def batch_end(self, state, logger):
        if self.crash_at is not None and int(state.timestamp.batch) == self.crash_at:
            raise RuntimeError("simulated crash")


def fit(run_dir, clock, ledger, batches, crash_at=None, load_path=None):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    model = TinyRegressor()
    trainer = Trainer(
        model=model, train_dataloader=DataLoader(data, batch_size=BATCH), max_duration=f"{batches}ba",
        optimizers=torch.optim.SGD(model.parameters(), lr=0.01), callbacks=[ledger, Drive(clock, crash_at)],
        save_folder=str(run_dir / "checkpoints"), save_interval="2ba", save_overwrite=True, load_path=load_path,
        device="cpu", progress_bar=False, log_to_console=False, loggers=[JSONLLogger(run_dir / "metrics.jsonl")],
    )
    trainer.fit()
    return trainer


def ledger(run_dir, clock, **kw):
    return CostCallback(run_dir, FLOPS, device_type="cpu", usd_per_device_hour=PRICE, peak_tflops=0.1,
                        log_interval_s=0.0, clock=clock, **kw)


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    """Stage 1 crashes after batch 5 (checkpoint at 4) and resumes to 6; stage 2 carries its totals over for 3."""
    root, clock = tmp_path_factory.mktemp("runs"), FakeClock()
    run1, run2 = root / "stage1", root / "stage2"
    first = ledger(run1, clock, stage="stage1")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(run1, clock, first, batches=6, crash_at=5)
    fit(run1, clock, ledger(run1, clock, stage="stage1"), batches=6,
        load_path=str(run1 / "checkpoints" / "ep0-ba4-rank0.pt"))
    fit(run2, clock, ledger(run2, clock, stage="stage2", carry_over=run1), batches=3)
    return run1, run2, first.devices


@pytest.mark.slow
def test_crash_resume_and_next_stage_count_everything_once(two_stages):
    run, run2, devices = two_stages
    end = read_records(run)[-1]
    assert end["event"] == "fit_end" and end["batch"] == 6
    stage = end["stage_totals"]
    assert stage["samples"] == 6 * BATCH  # the redone batch 5 counts once
    assert stage["flops"] == pytest.approx(6 * BATCH * FLOPS)
    assert stage["wall_seconds"] == pytest.approx(7 * 10.0)  # 5 batches before the crash + 2 after: all held time
    assert stage["lost_seconds"] == pytest.approx(10.0)
    hours = 70.0 * devices / 3600
    assert stage["device_hours"] == pytest.approx(hours)
    assert stage["usd"] == pytest.approx(hours * PRICE)
    assert stage["by_device"] == {"cpu": pytest.approx(hours)}
    assert [r["event"] for r in read_records(run)].count("resume") == 1

    total = read_records(run2)[-1]["total"]  # the next stage starts from this one's totals and adds its own
    assert total["samples"] == 9 * BATCH
    assert total["device_hours"] == pytest.approx(100.0 * devices / 3600)
    assert total["usd"] == pytest.approx(100.0 * devices / 3600 * PRICE)


def test_budget_cap_stops_with_a_checkpoint(tmp_path, monkeypatch):
    """Auto-detected CPU, table price per core-hour, measured peak; a dollar cap stops the run after 2.5 batches."""
    monkeypatch.delenv(PRICE_ENV, raising=False)
    run, clock = tmp_path / "capped", FakeClock()
    usd_per_batch = 10.0 / 3600 * torch.get_num_threads() * usd_per_device_hour("cpu")
    capped = CostCallback(run, FLOPS, stage="capped", max_usd=2.5 * usd_per_batch, log_interval_s=1e9, clock=clock)
    trainer = fit(run, clock, capped, batches=50)
    assert capped.device_type == "cpu" and capped.peak_tflops > 0
    assert int(trainer.state.timestamp.batch) == 3  # 30 s held crosses the 25 s worth of dollars after batch 3
    assert (run / "checkpoints" / "ep0-ba3-rank0.pt").exists()
    events = [r["event"] for r in read_records(run)]
    assert events[0] == "start" and events[-1] == "fit_end" and events[1].startswith("budget_stop: usd")
    assert len(events) == 3  # the long log interval leaves only start, the stop and the end


def test_caps_without_a_checkpoint_folder_and_bad_prices_are_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="max_usd must be positive"):
        CostCallback(tmp_path, FLOPS, max_usd=0)
    with pytest.raises(KeyError, match="unknown device type 'tpu'"):
        CostCallback(tmp_path, FLOPS, device_type="tpu")
    monkeypatch.setenv(PRICE_ENV, "1.25")
    assert usd_per_device_hour("h100") == 1.25 and usd_per_device_hour("h100", 2.0) == 2.0
    monkeypatch.setenv(PRICE_ENV, "cheap")
    with pytest.raises(ValueError, match="MICRO_DIFFUSION_USD_PER_DEVICE_HOUR='cheap'"):
        usd_per_device_hour("h100")
    monkeypatch.delenv(PRICE_ENV)
    assert usd_per_device_hour("h100") == 3.75
    with pytest.raises(FileNotFoundError, match="no cost.jsonl"):
        CostCallback(tmp_path, FLOPS, carry_over=tmp_path)


# --- dashboard in headless Chromium ----------------------------------------------------------------------------------
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom"]
# Appended to a copy of the page: records how many images decoded, so the dumped DOM shows it.
IMAGE_PROBE = ("<script>window.addEventListener('load', () => { const im = [...document.images]; "
               "document.body.setAttribute('data-images', im.filter(i => i.complete && i.naturalWidth > 0).length "
               "+ '/' + im.length); });</script>")


def chromium() -> str:
    """Path of Debian's chromium, installed with apt-get when missing and running as root; else skip."""
    found = shutil.which("chromium")
    if found is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        if subprocess.run(["apt-get", "install", "-y", "chromium"], **quiet).returncode != 0:
            subprocess.run(["apt-get", "update"], **quiet)
            subprocess.run(["apt-get", "install", "-y", "chromium"], **quiet)
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed and could not be installed (needs root and apt-get)")
    return found


def render(page: Path) -> tuple[str, list[str]]:
    """The DOM after load (with the image probe) and the console lines Chromium logged."""
    probed = page.with_name(page.stem + "_probed.html")
    probed.write_text(page.read_text().replace("</body>", IMAGE_PROBE + "</body>"))
    # a short temp dir under /tmp: Chromium puts a Unix socket there, whose path must stay under about 100 bytes
    with tempfile.TemporaryDirectory(dir="/tmp") as profile:
        done = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", probed.as_uri()],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": profile})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.slow
def test_dashboard_renders_in_chromium(two_stages, tmp_path):
    from PIL import Image

    run1, run2, _ = two_stages
    (run2 / "samples").mkdir(exist_ok=True)
    Image.new("RGB", (64, 32), (200, 40, 40)).save(run2 / "samples" / "step_3.png")
    (run2 / "eval_step3.json").write_text(json.dumps({"step": 3, "fid": 99.5, "clip_score": 0.21}))
    out = write_report([run1, run2], tmp_path / "report.html")
    html = out.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: nothing to fetch
    pngs = sorted(p.name for p in tmp_path.glob("report_*.png"))
    assert pngs == ["report_eval_clip_score.png", "report_eval_fid.png", "report_loss_device_hours.png",
                    "report_loss_usd.png"]

    dom, console = render(out)
    assert console == [], console
    assert 'data-images="5/5"' in dom  # four plots and the sample grid decoded
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", dom.split('id="cost-table"')[1].split("</table>")[0])
    assert [re.findall(r"<t[dh]>(.*?)</t[dh]>", r)[0] for r in rows] == ["stage", "stage1", "stage2", "total"]
    assert re.findall(r"<td>(.*?)</td>", rows[-1])[-1] == str(9 * BATCH)  # images seen over both stages

    broken = tmp_path / "broken.html"  # the harness itself must catch console errors and undecodable images
    broken.write_text('<html><body><img src="data:image/png;base64,AAAA"><script>console.error("x")</script>'
                      "</body></html>")
    dom, console = render(broken)
    assert 'data-images="0/1"' in dom and len(console) == 1


# --- estimates -----------------------------------------------------------------------------------------------------
PAPER_STAGES = [("s1_256_masked", 256, 0.75, 250_000), ("s2_256_finetune", 256, 0.0, 30_000),
                ("s3_512_masked", 512, 0.75, 50_000), ("s4_512_finetune", 512, 0.0, 5_000)]


def paper_recipes(folder: Path) -> list[Path]:
    """The paper's four stages as a base file and one short override each (the training package's loader reads them)."""
    names = [s[0] for s in PAPER_STAGES]
    (folder / "base.yaml").write_text(f"stages: {names}\nmodel: {{preset: MicroDiT_XL_2}}\n"
                                      "train: {global_batch: 2048}\n")
    paths, previous = [], "null"
    for name, res, mask, steps in PAPER_STAGES:
        path = folder / f"{name}.yaml"
        path.write_text(f"base: base.yaml\nstage: {name}\ninit_from: {previous}\ndata: {{resolution: {res}}}\n"
                        f"diffusion: {{mask_ratio: {mask}}}\ntrain: {{max_duration: {steps}ba}}\n")
        paths.append(path)
        previous = name
    return paths


@pytest.mark.slow
def test_estimate_reproduces_the_papers_budget(tmp_path, capsys, monkeypatch):
    from micro_diffusion.cli import main

    monkeypatch.delenv(PRICE_ENV, raising=False)
    recipes = [str(p) for p in paper_recipes(tmp_path)]
    # 19%: the utilisation the paper's 3.39e20 FLOPs in 2.6 days on 8 H100s implies
    assert main(["cost", "estimate", *recipes, "--devices", "8", "--device-type", "h100", "--mfu", "0.19",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in doc["stages"]] == [s[0] for s in PAPER_STAGES]
    total = doc["total"]
    assert abs(total["days"] - 2.6) / 2.6 < 0.10, total
    assert abs(total["usd"] - 1890) / 1890 < 0.10, total
    assert 0.9 < total["flops"] / 3.39e20 < 1.0  # the reference counts its one-hot MoE dispatch too: ours is lower
    assert total["flops"] == pytest.approx(sum(s["flops"] for s in doc["stages"]))
    masked, unmasked = doc["stages"][0]["flops_per_sample"], doc["stages"][1]["flops_per_sample"]
    assert 2.4 < unmasked / masked < 2.7  # 75% masking at 256 px

    assert main(["cost", "estimate", recipes[0], "--mfu", "0.38", "--usd-per-device-hour", "2"]) == 0
    table = capsys.readouterr().out
    assert "s1_256_masked" in table and table.strip().splitlines()[-1].startswith("total")
    assert main(["cost", "estimate", recipes[0], "--mfu", "1.5"]) == 2  # a usage error, one line on stderr
    assert "--mfu 1.5" in capsys.readouterr().err


@pytest.mark.slow
def test_project_stage_recipes_match_the_papers_table(tmp_path):
    """The repository's four stage recipes cost what the paper's table does (same FLOPs, steps and batch)."""
    from micro_diffusion.cost.estimate import estimate_recipe

    repo = Path(__file__).resolve().parents[1] / "recipes"
    names = ["res256_masked", "res256_finetune", "res512_masked", "res512_finetune"]
    ours = [estimate_recipe(repo / f"{n}.yaml", [], 8, "h100", 0.19) for n in names]
    paper = [estimate_recipe(p, [], 8, "h100", 0.19) for p in paper_recipes(tmp_path)]
    for mine, theirs in zip(ours, paper, strict=True):
        assert (mine.steps, mine.global_batch, mine.resolution, mine.mask_ratio) == \
            (theirs.steps, theirs.global_batch, theirs.resolution, theirs.mask_ratio), mine.name
        assert mine.flops == pytest.approx(theirs.flops), mine.name


@pytest.mark.parametrize("device,device_type,precision,dtype,peak", [
    ("cpu", "cpu", "fp32", torch.float32, None), ("cpu", "cpu", "amp_bf16", torch.bfloat16, None),
    ("gpu", "h100", "fp32", torch.float32, 67.0), ("gpu", "h100", "amp_bf16", torch.bfloat16, 989.0)])
def test_utilisation_divides_by_the_peak_of_the_precision_that_ran(tmp_path, monkeypatch, device, device_type,
                                                                    precision, dtype, peak):
    """fp32 training on a CPU is measured against an fp32 matmul, never a bf16 one; GPUs take the table's peak."""
    from types import SimpleNamespace

    from composer.core import Precision

    from micro_diffusion.cost import prices

    measured = []
    monkeypatch.setattr(prices, "matmul_peak_tflops", lambda dev, dt, size, seconds: measured.append(dt) or 0.2)
    ledger = CostCallback(tmp_path, FLOPS, device_type=device_type, usd_per_device_hour=PRICE)
    ledger.init(SimpleNamespace(device=SimpleNamespace(name=device), precision=Precision(precision)), None)
    assert ledger.peak_dtype == dtype
    if peak is None:  # a CPU: measured in the run's precision, shared by the process's cores
        assert measured == [dtype] and ledger.peak_tflops == pytest.approx(0.2 / torch.get_num_threads())
    else:
        assert measured == [] and ledger.peak_tflops == peak


def test_cost_commands_take_overrides_positionally_and_report_under_cost(tmp_path, capsys, monkeypatch, two_stages):
    """`cost estimate RECIPE key=value`, `cost report RUN --out FILE`; the old `report` and `--set` name the new."""
    from micro_diffusion.cli import main

    monkeypatch.delenv(PRICE_ENV, raising=False)
    recipe = str(paper_recipes(tmp_path)[0])
    assert main(["cost", "estimate", recipe, "--json"]) == 0
    base = json.loads(capsys.readouterr().out)["stages"][0]
    assert main(["cost", "estimate", recipe, "train.max_duration=1000ba", "--json"]) == 0
    halved = json.loads(capsys.readouterr().out)["stages"][0]
    assert halved["steps"] == 1000 != base["steps"] and halved["flops"] < base["flops"]
    with pytest.raises(SystemExit) as stop:
        main(["cost", "estimate", recipe, "--set", "train.max_duration=1000ba"])
    assert stop.value.code == 2 and "positional key=value" in capsys.readouterr().err

    run1, run2, _ = two_stages
    out = tmp_path / "dash" / "cost.html"
    assert main(["cost", "report", str(run1), str(run2), "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert main(["report", str(run1)]) == 2
    assert "micro-diffusion cost report" in capsys.readouterr().err

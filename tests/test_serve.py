"""`micro-diffusion serve`: the demo's model on a local page, asked for an image through gradio_client and clicked in
headless Chromium (Debian's, through its ChromeDriver and selenium); its bad input."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_exports import tiny_export, tiny_vae

from micro_diffusion.cli import main
from micro_diffusion.diffusion.sampling import diffusion_samplers
from micro_diffusion.errors import UsageError
from micro_diffusion.eval.card import EXAMPLE_PROMPT, cost_line
from micro_diffusion.eval.serve import check_port, generate, on_page, sampler_choices
from micro_diffusion.exported import read_config

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,900")


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_samplers_offered_are_the_exports_own():
    assert sampler_choices({"preset": "MicroDiT_Tiny_2"}) == diffusion_samplers("dit")
    assert sampler_choices({"preset": "MicroDiT_Tiny_2", "distilled": {"guidance": 4.0}}) == ["consistency"]
    assert sampler_choices({"family": "fluid", "preset": "Fluid_Micro"}) == ["fluid"]


def test_a_port_in_use_is_one_line_naming_it(tmp_path, capsys):
    """Checked before anything loads: the folder need not even be an export."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(UsageError, match=f"127.0.0.1:{port} is in use"):
            check_port("127.0.0.1", port)
        assert main(["serve", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("micro-diffusion serve: --port") and str(port) in err and "\n" not in err
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert "not a TCP port" in capsys.readouterr().err


def test_bad_exports_are_one_line_naming_them(tmp_path, capsys):
    """A folder that is not an export, and an hf:// id that is not cached while the Hub is offline."""
    port = str(free_port())
    assert main(["serve", str(tmp_path), "--port", port]) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path) in err and "\n" not in err
    assert main(["serve", "hf://nobody/not-cached", "--port", port]) == 2
    assert "hf://nobody/not-cached is not in the local Hub cache" in capsys.readouterr().err


@pytest.mark.slow
def test_a_drawn_seed_is_reported_and_reproduces_its_image(tmp_path):
    """Seed -1 draws a seed; the line under the image names it, and that seed gives the same image again."""
    from micro_diffusion import Pipeline

    pipe = Pipeline.from_pretrained(tiny_export(tmp_path / "model", tiny_vae(tmp_path / "vae")), device="cpu")
    image, line = generate(pipe, "a blue square", 2, 3.0, -1, "heun")
    seed = int(line.split()[1])
    assert line.endswith("heun, 2 steps, guidance 3") and " s sampling" in line
    assert np.array_equal(np.asarray(image), np.asarray(pipe("a blue square", steps=2, guidance=3.0, seed=seed,
                                                              sampler="heun").images[0]))


@pytest.mark.slow
def test_refused_settings_show_on_the_page_and_the_server_goes_on(tmp_path):
    """A distilled student: guidance, a diffusion sampler, 3 consistency steps and an empty prompt each become a
    Gradio error naming what to change; then a call the student takes works."""
    import gradio as gr

    from micro_diffusion import Pipeline

    pipe = Pipeline.from_pretrained(tiny_export(tmp_path / "student", tiny_vae(tmp_path / "vae"), "student"),
                                    device="cpu")
    for steps, guidance, sampler, prompt, says in ((1, 3.0, "consistency", "a", "drop --guidance 3"),
                                                   (1, 1.0, "heun", "a", "--sampler consistency"),
                                                   (3, 1.0, "consistency", "a", "takes --steps 1, 2, 4, not 3"),
                                                   (1, 1.0, "consistency", "  ", "write a prompt")):
        with pytest.raises(gr.Error, match=says):
            on_page(pipe, prompt, steps, guidance, 0, sampler)
    assert on_page(pipe, "a", 2, 1.0, 0, "consistency")[1].startswith("seed 0 · ")


@pytest.mark.slow
def test_analytics_stay_off_whatever_the_environment_says(tmp_path, monkeypatch):
    """serve() in this process with GRADIO_ANALYTICS_ENABLED=True: Gradio's switch is off, and the page answers."""
    from micro_diffusion.eval.serve import serve

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    port = free_port()
    page = serve(str(tiny_export(tmp_path / "model", tiny_vae(tmp_path / "vae"))), port=port, device="cpu",
                 block=False)
    try:
        assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and page.analytics_enabled is False
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as answer:
            assert answer.status == 200 and b"micro-diffusion" in answer.read()
    finally:
        page.close()


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    """`micro-diffusion serve` on the demo's model at 127.0.0.1, as a user starts it; stopped with Ctrl-C."""
    model, port = Path(demo[1]["model"]), free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(log.parent / "gradio"), "HF_HUB_OFFLINE": "1"}
    env["GRADIO_ANALYTICS_ENABLED"] = "True"  # the command turns analytics off whatever this says
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "micro_diffusion.cli", "serve", str(model), "--port",
                                 str(port), "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"serve did not answer at {url}:\n{log.read_text()[-3000:]}"
        try:
            urllib.request.urlopen(url, timeout=5).close()
            break
        except OSError:
            time.sleep(0.5)
    yield model, url
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the server closes and the command exits 0
    try:
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def pipe(server):
    from micro_diffusion import Pipeline

    return Pipeline.from_pretrained(server[0], device="cpu", batch_size=1)


@pytest.mark.slow
def test_gradio_client_gets_the_pipelines_image(server, pipe):
    """The page's /generate endpoint returns image 0 of the Pipeline (and so of `micro-diffusion sample`) for the same
    prompt, seed and settings, and a line naming the seed and the sampling time."""
    from gradio_client import Client

    client = Client(server[1], verbose=False)
    path, line = client.predict("a blue square at the bottom right", 3, 2.0, 7, "euler", api_name="/generate")
    expected = pipe("a blue square at the bottom right", steps=3, guidance=2.0, seed=7, sampler="euler").images[0]
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(expected))
    assert line.startswith("seed 7 · ") and "s sampling · euler, 3 steps, guidance 2" in line


def chrome():
    """Debian's Chromium, headless, through its ChromeDriver (on CI `make test` installs both; elsewhere a skip)."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing: `make browser` installs Debian's chromium and "
                        "chromium-driver")
        pytest.skip("Debian's chromium and chromium-driver are not installed (`make browser`, as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp()}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def shown_pixels(screenshot: Image.Image, rect: dict, side: int) -> np.ndarray:
    """The centre half of the shown image, sampled at the centre of each of its side x side pixels (the page scales
    it without smoothing; its corners carry the label and the buttons)."""
    cell = min(rect["width"], rect["height"]) / side
    left = rect["x"] + (rect["width"] - cell * side) / 2
    top = rect["y"] + (rect["height"] - cell * side) / 2
    inner = range(side // 4, side - side // 4)
    rgb = np.asarray(screenshot.convert("RGB"))
    return np.array([[rgb[int(top + (i + 0.5) * cell), int(left + (j + 0.5) * cell)] for j in inner] for i in inner])


@pytest.mark.slow
def test_chromium_clicks_generate_and_shows_the_image(server, pipe, tmp_path):
    """Generate with the page's defaults (the example prompt, seed 0, the export's settings): the screenshot holds the
    Pipeline's image, the page shows the model card's cost line, and it loaded nothing from another host."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model, url = server
    driver = chrome()
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 120)
        button = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#generate"))
        info = driver.find_element(By.CSS_SELECTOR, "#model-info").text
        assert cost_line(read_config(model)["training_cost"]) in " ".join(info.split())
        button.click()
        shown = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))[0]
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", shown))
        line = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#info").text.strip())
        driver.save_screenshot(str(tmp_path / "page.png"))
        rect = shown.rect
        hosts = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    finally:
        driver.quit()
    expected = pipe(EXAMPLE_PROMPT, seed=0).images[0]
    side = expected.size[0]
    on_screen = shown_pixels(Image.open(tmp_path / "page.png"), rect, side).astype(float)
    inner = np.asarray(expected)[side // 4: side - side // 4, side // 4: side - side // 4].astype(float)
    other = np.asarray(pipe(EXAMPLE_PROMPT, seed=1).images[0])[side // 4: side - side // 4,
                                                                side // 4: side - side // 4].astype(float)
    assert np.abs(on_screen - inner).mean() < 2.0, "the screenshot does not hold the Pipeline's image"
    assert np.abs(on_screen - other).mean() > 4 * np.abs(on_screen - inner).mean() + 2.0
    assert line.startswith("seed 0 · ")
    assert hosts and all(h.startswith(url) for h in hosts), [h for h in hosts if not h.startswith(url)]


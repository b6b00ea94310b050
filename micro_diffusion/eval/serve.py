"""`micro-diffusion serve EXPORT`: a local web page (Gradio, the `serve` extra) to try an exported model.

The page takes a prompt, steps, guidance, seed and sampler, and shows the image with its seed and sampling time, under
the model card's cost line. It samples through the Python Pipeline, so an image equals image 0 of
`micro-diffusion sample` with the same prompt, seed and settings. Gradio's analytics and update check are always off
(GRADIO_ANALYTICS_ENABLED=False) and its theme uses system fonts only: the page loads nothing but what this server
sends.
"""
from __future__ import annotations

import os
import random
import socket
import time
import warnings
from typing import Any

from ..diffusion.sampling import diffusion_samplers
from ..errors import UsageError
from ..families import family_of
from .card import EXAMPLE_PROMPT, cost_line
from .pipeline import Pipeline

HOST = "127.0.0.1"
PORT = 7860  # Gradio's usual port
MAX_STEPS = 100  # the steps slider's end (an export whose default is higher gets twice its default)
MAX_GUIDANCE = 15.0
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # system fonts: nothing fetched from a font service
MONO = ["ui-monospace", "monospace"]
# The image fills its box, scaled without smoothing: a model's pixels stay visible at any size (demo models draw 64 px)
CSS = "#image img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"
IMAGE_PX = 384


def sampler_choices(config: dict) -> list[str]:
    """The samplers an export takes: `consistency` for a distilled student, else its family's diffusion samplers."""
    return ["consistency"] if config.get("distilled") else diffusion_samplers(family_of(config).name)


def check_port(host: str, port: int) -> None:
    """A usage error naming host:port when another program listens there (checked before the model loads)."""
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a TCP port (1 to 65535)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise UsageError(f"--port {port}: {host}:{port} is in use ({err.strerror}); give another port, or stop "
                             "the program that holds it") from err


def generate(pipe: Pipeline, prompt: str, steps: float, guidance: float, seed: float, sampler: str
             ) -> tuple[Any, str]:
    """One image for the page: (PIL image, a line with its seed, settings and sampling time); seed -1 draws one."""
    seed = random.randrange(2**31) if int(seed) < 0 else int(seed)
    start = time.perf_counter()
    out = pipe(prompt, steps=int(steps), guidance=float(guidance), seed=seed, sampler=sampler, batch_size=1)
    seconds = time.perf_counter() - start
    s = out.record["sampling"]
    return out.images[0], (f"seed {seed} · {seconds:.2f} s sampling · {s['sampler']}, {s['steps']} steps, "
                           f"guidance {s['guidance']:g}")


def on_page(pipe: Pipeline, prompt: str, steps: float, guidance: float, seed: float, sampler: str
            ) -> tuple[Any, str]:
    """generate() for the Generate button: a refused setting becomes an error shown on the page (gr.Error); the
    server goes on."""
    import gradio as gr

    if not prompt.strip():
        raise gr.Error("write a prompt first")
    try:
        return generate(pipe, prompt, steps, guidance, seed, sampler)
    except UsageError as err:
        raise gr.Error(str(err)) from err


def build_page(pipe: Pipeline, title: str) -> Any:
    """The Gradio Blocks of the page; its Generate button is also the API endpoint /generate."""
    import gradio as gr

    config, s = pipe.config, pipe.settings
    student = bool(config.get("distilled"))

    def run(prompt: str, steps: float, guidance: float, seed: float, sampler: str) -> tuple[Any, str]:
        return on_page(pipe, prompt, steps, guidance, seed, sampler)

    with gr.Blocks(title=f"micro-diffusion: {title}", analytics_enabled=False) as page:
        about = f"{family_of(config).title} model `{config['preset']}`. {cost_line(config.get('training_cost'))}."
        gr.Markdown(f"## {title}\n{about}", elem_id="model-info")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value=EXAMPLE_PROMPT, lines=2, elem_id="prompt")
                steps = gr.Slider(1, max(MAX_STEPS, 2 * s.steps), value=s.steps, step=1, label="Steps")
                guidance = gr.Slider(1.0, max(MAX_GUIDANCE, s.guidance), value=s.guidance, step=0.5, label="Guidance",
                                     interactive=not student, info="baked in by distillation" if student else None)
                seed = gr.Number(value=0, precision=0, label="Seed (-1 draws one)")
                sampler = gr.Dropdown(sampler_choices(config), value=s.sampler, label="Sampler")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                image = gr.Image(type="pil", format="png", label="Image", elem_id="image", interactive=False,
                                 height=IMAGE_PX)
                info = gr.Markdown(elem_id="info")
        button.click(run, [prompt, steps, guidance, seed, sampler], [image, info], api_name="generate")
    return page


def serve(model: str, host: str = HOST, port: int = PORT, device: str | None = None, dtype: str | None = None,
          use_ema: bool | None = None, block: bool = True) -> Any:
    """Load the export and serve its page at http://host:port until Ctrl-C (block=False: return the running page)."""
    check_port(host, port)
    pipe = Pipeline.from_pretrained(model, device=device, dtype=dtype, use_ema=use_ema)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # Gradio's module-level reports read it at each call
    try:
        import gradio as gr
    except ImportError as err:
        raise UsageError("micro-diffusion serve needs Gradio: pip install 'micro_diffusion[serve]' (make install "
                         "installs it)") from err

    # Gradio 6.17 names a Starlette constant that Starlette 1.x deprecated: a warning on every request, not a fault
    warnings.filterwarnings("ignore", message=".*HTTP_422_UNPROCESSABLE_ENTITY")
    page = build_page(pipe, str(model))
    theme = gr.themes.Default(font=FONTS, font_mono=MONO)
    print(f"serving {model} at http://{host}:{port} (Ctrl-C stops)", flush=True)
    page.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False, theme=theme, css=CSS,
        prevent_thread_lock=not block, show_error=True, quiet=True)
    return page

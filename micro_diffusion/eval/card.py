"""The model card of an export, README.md: Hub metadata and a page that says how to run the model, what its training
cost and how it scored.

The metadata (YAML, written with huggingface_hub's ModelCardData) holds the licence, `library_name: micro-diffusion`,
`pipeline_tag: text-to-image`, tags, the training datasets, the encoders that are Hub models as `base_model`, and the
evaluation results in the model-index format (EvalResult). The training cost comes from config.json's "training_cost",
which `micro-diffusion export` reads from the cost ledgers of the run and the stages it carried over. Evaluations come
from the files the eval commands write beside the export (`eval coco`'s metrics.json, `eval compose`'s scores.json
beside its sampling.json, the demo's eval/metrics.json): one belongs to this export when it records the xxh64 of this
export's weights.

The card is not among the files config.json hashes: loading never reads it, and a card edited by hand or on the Hub
must not make the weights unloadable.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..errors import UsageError
from ..exported import FILES, HASH, is_export, read_config
from ..families import family_of
from ..utils.atomic import write_text_atomic
from ..utils.run_folder import EVAL_METRICS, MODEL_CARD, SAMPLING_RECORD, SCORES
from ..utils.sizes import as_hw
from ..version import __version__

LICENSE = "apache-2.0"  # the project's licence (pyproject.toml), which its exports carry
LIBRARY = "micro-diffusion"
SEARCH_DEPTH = 3  # evaluation files are looked for this many folders below the export's parent
EXAMPLE_PROMPT = "a red circle at the top left"
NO_COST = "No cost ledger was found for this model (an imported or hand-made export)"
# metrics.json keys the card reports: eval coco's, and the demo's GenEval-style score and caption match
METRICS = (("fid", "FID"), ("clip_score", "CLIP score"), ("geneval", "GenEval-style overall"),
           ("caption_match", "caption match"))


def _weights_hashes(config: dict) -> set[str]:
    """The xxh64 of each weights file config.json records (raw and EMA)."""
    return {v[HASH] for name, v in config.get(FILES, {}).items() if name.endswith(".safetensors")}


def _candidates(root: Path) -> list[Path]:
    """metrics.json and scores.json files at most SEARCH_DEPTH folders below root, in path order."""
    found = []
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < SEARCH_DEPTH else []
        found += [Path(folder) / f for f in (EVAL_METRICS, SCORES) if f in files]
    return sorted(found)


def _read(path: Path) -> dict | None:
    """A JSON object, or None for a file that is not one (another tool's file of the same name)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _metrics(path: Path, data: dict) -> dict | None:
    """A metrics.json with an FID (`eval coco`'s; the demo's, which names its own data set) as an evaluation entry;
    None for another tool's metrics.json."""
    settings = data.get("settings") or {}
    if not isinstance(data.get("fid"), (int, float)):
        return None
    n = settings.get("num_captions")
    coco = f"COCO 2014 val captions ({n} drawn)" if n else "COCO 2014 val captions"
    return {"file": path, "weights_xxh64": settings.get("weights_xxh64"),
            "dataset_type": settings.get("dataset_type", "coco"), "dataset_name": settings.get("dataset_name", coco),
            "split": settings.get("dataset_split", "validation"), "sampling": settings.get("sampling"),
            "metrics": [(k, name, data[k]) for k, name in METRICS if isinstance(data.get(k), (int, float))]}


def _geneval(path: Path, data: dict) -> dict | None:
    """An `eval compose` scores.json (its sampling.json beside it names the weights) as an evaluation entry."""
    sampling = _read(path.parent / SAMPLING_RECORD)
    if sampling is None or "overall" not in data or not isinstance(data.get("tasks"), dict):
        return None
    tasks = [(f"geneval_{t}", f"GenEval-style {t}", part["accuracy"]) for t, part in data["tasks"].items()
             if isinstance(part, dict) and "accuracy" in part]
    return {"file": path, "weights_xxh64": sampling.get("weights_xxh64"), "dataset_type": "geneval-style",
            "dataset_name": "GenEval-style compositional scenes", "split": "test", "sampling": sampling.get("sampling"),
            "metrics": [("geneval", "GenEval-style overall", data["overall"]), *tasks]}


def find_evaluations(model_dir: str | Path, config: dict | None = None) -> list[dict]:
    """Evaluations of this export's weights beside it: `eval coco` and `eval compose` results under its parent folder
    whose record names the xxh64 of one of its weights files."""
    model_dir = Path(model_dir)
    config = config if config is not None else read_config(model_dir)
    hashes = _weights_hashes(config)
    found = []
    for path in _candidates(model_dir.absolute().parent):
        data = _read(path)
        entry = data and (_metrics(path, data) if path.name == EVAL_METRICS else _geneval(path, data))
        if entry and entry["weights_xxh64"] in hashes:
            found.append(entry)
    return found


def _hub_ids(encoders: dict) -> list[str]:
    """The encoders that are Hub models ('org/name', the VAE's subfolder dropped); local folders are not."""
    ids = []
    for spec in (encoders.get("vae", ""), encoders.get("text_encoder", "")):
        spec = spec.removeprefix("open_clip:").removeprefix("hf-hub:")
        parts = spec.split("/")
        if len(parts) >= 2 and not spec.startswith((".", "/", "~")) and not Path(spec).exists() and ":" not in spec:
            ids.append("/".join(parts[:2]))
    return ids


def card_data(config: dict, model_name: str, evaluations: list[dict]) -> ModelCardData:
    """The card's YAML metadata."""
    fam = family_of(config)
    tags = [LIBRARY, "text-to-image", fam.title.lower(), "diffusion" if fam.name == "dit" else "autoregressive"]
    if config.get("distilled"):
        tags.append("consistency-distillation")
    results = [EvalResult(task_type="text-to-image", task_name="Text-to-image", dataset_type=e["dataset_type"],
                          dataset_name=e["dataset_name"], dataset_split=e["split"], metric_type=kind,
                          metric_name=name, metric_value=round(float(value), 4))
               for e in evaluations for kind, name, value in e["metrics"]]
    return ModelCardData(license=LICENSE, library_name=LIBRARY, pipeline_tag="text-to-image", tags=tags,
                         datasets=config.get("datasets") or None, base_model=_hub_ids(config["encoders"]) or None,
                         model_name=model_name, eval_results=results or None)


def _call_lines(config: dict, where: str) -> list[str]:
    """The three lines that load the model and render one image with its own sampling settings."""
    s = config.get("sampling") or {}
    steps, guidance = s.get("steps", 30), float(s.get("guidance", 5.0))
    return ["from micro_diffusion import Pipeline", f'pipe = Pipeline.from_pretrained("{where}")',
            f'images = pipe(["{EXAMPLE_PROMPT}"], steps={steps}, guidance={guidance}, seed=0).images']


def cost_line(cost: dict | None) -> str:
    """The card's training cost in one sentence without its full stop (config.json's "training_cost"); `micro-diffusion
    serve` shows it too."""
    if not cost:
        return NO_COST
    t = cost["total"]
    return (f"Training took {t['device_hours']:.4g} device-hours, ${t['usd']:.4g} and {t['flops']:.3g} FLOPs over "
            f"{len(cost['stages'])} stage(s)")


def _cost_section(cost: dict | None) -> list[str]:
    if not cost:
        return [NO_COST + "."]
    rows = ["| stage | devices | device-hours | dollars | FLOPs | samples |", "| --- | --- | --- | --- | --- | --- |"]
    for s in cost["stages"]:
        devices = f"{s['devices']} x {s['device_type']}" if s.get("devices") else ""
        rows.append(f"| {s['stage']} | {devices} | {s['device_hours']:.4g} | ${s['usd']:.4g} | {s['flops']:.3g} | "
                    f"{s['samples']:,} |")
    t = cost["total"]
    rows.append(f"| **total** | | **{t['device_hours']:.4g}** | **${t['usd']:.4g}** | **{t['flops']:.3g}** | "
                f"**{t['samples']:,}** |")
    return [f"{cost_line(cost)}, from the cost ledgers (`cost.jsonl`) of the runs:", "", *rows]


def _eval_section(evaluations: list[dict]) -> list[str]:
    if not evaluations:
        return ["No evaluation of these weights was found beside the export (run `micro-diffusion eval coco` or "
                "`eval compose`, then `micro-diffusion push` writes this card again)."]
    rows = ["| benchmark | metric | value | sampling |", "| --- | --- | --- | --- |"]
    for e in evaluations:
        s = e.get("sampling") or {}
        how = f"{s.get('sampler')}, {s.get('steps')} steps, guidance {s.get('guidance')}" if s else ""
        rows += [f"| {e['dataset_name']} | {name} | {float(value):.4g} | {how} |" for _, name, value in e["metrics"]]
    return rows


def _provenance(config: dict) -> str:
    """Where the weights came from: recipe stage, checkpoint, git revision, as config.json records them."""
    known = [f"{what} `{config[key]}`" for key, what in (("recipe", "recipe stage"), ("git_revision", "git revision"))
             if config.get(key)]
    return (f"Trained as {', '.join(known)}; c" if known else "C") + f"ard written by micro_diffusion {__version__}."


def card_text(config: dict, model_dir: str | Path, repo_id: str | None = None) -> str:
    """The whole README.md of an export (config: its config.json); repo_id names it in the usage lines."""
    model_dir = Path(model_dir)
    name = repo_id.split("/")[-1] if repo_id else model_dir.absolute().name
    evaluations = find_evaluations(model_dir, config)
    fam, enc = family_of(config), config["encoders"]
    side = as_hw(config["network"]["latent_size"])[0] * int(enc.get("downsample", 8))
    student = " (a consistency-distilled student: 1 to 4 steps, its teacher's guidance baked in)" \
        if config.get("distilled") else ""
    s = config.get("sampling") or {}
    body = [
        f"# {name}", "",
        f"A {fam.title} text-to-image model ({config['preset']}){student}, trained with "
        f"micro_diffusion {config.get('micro_diffusion_version') or ''}".rstrip() + "."
        f" It draws {side}x{side} px images from captions encoded by `{enc['text_encoder']}` "
        f"({enc.get('caption_len')} tokens), decoded by the VAE `{enc['vae']}`.", "",
        "## Use", "", *["    " + line for line in _call_lines(config, f"hf://{repo_id}" if repo_id else str(model_dir))
                        ],
        "", "or from the shell: `micro-diffusion sample MODEL --out OUT --prompt \"...\"` (MODEL: this folder or "
        f"hf://ORG/NAME). Its sampling settings by default: {json.dumps(s) if s else 'the package defaults'}.", "",
        "## Training cost", "", *_cost_section(config.get("training_cost")), "",
        "## Evaluation", "", *_eval_section(evaluations), "",
        "## Files", "",
        "`model.safetensors` (raw weights), `ema.safetensors` (EMA weights, when training kept them), `config.json` "
        "(the network, encoders, sampling settings, provenance, and each file's size and xxh64, checked on load) and "
        "`null_caption.npy` (the unconditional caption embedding). " + _provenance(config),
    ]
    data = card_data(config, name, evaluations)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n").content


def write_card(model_dir: str | Path, repo_id: str | None = None) -> Path:
    """Write (or rewrite) an export's README.md from its config.json and the evaluations beside it."""
    model_dir = Path(model_dir)
    if not is_export(model_dir):
        raise UsageError(f"{model_dir} is not an exported model folder: give a folder written by `micro-diffusion "
                         "export RUN --out DIR`")
    path = model_dir / MODEL_CARD
    write_text_atomic(path, card_text(read_config(model_dir), model_dir, repo_id))
    return path


"""Download scripts: fetch a dataset's manifest, pick a deterministic --fraction of it, then download that subset.

    python -m data_prep.download coco2014 --out data/raw/coco2014 --fraction 0.1
    python -m data_prep.download coco2014 --split val --out data/coco      # the layout `make eval-coco` reads

Each dataset is a manifest (where the items are listed), a parser, a fetch step (data_prep/fetching.py: temp file,
rename, one-line network errors) and the convert command for what was fetched (printed at the end, and by --dry-run).
`plan_download` plans offline once the manifest is here (the hub datasets' fixed file numbering, --manifest, or the copy
a previous run fetched into OUT/manifest/); `download` fetches. `--dry-run` never fetches: it writes OUT/plan.jsonl, or
prints the command that fetches the missing manifest and creates nothing. The subset is chosen by a hash of each item's
key: independent of the manifest's order, and a larger fraction contains every smaller one. Licences and tokens, where
needed, are the user's to obtain (each dataset's note). Exit codes: 0 done, 1 a network error, a gated dataset without
HF_TOKEN, a missing --manifest or img2dataset, 2 bad usage.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_prep.fetching import DownloadError, fetch, no_empty_folders
from micro_diffusion.errors import UsageError, exit_with
from micro_diffusion.utils.argparsing import parser, renamed
from micro_diffusion.utils.atomic import write_text_atomic

PROG = "data_prep.download"
COCO_URL = "http://images.cocodataset.org"  # the real host of COCO's annotation zip and images
COCO_URL_ENV = "MICRO_DIFFUSION_COCO_URL"  # overrides COCO_URL (a mirror; the tests' local server)
COCO_SPLITS = ("train", "val")


def coco_url() -> str:
    """COCO's base URL: $MICRO_DIFFUSION_COCO_URL if set, else images.cocodataset.org."""
    return os.environ.get(COCO_URL_ENV, COCO_URL).rstrip("/")


@dataclass(frozen=True)
class Item:
    """One thing to download: a stable key, its URL, where it goes under OUT, and caption/metadata if known."""

    key: str
    url: str
    dest: str
    meta: dict = field(default_factory=dict)


def check_fraction(fraction: float) -> None:
    """--fraction is a share of the manifest: in (0, 1]."""
    if not 0.0 < fraction <= 1.0:
        raise UsageError(f"--fraction must be in (0, 1], got {fraction}")


def select_fraction(items: list[Item], fraction: float) -> list[Item]:
    """The items whose key hashes into the lowest `fraction` of the hash range (at least one for fraction > 0)."""
    check_fraction(fraction)
    ranked = sorted(items, key=lambda it: hashlib.sha1(it.key.encode()).hexdigest())
    n = max(1, round(fraction * len(ranked))) if ranked else 0
    return sorted(ranked[:n], key=lambda it: it.key)


def read_coco(path: Path, split: str = "train") -> dict:
    """A COCO captions json: the file itself, or member annotations/captions_SPLIT2014.json of the annotation zip."""
    if path.suffix != ".zip":
        return json.loads(path.read_text(encoding="utf-8"))
    member = f"annotations/captions_{split}2014.json"
    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read(member))
    except (zipfile.BadZipFile, KeyError) as err:
        raise DownloadError(f"{path}: not COCO's annotation zip with {member} ({err}); delete it and rerun") from None


def parse_coco(path: Path, split: str = "train") -> list[Item]:
    """COCO captions (json or the annotation zip) -> one item per image of the split, captions and their ids in meta.

    Train images go to images/ (convert's input), val images to val2014/ (the layout `make eval-coco` reads)."""
    data = read_coco(path, split)
    caps: dict[int, list[tuple[int, str]]] = {}
    for a in data["annotations"]:
        caps.setdefault(int(a["image_id"]), []).append((int(a["id"]), a["caption"]))
    folder = "images" if split == "train" else f"{split}2014"
    return [Item(str(im["id"]), f"{coco_url()}/{split}2014/{im['file_name']}", f"{folder}/{im['file_name']}",
                 {"file_name": im["file_name"], "captions": [c for _, c in caps.get(int(im["id"]), [])],
                  "caption_ids": [i for i, _ in caps.get(int(im["id"]), [])]}) for im in data["images"]]


def coco_annotations(items: list[Item]) -> dict:
    """The captions json of the fetched images, under their original image and caption ids (the eval's draw from it
    is the draw from the original file, restricted to these images)."""
    images = [{"id": int(it.key), "file_name": it.meta["file_name"]} for it in items]
    annotations = [{"id": i, "image_id": int(it.key), "caption": c} for it in items
                   for i, c in zip(it.meta["caption_ids"], it.meta["captions"], strict=True)]
    return {"images": images, "annotations": annotations}


def parse_cc12m(path: Path) -> list[Item]:
    """cc12m.tsv (url TAB caption, no header) -> one item per row, keyed by row number."""
    items = []
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)):
            if len(row) != 2:
                raise ValueError(f"{path}:{n + 1}: expected 'url<TAB>caption', got {len(row)} fields")
            items.append(Item(f"{n:09d}", row[0], "", {"caption": row[1]}))
    return items


def parse_sa1b_links(path: Path) -> list[Item]:
    """SA-1B links file (file_name TAB cdn_link, with header) as Meta hands it out after licence acceptance."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and not {"file_name", "cdn_link"} <= set(rows[0]):
        raise ValueError(f"{path}: expected columns file_name and cdn_link, got {sorted(rows[0])}")
    return [Item(r["file_name"], r["cdn_link"], f"tars/{r['file_name']}") for r in rows]


def hub_listing_parser(repo: str, pattern: str) -> Callable[[Path], list[Item]]:
    """Parser of a hub repo file listing (one path a line) keeping the files that match `pattern`."""
    regex = re.compile(pattern)

    def parse(source: Path | list[str]) -> list[Item]:
        lines = source if isinstance(source, list) else source.read_text(encoding="utf-8").splitlines()
        names = [ln.strip() for ln in lines if regex.fullmatch(ln.strip())]
        return [Item(n, f"https://huggingface.co/datasets/{repo}/resolve/main/{n}", n) for n in names]

    return parse


def parse_textcaps(path: Path) -> list[Item]:
    """TextCaps_0.1_train.json -> one item per image (first caption), images inside the shared zip."""
    items: dict[str, Item] = {}
    for d in json.loads(path.read_text(encoding="utf-8"))["data"]:
        if d["image_id"] not in items:
            rel = f"train_images/{d['image_id']}.jpg"  # the layout of train_val_images.zip
            items[d["image_id"]] = Item(d["image_id"], TEXTCAPS_ZIP, rel, {"caption": d["caption_str"]})
    return list(items.values())


HUB = "https://huggingface.co/datasets"
SA1B_CAPTIONS = f"{HUB}/PixArt-alpha/SAM-LLaVA-Captions10M/resolve/main/SA1B_caption.tar.gz"
TEXTCAPS_ZIP = "https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip"
JDB_ANNOTATIONS = "data/train/train_anno_realease_repath.jsonl.tgz"


def _numbered(template: str, ids: range) -> Callable[[], list[str]]:
    """A hub listing from a publisher's fixed file numbering (used when no --manifest listing is given)."""
    return lambda: [template.format(i=i, half=1 if i <= 10000 else 2) for i in ids]


@dataclass(frozen=True)
class Dataset:
    """Where a dataset's manifest lives, how to parse it, what the user must arrange first, and how to convert it."""

    manifest_url: str | None
    parse: Callable[[Path], list[Item]]  # a hub listing's parser also takes the listing's names
    note: str
    convert: tuple[str, ...]  # convert's INPUT and options for what download lays out under OUT ("{out}" replaced)
    token: bool = False
    extras: tuple[tuple[str, str], ...] = ()  # (url, dest under OUT): fetched whole beside the items
    listing: Callable[[], list[str]] | None = None  # the hub repo's file names, when --manifest is not given
    mds: str | None = None  # the stream name of the suggested --out (data/mds/NAME), default the dataset's name


def _hub(repo: str, path: str) -> tuple[str, str]:
    return f"{HUB}/{repo}/resolve/main/{path}", path


DATASETS: dict[str, Dataset] = {
    "coco2014": Dataset(f"{COCO_URL}/annotations/annotations_trainval2014.zip", parse_coco,
                        "manifest: captions_train2014.json (--split val: captions_val2014.json) inside the "
                        "annotation zip (about 241 MB); images fetched one by one from images.cocodataset.org. "
                        "--split val --out data/coco writes the layout `make eval-coco` reads.",
                        ("{out}/images", "--format", "coco", "--annotations", "{out}/captions_subset.json")),
    "cc12m": Dataset("https://storage.googleapis.com/conceptual_12m/cc12m.tsv", parse_cc12m,
                     "images come from the original web hosts via img2dataset (must be on PATH; many URLs are dead).",
                     ("{out}/shards/*.tar", "--format", "webdataset")),
    "sa1b": Dataset(None, parse_sa1b_links,
                    "needs Meta's licence acceptance at https://ai.meta.com/datasets/segment-anything-downloads/ : "
                    "pass the links file you get there as --manifest. The LLaVA captions (SA1B_caption.tar.gz of hf "
                    "dataset PixArt-alpha/SAM-LLaVA-Captions10M) are fetched beside the tars; convert pairs them with "
                    "the images by file stem.",
                    ("{out}/tars/sa_*.tar", "--format", "sa1b", "--captions", "{out}/SA1B_caption.tar.gz"),
                    extras=((SA1B_CAPTIONS, "SA1B_caption.tar.gz"),)),
    "journeydb": Dataset(None, hub_listing_parser("JourneyDB/JourneyDB", r"data/train/imgs/\d+\.tgz"),
                         "gated hub dataset JourneyDB/JourneyDB: accept its terms on huggingface.co and set HF_TOKEN. "
                         "Without --manifest (a listing of the repo's files) the plan assumes data/train/imgs/000.tgz "
                         f"to 199.tgz, as the paper's release reads them; the annotations ({JDB_ANNOTATIONS}) are "
                         "fetched too.",
                         ("{out}/data/train/imgs/*.tgz", "--format", "journeydb", "--annotations",
                          f"{{out}}/{JDB_ANNOTATIONS}"),
                         token=True, extras=(_hub("JourneyDB/JourneyDB", JDB_ANNOTATIONS),),
                         listing=_numbered("data/train/imgs/{i:03d}.tgz", range(200))),
    "diffusiondb": Dataset(None, hub_listing_parser("poloclub/diffusiondb", r"images/part-\d{6}\.zip"),
                           "DiffusionDB 2M, hub dataset poloclub/diffusiondb (CC0): 2,000 part zips of 1,000 PNGs "
                           "each with a json of prompts, plus metadata.parquet (prompts and NSFW scores).",
                           ("{out}/images/part-*.zip", "--format", "diffusiondb", "--annotations",
                            "{out}/metadata.parquet"),
                           extras=(_hub("poloclub/diffusiondb", "metadata.parquet"),),
                           listing=_numbered("images/part-{i:06d}.zip", range(1, 2001))),
    "diffusiondb-large": Dataset(
        None, hub_listing_parser("poloclub/diffusiondb", r"diffusiondb-large-part-[12]/part-\d{6}\.zip"),
        "DiffusionDB Large (14M WebP images, the one the paper's mix took 10.7M of), same hub dataset: 14,000 part "
        "zips under diffusiondb-large-part-1/ (1-10000) and -part-2/, plus metadata-large.parquet.",
        ("{out}/diffusiondb-large-part-*/part-*.zip", "--format", "diffusiondb", "--annotations",
         "{out}/metadata-large.parquet"),
        extras=(_hub("poloclub/diffusiondb", "metadata-large.parquet"),),
        listing=_numbered("diffusiondb-large-part-{half}/part-{i:06d}.zip", range(1, 14001)), mds="diffusiondb"),
    "textcaps": Dataset("https://dl.fbaipublicfiles.com/textvqa/data/textcaps/TextCaps_0.1_train.json",
                        parse_textcaps, "images: one 7 GB zip (train_val_images.zip), fetched whole, selected images "
                        "extracted; captions.jsonl is written beside them.",
                        ("{out}/images", "--format", "folder")),
}


def convert_command(name: str, out: Path, mds_out: Path | None = None) -> str:
    """The convert command for what `download NAME --out OUT` lays out (its --out: mds_out, else data/mds/NAME)."""
    spec = DATASETS[name]
    mds_out = mds_out if mds_out is not None else Path("data") / "mds" / (spec.mds or name)
    args = [a.replace("{out}", str(out)) for a in spec.convert] + ["--out", str(mds_out)]
    return "python -m data_prep.convert " + shlex.join(args)


def next_step(name: str, out: Path, split: str | None = None) -> str:
    """What to run on what was fetched: convert it to shards, or (coco2014 --split val) evaluate on it."""
    if split == "val":
        return f"evaluate with:\n  make eval-coco CKPT=<run folder, checkpoint or export> COCO={shlex.quote(str(out))}"
    return f"convert with:\n  {convert_command(name, out)}"


def resolve_split(name: str, split: str | None) -> str | None:
    """The split to fetch: coco2014's (default train), None for the datasets without splits."""
    if name != "coco2014":
        if split is not None:
            raise UsageError(f"--split {split}: only coco2014 has splits ({', '.join(COCO_SPLITS)}); leave it out")
        return None
    if split is not None and split not in COCO_SPLITS:
        raise UsageError(f"--split {split!r}: not one of {', '.join(COCO_SPLITS)}")
    return split or "train"


def manifest_source(name: str) -> str | None:
    """The URL of dataset `name`'s manifest (COCO's follows $MICRO_DIFFUSION_COCO_URL); None: the user brings it."""
    url = DATASETS[name].manifest_url
    return coco_url() + url[len(COCO_URL):] if url is not None and name == "coco2014" else url


def fetched_manifest(name: str, out: Path) -> Path | None:
    """Where a run keeps the manifest it fetches: OUT/manifest/<the URL's file name> (None: no URL to fetch from)."""
    url = DATASETS[name].manifest_url
    return None if url is None else out / "manifest" / url.rsplit("/", 1)[1]


def manifest_to_fetch(name: str, out: Path, given: Path | None) -> tuple[str, Path] | None:
    """(URL, local path) of the manifest the plan still lacks; None when --manifest, the hub's fixed numbering or an
    earlier run's copy in OUT/manifest/ provides it (or the user must bring it: planning then says so)."""
    local = fetched_manifest(name, out)
    if given is not None or DATASETS[name].listing is not None or local is None or local.is_file():
        return None
    return manifest_source(name), local


def parse_items(name: str, manifest: Path, split: str | None = None) -> list[Item]:
    """Every item of dataset `name` listed in a local manifest."""
    return parse_coco(manifest, split or "train") if name == "coco2014" else DATASETS[name].parse(manifest)


def all_items(name: str, out: Path, given: Path | None, split: str | None) -> list[Item]:
    """Every item: from --manifest if given, else the hub's fixed file numbering, else the manifest in OUT/manifest/
    (fetched there first if missing)."""
    spec = DATASETS[name]
    if given is not None:
        if not given.is_file():
            raise DownloadError(f"--manifest {given}: no such file")
        return parse_items(name, given, split)
    if spec.listing is not None:
        return spec.parse(spec.listing())
    path = fetched_manifest(name, out)
    if path is None:
        raise DownloadError(f"{name} needs --manifest: {spec.note}")
    fetch(manifest_source(name), path)
    return parse_items(name, path, split)


def plan(name: str, manifest: Path, fraction: float, split: str | None = None) -> list[Item]:
    """Parse the manifest of dataset `name` and select the --fraction subset."""
    return select_fraction(parse_items(name, manifest, split), fraction)


def plan_download(name: str, out: str | Path, fraction: float = 1.0, manifest: str | Path | None = None,
                  split: str | None = None) -> list[Item]:
    """Find or fetch the manifest of dataset `name`, select the `fraction` subset and write it to OUT/plan.jsonl."""
    if name not in DATASETS:
        raise UsageError(f"dataset {name!r}: not one of {', '.join(sorted(DATASETS))}")
    check_fraction(fraction)  # before any manifest is fetched
    split, out = resolve_split(name, split), Path(out)
    items = select_fraction(all_items(name, out, Path(manifest) if manifest is not None else None, split), fraction)
    write_plan(items, out)
    return items


def write_plan(items: list[Item], out: Path) -> Path:
    """Write the selected items to OUT/plan.jsonl (what a real run will fetch)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "plan.jsonl"
    write_text_atomic(path, "".join(json.dumps(asdict(it)) + "\n" for it in items), encoding="utf-8")
    return path


def download(name: str, items: list[Item], out: Path, split: str | None = None) -> None:
    """Fetch the planned items and lay them out for data_prep.convert (coco2014 --split val: for `make eval-coco`)."""
    spec, split = DATASETS[name], resolve_split(name, split)
    if name == "cc12m":
        if shutil.which("img2dataset") is None:
            raise DownloadError("cc12m needs img2dataset on PATH (pip install img2dataset)")
        tsv = out / "subset.tsv"
        tsv.write_text("url\tcaption\n" + "".join(f"{it.url}\t{it.meta['caption']}\n" for it in items))
        done = subprocess.run(["img2dataset", "--url_list", str(tsv), "--input_format", "tsv", "--url_col", "url",
                               "--caption_col", "caption", "--output_format", "webdataset", "--output_folder",
                               str(out / "shards"), "--resize_mode", "no"])
        if done.returncode != 0:
            raise DownloadError(f"img2dataset exited with {done.returncode} (its messages are above): rerun the "
                                "same command")
        return
    if name == "textcaps":
        fetch(TEXTCAPS_ZIP, out / "train_val_images.zip")
        with zipfile.ZipFile(out / "train_val_images.zip") as z:
            names = set(z.namelist())
            for it in tqdm(items, desc="extract", unit="img", disable=None):
                if it.dest not in names:
                    raise DownloadError(f"{it.dest} not found in train_val_images.zip")
                z.extract(it.dest, out / "images")
        lines = [json.dumps({"file": it.dest, "caption": it.meta["caption"]}) + "\n" for it in items]
        write_text_atomic(out / "images" / "captions.jsonl", "".join(lines), encoding="utf-8")
        return
    if spec.token and not os.environ.get("HF_TOKEN"):
        raise DownloadError(f"{name} is gated: accept its terms on huggingface.co, set HF_TOKEN and rerun")
    for it in tqdm(items, desc=name, unit="file", disable=None):  # a bar on a terminal only
        fetch(it.url, out / it.dest, token=spec.token)
    for url, dest in spec.extras:
        fetch(url, out / dest, token=spec.token)
    if name == "coco2014":
        name_json = "annotations/captions_val2014.json" if split == "val" else "captions_subset.json"
        (out / name_json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / name_json, json.dumps(coco_annotations(items)))


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m data_prep.download`."""
    notes = "\n".join(f"  {k}: {v.note}" for k, v in DATASETS.items())
    p = parser(f"python -m {PROG}", __doc__.split("\n\n")[0], epilog="datasets:\n" + notes)
    p.add_argument("dataset", choices=sorted(DATASETS), metavar="DATASET", help=", ".join(sorted(DATASETS)))
    p.add_argument("--out", required=True, type=Path, help="download folder")
    p.add_argument("--fraction", type=float, default=1.0, help="share of the manifest to fetch, in (0, 1]")
    p.add_argument("--manifest", type=Path, help="local manifest / links file / hub file listing")
    p.add_argument("--split", choices=COCO_SPLITS, help="coco2014 only: train (for convert, the default) or val "
                   "(OUT/annotations/captions_val2014.json and OUT/val2014/, what make eval-coco reads)")
    p.add_argument("--dry-run", action="store_true", help="write OUT/plan.jsonl and stop; never fetches (a manifest "
                   "not yet here: prints the command that fetches it)")
    renamed(p, "--plan-only", "--dry-run")
    return p


def dry_run(args: argparse.Namespace, split: str | None) -> int:
    """Plan without the network: from a manifest at hand, else say which manifest is missing and how to fetch it."""
    missing = manifest_to_fetch(args.dataset, args.out, args.manifest)
    if missing is None:
        with no_empty_folders(args.out):
            items = plan_download(args.dataset, args.out, args.fraction, args.manifest, split)
        print(f"download: {len(items)} items of {args.dataset} planned in {args.out / 'plan.jsonl'}")
    else:
        url, local = missing
        print(f"download: the plan of {args.dataset} needs its manifest {url}, not in {local.parent} (--dry-run "
              f"fetches nothing); fetch it with:\n  curl -fL --create-dirs -o {shlex.quote(str(local))} {url}\n"
              "then rerun this command: it plans from that file (or give a copy with --manifest)")
    if DATASETS[args.dataset].token and not os.environ.get("HF_TOKEN"):
        print(f"download: the download itself needs HF_TOKEN ({args.dataset} is gated)")
    if args.dataset == "cc12m" and shutil.which("img2dataset") is None:
        print("download: the download itself needs img2dataset on PATH (pip install img2dataset)")
    print(f"download: after the download, {next_step(args.dataset, args.out, split)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m data_prep.download`: parse argv, plan, fetch unless --dry-run."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        check_fraction(args.fraction)  # before any manifest is looked for, in a dry run too
        split = resolve_split(args.dataset, args.split)
        if args.dry_run:
            return dry_run(args, split)
        with no_empty_folders(args.out):
            items = plan_download(args.dataset, args.out, args.fraction, args.manifest, split)
            print(f"download: {len(items)} items of {args.dataset} planned in {args.out / 'plan.jsonl'}")
            download(args.dataset, items, args.out, split)
        print(f"download: {next_step(args.dataset, args.out, split)}")
        return 0

    return exit_with(PROG, run)


if __name__ == "__main__":
    sys.exit(main())

"""Download scripts: fetch a dataset's manifest, pick a deterministic --fraction of it, then download that subset.

    python -m data_prep.download coco2014 --out data/raw/coco2014 --fraction 0.1

Each dataset is a manifest (where the items are listed), a parser (manifest -> items), a fetch step, and the convert
command that turns what was fetched into MDS shards (printed at the end, and by --dry-run). The steps are functions:
`plan_download` (offline once the manifest is here: `--dry-run` writes OUT/plan.jsonl and stops; the hub datasets' file
names follow their publishers' fixed numbering, so they plan without --manifest) and `download` (the fetch). The
subset is chosen by a hash of each item's key, so it does not depend on the manifest's order and a larger fraction
contains every smaller one. Licences and tokens, where needed, are the user's to obtain; see each dataset's note.
Exit codes: 0 done, 1 a gated dataset without HF_TOKEN, a missing --manifest or img2dataset, 2 bad usage.
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
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from micro_diffusion.errors import MicroDiffusionError, UsageError, exit_with
from micro_diffusion.utils.argparsing import parser, renamed
from micro_diffusion.utils.atomic import write_text_atomic

PROG = "data_prep.download"


class DownloadError(MicroDiffusionError):
    """A dataset that cannot be planned or fetched as asked (no manifest, no token, a missing tool): exit 1."""


@dataclass(frozen=True)
class Item:
    """One thing to download: a stable key, its URL, where it goes under OUT, and caption/metadata if known."""

    key: str
    url: str
    dest: str
    meta: dict = field(default_factory=dict)


def select_fraction(items: list[Item], fraction: float) -> list[Item]:
    """The items whose key hashes into the lowest `fraction` of the hash range (at least one for fraction > 0)."""
    if not 0.0 < fraction <= 1.0:
        raise UsageError(f"--fraction must be in (0, 1], got {fraction}")
    ranked = sorted(items, key=lambda it: hashlib.sha1(it.key.encode()).hexdigest())
    n = max(1, round(fraction * len(ranked))) if ranked else 0
    return sorted(ranked[:n], key=lambda it: it.key)


def parse_coco(path: Path) -> list[Item]:
    """COCO captions_*.json -> one item per image (its coco_url), captions in meta."""
    data = json.loads(path.read_text(encoding="utf-8"))
    caps: dict[int, list[str]] = {}
    for a in data["annotations"]:
        caps.setdefault(int(a["image_id"]), []).append(a["caption"])
    return [Item(str(im["id"]), im["coco_url"], f"images/{im['file_name']}",
                 {"file_name": im["file_name"], "captions": caps.get(int(im["id"]), [])}) for im in data["images"]]


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

    def parse(path: Path) -> list[Item]:
        names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if regex.fullmatch(ln.strip())]
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
    parse: Callable[[Path], list[Item]]
    note: str
    convert: tuple[str, ...]  # convert's INPUT and options for what download lays out under OUT ("{out}" replaced)
    token: bool = False
    extras: tuple[tuple[str, str], ...] = ()  # (url, dest under OUT): fetched whole beside the items
    listing: Callable[[], list[str]] | None = None  # the hub repo's file names, when --manifest is not given
    mds: str | None = None  # the stream name of the suggested --out (data/mds/NAME), default the dataset's name


def _hub(repo: str, path: str) -> tuple[str, str]:
    return f"{HUB}/{repo}/resolve/main/{path}", path


DATASETS: dict[str, Dataset] = {
    "coco2014": Dataset("http://images.cocodataset.org/annotations/annotations_trainval2014.zip", parse_coco,
                        "manifest: captions_train2014.json inside the annotations zip; images fetched one by one "
                        "from images.cocodataset.org.",
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


def fetch(url: str, dest: Path, token: bool = False) -> None:
    """Download url to dest (skipped if present), via a temp file so a killed download is never mistaken for done."""
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    req = urllib.request.Request(url)
    if token:
        if not os.environ.get("HF_TOKEN"):
            raise DownloadError(f"{url} is gated: set HF_TOKEN after accepting the dataset's terms")
        req.add_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(req, timeout=60) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)
    os.replace(tmp, dest)


def manifest_path(name: str, spec: Dataset, out: Path, given: Path | None) -> Path:
    """The local manifest: --manifest if given, else the hub's fixed file numbering written to OUT/manifest/files.txt,
    else downloaded (COCO's captions json is taken out of its zip)."""
    if given is not None:
        if not given.is_file():
            raise DownloadError(f"--manifest {given}: no such file")
        return given
    if spec.listing is not None:
        listing = out / "manifest" / "files.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("".join(f"{n}\n" for n in spec.listing()), encoding="utf-8")
        return listing
    if spec.manifest_url is None:
        raise DownloadError(f"{name} needs --manifest: {spec.note}")
    raw = out / "manifest" / spec.manifest_url.rsplit("/", 1)[1]
    fetch(spec.manifest_url, raw)
    if name == "coco2014":
        import zipfile
        with zipfile.ZipFile(raw) as z:
            z.extract("annotations/captions_train2014.json", out / "manifest")
        return out / "manifest" / "annotations" / "captions_train2014.json"
    return raw


def plan(name: str, manifest: Path, fraction: float) -> list[Item]:
    """Parse the manifest of dataset `name` and select the --fraction subset."""
    return select_fraction(DATASETS[name].parse(manifest), fraction)


def plan_download(name: str, out: str | Path, fraction: float = 1.0, manifest: str | Path | None = None
                  ) -> list[Item]:
    """Find or fetch the manifest of dataset `name`, select the `fraction` subset and write it to OUT/plan.jsonl."""
    if name not in DATASETS:
        raise UsageError(f"dataset {name!r}: not one of {', '.join(sorted(DATASETS))}")
    if not 0.0 < fraction <= 1.0:
        raise UsageError(f"--fraction must be in (0, 1], got {fraction}")
    out = Path(out)
    path = manifest_path(name, DATASETS[name], out, Path(manifest) if manifest is not None else None)
    items = plan(name, path, fraction)
    write_plan(items, out)
    return items


def write_plan(items: list[Item], out: Path) -> Path:
    """Write the selected items to OUT/plan.jsonl (what a real run will fetch)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "plan.jsonl"
    write_text_atomic(path, "".join(json.dumps(asdict(it)) + "\n" for it in items), encoding="utf-8")
    return path


def download(name: str, items: list[Item], out: Path) -> None:
    """Fetch the planned items and lay them out for data_prep.convert."""
    spec = DATASETS[name]
    if name == "cc12m":
        if shutil.which("img2dataset") is None:
            raise DownloadError("cc12m needs img2dataset on PATH (pip install img2dataset)")
        tsv = out / "subset.tsv"
        tsv.write_text("url\tcaption\n" + "".join(f"{it.url}\t{it.meta['caption']}\n" for it in items))
        subprocess.run(["img2dataset", "--url_list", str(tsv), "--input_format", "tsv", "--url_col", "url",
                        "--caption_col", "caption", "--output_format", "webdataset", "--output_folder",
                        str(out / "shards"), "--resize_mode", "no"], check=True)
        return
    if name == "textcaps":
        import zipfile
        fetch(TEXTCAPS_ZIP, out / "train_val_images.zip")
        with zipfile.ZipFile(out / "train_val_images.zip") as z:
            names = set(z.namelist())
            for it in tqdm(items, desc="extract", unit="img"):
                if it.dest not in names:
                    raise DownloadError(f"{it.dest} not found in train_val_images.zip")
                z.extract(it.dest, out / "images")
        lines = [json.dumps({"file": it.dest, "caption": it.meta["caption"]}) + "\n" for it in items]
        write_text_atomic(out / "images" / "captions.jsonl", "".join(lines), encoding="utf-8")
        return
    for it in tqdm(items, desc=name, unit="file"):
        fetch(it.url, out / it.dest, token=spec.token)
    for url, dest in spec.extras:
        fetch(url, out / dest, token=spec.token)
    if name == "coco2014":
        ann = {"images": [{"id": int(it.key), "file_name": it.meta["file_name"]} for it in items],
               "annotations": [{"id": int(it.key) * 100 + j, "image_id": int(it.key), "caption": c}
                               for it in items for j, c in enumerate(it.meta["captions"])]}
        write_text_atomic(out / "captions_subset.json", json.dumps(ann), encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m data_prep.download`."""
    notes = "\n".join(f"  {k}: {v.note}" for k, v in DATASETS.items())
    p = parser(f"python -m {PROG}", __doc__.split("\n\n")[0], epilog="datasets:\n" + notes)
    p.add_argument("dataset", choices=sorted(DATASETS), metavar="DATASET", help=", ".join(sorted(DATASETS)))
    p.add_argument("--out", required=True, type=Path, help="download folder")
    p.add_argument("--fraction", type=float, default=1.0, help="share of the manifest to fetch, in (0, 1]")
    p.add_argument("--manifest", type=Path, help="local manifest / links file / hub file listing")
    p.add_argument("--dry-run", action="store_true", help="write OUT/plan.jsonl and stop (no download)")
    renamed(p, "--plan-only", "--dry-run")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m data_prep.download`: parse argv, plan, fetch unless --dry-run."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        items = plan_download(args.dataset, args.out, args.fraction, args.manifest)
        print(f"download: {len(items)} items of {args.dataset} planned in {args.out / 'plan.jsonl'}")
        if not args.dry_run:
            download(args.dataset, items, args.out)
        print(f"download: {'after the download, ' if args.dry_run else ''}convert with:\n"
              f"  {convert_command(args.dataset, args.out)}")
        return 0

    return exit_with(PROG, run)


if __name__ == "__main__":
    sys.exit(main())

"""The prepared training format, and `prepare_dataset`, which makes it from your own images and captions.

A prepared data set is a `datasets` folder (``save_to_disk``) with the columns ``image`` (square RGB images at
the training resolution), ``prompt`` (the caption), ``plan`` (a plan text that parses) and ``split``
(``train`` / ``heldout``); other columns are kept and ignored. Every trainer here (the base VAE, CLIP and U-Net,
and the bridge) reads this format; the toy world's ``plan2img data build`` writes it too.

`prepare_dataset` reads any of, following diffusers' ``train_text_to_image`` conventions:

- a `datasets` folder (``save_to_disk``),
- an image folder with ``metadata.jsonl`` (the ``imagefolder`` loader: a ``file_name`` column plus captions),
- a Parquet file (images as ``{"bytes": ...}`` structs or raw bytes),

with ``image_column`` / ``caption_column`` / optional ``plan_column``, ``resolution`` and ``center_crop`` (else a
seeded random crop, as the diffusers script's ``RandomCrop`` but fixed per row). Where the data has no plans the
planner LLM writes them: batched, with a progress bar, appended to a cache named after the planner's
fingerprint, so a stopped run resumes where it stopped and a second planner never reads the first one's plans.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.arrow_writer import ArrowWriter
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from planner.schema import Plan, PlanError, PlanSpec
from safeio import InputError, atomic_dir, atomic_write_bytes, read_jsonl

PREPARED_COLUMNS = ("image", "prompt", "plan", "split")


class DataPrepError(InputError):
    """Bad input data for `prepare_dataset` / `load_prepared` (names the file, column or row)."""


def folder_fingerprint(*paths: str | Path) -> str:
    """A short key of the weight files under ``paths`` (names, sizes, modification times)."""
    h = hashlib.sha1()
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(p.rglob("*.safetensors"))
        for f in files:
            h.update(str(f.resolve()).encode())
            h.update(str(f.stat().st_size).encode())
            h.update(str(int(f.stat().st_mtime)).encode())
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ reading
def _check_jsonl(path: Path) -> None:
    """Each line of a JSON-lines file is UTF-8 and one JSON object; `DataPrepError` names the file and line."""
    for lineno, row in read_jsonl(path, DataPrepError):
        if not isinstance(row, dict):
            raise DataPrepError(f"{path} line {lineno}: not a JSON object")


def read_source(source: str | Path):
    """A `datasets.Dataset` from a saved folder, an image folder with metadata.jsonl, or a Parquet file."""
    source = Path(source)
    if not source.exists():
        raise DataPrepError(f"data source {source} does not exist")
    try:
        if source.is_file() and source.suffix == ".parquet":
            return datasets.Dataset(pq.read_table(str(source)))  # no copy in the datasets cache
        if source.is_dir() and (source / "dataset_info.json").is_file():
            return datasets.load_from_disk(str(source))
        if source.is_dir() and (source / "metadata.jsonl").is_file():
            _check_jsonl(source / "metadata.jsonl")
            return datasets.load_dataset("imagefolder", data_dir=str(source), split="train")
    except (OSError, ValueError, pa.ArrowException, datasets.exceptions.DatasetGenerationError) as err:
        raise DataPrepError(f"cannot read data source {source}: {err}") from None
    raise DataPrepError(
        f"data source {source} is not a Parquet file, a `datasets` folder or an image folder with metadata.jsonl"
    )


def load_prepared(path: str | Path):
    """Load a prepared data set, with an error naming the folder or the missing columns."""
    path = Path(path)
    if not path.is_dir():
        raise DataPrepError(
            f"data set folder {path} does not exist (make one with `plan2img data prepare` or `plan2img data build`)"
        )
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataPrepError(f"{path} is not a prepared data set: {err}") from None
    missing = [c for c in PREPARED_COLUMNS if c not in ds.column_names]
    if missing:
        raise DataPrepError(f"data set {path} lacks columns {missing} (has {ds.column_names})")
    return ds


def cached_split(path: str | Path, split: str = "train") -> tuple[np.ndarray, list[str], list[str]]:
    """Images (N, H, W, 3) uint8, prompts and plans of one split, the images decoded once and cached beside the
    data set as ``images_<split>.npy`` (plain numpy, memory-mapped, no pickle)."""
    path = Path(path)
    ds = load_prepared(path)
    rows = [i for i, s in enumerate(ds["split"]) if s == split]
    if not rows:
        raise DataPrepError(f"data set {path} has no rows of split {split!r}")
    cache = path / f"images_{split}.npy"
    if not cache.is_file():
        sub = ds.select(rows).with_format("numpy", columns=["image"])
        images = np.stack([np.asarray(x) for x in sub["image"]])
        buf = io.BytesIO()
        np.save(buf, images, allow_pickle=False)
        atomic_write_bytes(cache, buf.getvalue())
    images = np.load(cache, mmap_mode="r", allow_pickle=False)
    if images.shape[0] != len(rows):
        raise DataPrepError(f"image cache {cache} has {images.shape[0]} rows, the split has {len(rows)}: delete it")
    sub = ds.select(rows)
    return images, list(sub["prompt"]), list(sub["plan"])


# ------------------------------------------------------------------------------------------------ preparing
def decode_image(value, where: str) -> Image.Image:
    """A PIL image from a datasets Image value, a {"bytes", "path"} struct, raw bytes or a path."""
    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return Image.open(io.BytesIO(value)).convert("RGB")
        if isinstance(value, str):
            return Image.open(value).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataPrepError(f"{where}: unreadable image ({err})") from None
    raise DataPrepError(f"{where}: the image column holds {type(value).__name__}, not an image")


def square_image(image: Image.Image, resolution: int, center_crop: bool, rng: np.random.Generator) -> np.ndarray:
    """Resize the shorter side to ``resolution`` (bicubic), then crop a square: centred, or at a random offset."""
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.BICUBIC)
    dx, dy = size[0] - resolution, size[1] - resolution
    left, top = (dx // 2, dy // 2) if center_crop else (int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1)))
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def _check_columns(ds, source, columns: dict[str, str | None]) -> None:
    for role, name in columns.items():
        if name is not None and name not in ds.column_names:
            raise DataPrepError(f"data source {source} has no {role} column {name!r} (columns: {ds.column_names})")


def _captions(ds, column: str, source) -> list[str]:
    out = []
    for i, c in enumerate(ds[column]):
        text = " ".join(str(c).split()) if c is not None else ""
        if not text:
            raise DataPrepError(f"data source {source}, row {i}: empty caption in column {column!r}")
        out.append(text)
    return out


def _given_plans(ds, column: str, source, spec: PlanSpec | None) -> list[str]:
    plans = []
    for i, text in enumerate(ds[column]):
        try:
            plans.append(Plan.parse(str(text or ""), spec).to_text())
        except PlanError as err:
            raise DataPrepError(
                f"data source {source}, row {i}: the plan in column {column!r} does not parse: {err}"
            ) from None
    return plans


def written_plans(captions: list[str], planner, cache: Path, batch_size: int = 64, progress: bool = True) -> list[str]:
    """Plans the planner writes for ``captions``, one JSON line per caption appended to ``cache`` as each batch
    finishes, so a stopped run resumes after its last full batch."""
    done: list[str] = []
    if cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                if len(done) >= len(captions) or row["prompt"] != captions[len(done)]:
                    raise DataPrepError(f"plan cache {cache} does not belong to these captions: delete it")
                done.append(row["plan"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(captions), initial=len(done), desc="writing plans", disable=not progress) as bar:
        for start in range(len(done), len(captions), batch_size):
            batch = captions[start : start + batch_size]
            results = planner.plan(batch, batch_size=batch_size)
            lines = []
            for prompt, r in zip(batch, results):
                if r.plan is None:
                    raise DataPrepError(f"the planner wrote no valid plan for caption {prompt!r}: {r.error}")
                lines.append(json.dumps({"prompt": prompt, "plan": r.plan.to_text()}) + "\n")
                done.append(r.plan.to_text())
            with cache.open("a", encoding="utf-8") as fh:
                fh.write("".join(lines))
            bar.update(len(batch))
    return done


def prepare_dataset(
    source: str | Path,
    out: str | Path,
    *,
    image_column: str = "image",
    caption_column: str = "text",
    plan_column: str | None = None,
    resolution: int = 64,
    center_crop: bool = False,
    heldout_fraction: float = 0.0,
    planner=None,
    planner_key: str | None = None,
    spec: PlanSpec | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the prepared data set of ``source`` to ``out`` (atomically) and return ``out``.

    Without ``plan_column``, ``planner`` (a `planner.Planner`) writes the plans, cached under
    ``out/../.plans-<planner_key>-<name>.jsonl`` (``planner_key``: e.g. `folder_fingerprint` of its folder).
    ``heldout_fraction`` of the rows (seeded) get ``split = heldout``.
    """
    if resolution < 8:
        raise DataPrepError(f"resolution must be >= 8, got {resolution}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise DataPrepError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    ds = read_source(source)
    _check_columns(ds, source, {"image": image_column, "caption": caption_column, "plan": plan_column})
    if isinstance(ds.features[image_column], datasets.Image):  # decode row by row, so errors can name the row
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    if len(ds) == 0:
        raise DataPrepError(f"data source {source} has no rows")
    captions = _captions(ds, caption_column, source)
    if plan_column is not None:
        plans = _given_plans(ds, plan_column, source, spec)
    elif planner is None:
        raise DataPrepError(f"data source {source} has no plan column: give one, or a planner to write the plans")
    else:
        out = Path(out)
        cache = out.parent / f".plans-{planner_key or 'planner'}-{out.name}.jsonl"
        plans = written_plans(captions, planner, cache, batch_size, progress)
    rng = np.random.default_rng(seed)
    heldout = rng.random(len(ds)) < heldout_fraction

    def rows():  # one image decoded and resized at a time: the source's images never sit in RAM together
        for i in tqdm(range(len(ds)), desc="resizing images", disable=not progress):
            img = decode_image(ds[i][image_column], f"data source {source}, row {i}, column {image_column!r}")
            img = square_image(img, resolution, center_crop, np.random.default_rng([seed, i]))
            yield img, captions[i], plans[i], "heldout" if heldout[i] else "train"

    return _write(out, rows())


def _write(out: str | Path, rows) -> Path:
    """Stream ``rows`` of (image array, prompt, plan, split) into an Arrow file beside ``out``, then save it as
    the prepared ``datasets`` folder ``out`` (atomically); memory stays at one row plus Arrow's write batch."""
    features = datasets.Features(
        {"image": datasets.Image(), **{c: datasets.Value("string") for c in PREPARED_COLUMNS[1:]}}
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-rows-") as scratch:
        arrow = str(Path(scratch) / "rows.arrow")
        with ArrowWriter(features=features, path=arrow, writer_batch_size=256) as writer:
            for image, prompt, plan, split in rows:
                example = {"image": Image.fromarray(image), "prompt": prompt, "plan": plan, "split": split}
                writer.write(features.encode_example(example))
            writer.finalize()
        ds = datasets.Dataset.from_file(arrow)
        with atomic_dir(out) as tmp:
            ds.save_to_disk(str(tmp))
        del ds  # release the memory map before the scratch folder goes
    return out

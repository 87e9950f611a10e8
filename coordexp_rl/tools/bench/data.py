"""Data pipeline at COCO size: `coordexp-rl bench data [--images 118287 --boxes 860001]`.

Writes a COCO-sized ``instances_train2017.json`` (fake image entries of 640x480 and random boxes, ~1 %
crowd; the real train2017 has 118,287 images and ~860k boxes) plus an image folder whose files are
hard links to a few real 640x480 JPEGs (so ``validate`` really opens 118k files, from the page cache: a
lower bound for shared storage). Then, each step in its own forked process, it measures wall time and
peak resident memory of:

  convert              instances JSON -> contract JSONL (`coordexp-rl convert coco`)
  validate_images      `coordexp-rl validate` with the image checks (exists, opens, size)
  load_images          loader with the image checks (what every start-up did before)
  load_no_images       loader with image checks off: paths still resolved and kept inside the root
                       (the learner ranks; the driver too with data.check_images=false)

and prints one JSON object: per step wall and CPU seconds and peak RSS, and ``load_speedup`` =
load_images / load_no_images (wall; ``load_speedup_cpu`` the same in CPU seconds).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

WIDTH, HEIGHT = 640, 480


def make_instances(n_images: int, n_boxes: int, seed: int = 0) -> dict:
    """A COCO instances dict: ``n_images`` entries, ``n_boxes`` random boxes spread over them, 80 names."""
    rng = random.Random(seed)
    images = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": WIDTH, "height": HEIGHT}
              for i in range(n_images)]
    categories = [{"id": k + 1, "name": f"category {k + 1}"} for k in range(80)]
    annotations = []
    for a in range(n_boxes):
        w, h = rng.uniform(4, WIDTH / 2), rng.uniform(4, HEIGHT / 2)
        x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
        annotations.append({"id": a + 1, "image_id": rng.randint(1, n_images), "category_id": rng.randint(1, 80),
                            "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)], "area": w * h,
                            "iscrowd": int(rng.random() < 0.01)})
    return {"images": images, "annotations": annotations, "categories": categories}


def make_image_folder(folder: Path, n_images: int, links_per_file: int = 60_000) -> None:
    """``n_images`` hard links to real JPEGs, a new source file every ``links_per_file`` (ext4 allows 65,000
    links per file); a copy each would cost 118k x ~10 kB of disk."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        if i % links_per_file == 0:
            source = folder.parent / f"source-{i // links_per_file}.jpg"
            Image.new("RGB", (WIDTH, HEIGHT), (120, 80, 40)).save(source, quality=80)
        os.link(source, folder / f"{i + 1:012d}.jpg")


def _convert(ann: Path, out: Path) -> dict:
    from coordexp_rl.data.convert import coco_records, write_jsonl

    records = coco_records(json.loads(ann.read_text(encoding="utf-8")))
    write_jsonl(records, out)
    return {"records": len(records), "objects": sum(len(r["objects"]) for r in records)}


def _validate(jsonl: Path, root: Path, check_images: bool) -> dict:
    from coordexp_rl.data.validate import check_file

    checked = check_file(jsonl, root, check_images=check_images)
    return {"records": len(checked.records), "problems": len(checked.problems)}


def _load(jsonl: Path, root: Path, check_images: bool) -> dict:
    from coordexp_rl.data.loader import load_samples

    samples = load_samples(jsonl, root, check_images=check_images)
    return {"samples": len(samples), "objects": sum(len(s.objects) for s in samples)}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(fn, args, conn) -> None:
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    result = fn(*args)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    # CPU seconds too: on a shared machine wall time includes waiting for the cores.
    conn.send({"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "peak_rss_mb": round(peak / 1024),
               "start_rss_mb": round(start_rss / 1024), **result})
    conn.close()


def measure(fn, *args) -> dict:
    """Run ``fn(*args)`` in a forked process: its time and peak RSS, not inflated by earlier steps."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, args, child))
    proc.start()
    result = parent.recv()
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"{fn.__name__} failed with exit code {proc.exitcode}")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=118_287, help="image entries (COCO train2017: 118,287)")
    parser.add_argument("--boxes", type=int, default=860_001, help="boxes (COCO train2017: 860,001)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    work = args.dir or Path(tempfile.mkdtemp(prefix="coordexp-bench-data-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        ann, jsonl, root = work / "instances_train2017.json", work / "train2017.jsonl", work / "train2017"
        t0 = time.perf_counter()
        ann.write_text(json.dumps(make_instances(args.images, args.boxes, args.seed)))
        make_image_folder(root, args.images)
        out = {"images": args.images, "boxes": args.boxes, "instances_mb": round(ann.stat().st_size / 2**20),
               "setup_seconds": round(time.perf_counter() - t0, 1), "cpus": os.cpu_count()}
        out["convert"] = measure(_convert, ann, jsonl)
        out["jsonl_mb"] = round(jsonl.stat().st_size / 2**20)
        out["validate_images"] = measure(_validate, jsonl, root, True)
        out["load_images"] = measure(_load, jsonl, root, True)
        out["load_no_images"] = measure(_load, jsonl, root, False)
        out["load_speedup"] = round(out["load_images"]["seconds"] / out["load_no_images"]["seconds"], 2)
        out["load_speedup_cpu"] = round(out["load_images"]["cpu_seconds"] / out["load_no_images"]["cpu_seconds"], 2)
        print(json.dumps(out, indent=2))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0

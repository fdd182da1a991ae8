"""Measure the image-quality score (`fundus_lab.preprocess.image_quality`'s sharpness) on folders of real fundus
photos and record, per folder, its distribution and how many photos each `--min-quality` threshold rejects.

Only numbers are written (no photo, no file name). Usage:
`python tools/measure_gradability.py --data $FUNDUS_DATA --out nbs/results/gradability.json`, where the data folder
holds `eye4_dev/` and `odir_dev/preprocessed_images/`.
"""
import argparse, json, os
from pathlib import Path

import numpy as np

from fundus_lab.core import IMAGE_EXTENSIONS, atomic_write
from fundus_lab.data import read_rgb
from fundus_lab.preprocess import RECOMMENDED_MIN_QUALITY, image_quality

SETS = {"eye4_dev": "eye4_dev", "odir_dev": "odir_dev/preprocessed_images"}
THRESHOLDS = (3, 5, 6, 7, 8, 10, 15, 20)
PERCENTILES = (1, 2, 5, 10, 25, 50)


def measure(folder:Path) -> dict:
    "Distribution of the quality score and photo sizes of every image under `folder`, and the count below each threshold."
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files: raise SystemExit(f"No images under {folder}.")
    scores, sides, no_field = [], [], 0
    for path in files:
        photo = read_rgb(path)
        report = image_quality(photo)
        no_field += not report.field_found
        scores.append(report.sharpness); sides.append(min(photo.shape[:2]))
    scores = np.array(scores)
    return {"n_photos": len(files), "photo_short_side": {"min": int(min(sides)), "median": float(np.median(sides)), "max": int(max(sides))},
            "no_field": no_field, "score_percentiles": {str(q): round(float(np.percentile(scores, q)), 3) for q in PERCENTILES},
            "rejected_below": {str(t): int((scores < t).sum()) for t in THRESHOLDS},
            "rejected_at_recommended": int((scores < RECOMMENDED_MIN_QUALITY).sum())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("FUNDUS_DATA"), help="folder of the photo sets (default: $FUNDUS_DATA)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args()
    if args.data is None: raise SystemExit("Pass --data or set FUNDUS_DATA.")
    result = {"score": "image_quality sharpness (field resized to 512 px)", "recommended_min_quality": RECOMMENDED_MIN_QUALITY,
              "sets": {name: measure(Path(args.data)/sub) for name, sub in SETS.items()}}
    with atomic_write(args.out, "w") as f: f.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__": main()

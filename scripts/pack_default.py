"""Copy a trained pipeline and classifier into the package as the shipped default (float16 storage).

python scripts/pack_default.py RUNS_DIR [--cfg 2.0]
"""

import argparse
import dataclasses
import shutil
from pathlib import Path

import torch

from argen.pipeline import ASSETS, ARPipeline
from argen.pretrained import load_pretrained


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs")
    p.add_argument("--cfg", type=float, default=2.0, help="default guidance scale of the shipped pipeline")
    args = p.parse_args()
    runs = Path(args.runs)
    pipe = ARPipeline.from_pretrained(runs / "gen" / "pipeline")
    pipe.sampler = dataclasses.replace(pipe.sampler, cfg_scale=args.cfg)
    for name in ("raster-mnist", "mnist-classifier"):
        shutil.rmtree(ASSETS / name, ignore_errors=True)
    pipe.save_pretrained(ASSETS / "raster-mnist", dtype=torch.float16)
    load_pretrained(runs / "classifier" / "final").save_pretrained(ASSETS / "mnist-classifier", dtype=torch.float16)
    print(f"packed into {ASSETS}")


if __name__ == "__main__":
    main()

"""Copy a trained pipeline (and optionally a classifier) into the package as a shipped model, float16 storage.

python scripts/pack_default.py --pipeline RUN/gen/pipeline --name raster-mnist --cfg 2.0 \
    [--classifier RUN/classifier/final]
"""

import argparse
import json
import shutil
from pathlib import Path

import torch

from argen.pipeline import ASSETS, ARPipeline
from argen.pretrained import load_pretrained


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pipeline", required=True)
    p.add_argument("--name", required=True, help="folder name under argen/assets")
    p.add_argument("--cfg", type=float, required=True, help="default guidance scale of the shipped pipeline")
    p.add_argument("--classifier", default=None, help="also ship this classifier as mnist-classifier")
    p.add_argument("--draft", default=None, help="a small generator folder: the drafter of speculative='draft'")
    p.add_argument("--guide", default=None, help="a weaker generator folder of the same order: autoguidance's guide")
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=V", help="another sampler default (JSON value)"
    )
    args = p.parse_args()
    pipe = ARPipeline.from_pretrained(Path(args.pipeline))
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    pipe.sampler = pipe.sampler.with_overrides(cfg_scale=args.cfg, **extra)
    pipe.config()  # the defaults must fit the order
    if args.draft:
        pipe.draft = load_pretrained(args.draft)
    if args.guide:  # through the constructor: it checks the guide against the generator and binds the tokenizer
        guide = load_pretrained(args.guide)
        pipe = ARPipeline(pipe.tokenizer, pipe.generator, pipe.class_names, pipe.sampler, pipe.draft, guide)
    shutil.rmtree(ASSETS / args.name, ignore_errors=True)
    pipe.save_pretrained(ASSETS / args.name, dtype=torch.float16)
    if args.classifier:
        shutil.rmtree(ASSETS / "mnist-classifier", ignore_errors=True)
        load_pretrained(args.classifier).save_pretrained(ASSETS / "mnist-classifier", dtype=torch.float16)
    print(f"packed {args.pipeline} into {ASSETS / args.name}")


if __name__ == "__main__":
    main()

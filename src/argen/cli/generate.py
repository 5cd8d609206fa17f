"""`argen sample` and `argen edit`: making images."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from argen.cli.common import (
    DTYPES,
    check_for_model,
    check_image_count,
    classifier_path,
    compile_if_asked,
    sampler_overrides,
)
from argen.errors import ConfigError
from argen.storage import save_image, save_npz


def cmd_sample(args: argparse.Namespace) -> None:
    from argen.data.images import grid
    from argen.pipeline import ARPipeline

    if args.progressive and Path(args.out).suffix.lower() == ".npz":
        raise ConfigError("--progressive writes an image strip: give --out an image name such as scales.png")
    overrides = sampler_overrides(args)
    pipe = ARPipeline.from_pretrained(args.model, device=args.device or "cpu", torch_dtype=DTYPES[args.dtype])
    check_for_model(pipe, overrides)
    compile_if_asked(pipe, args)
    classes = args.labels.split(",") if args.labels else list(range(pipe.generator.num_classes))
    total = check_image_count(len(classes), args.n)
    labels = pipe.label_ids([c.strip() if isinstance(c, str) else c for c in classes]).repeat_interleave(args.n)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(f"sampling {total:,} images: {len(classes)} label(s) x {args.n} per label (-n)", flush=True)
    if args.progressive:
        frames = list(pipe.progressive(labels, seed=args.seed, **overrides))  # each (N, C, H, W)
        strip = torch.stack(frames, dim=1).flatten(0, 1)  # (N * steps, C, H, W): a row per image
        save_image(grid(strip, rows=len(labels)), args.out)
        print(f"wrote {len(frames)} previews (coarse to fine) of {len(labels)} images to {args.out}")
        return
    t0 = time.perf_counter()
    out = pipe(labels, seed=args.seed, batch_size=args.batch_size, output_type="pt", progress=True, **overrides)
    seconds = time.perf_counter() - t0
    path = Path(args.out)
    if path.suffix.lower() == ".npz":
        from argen.data.images import to_uint8

        save_npz(path, images=to_uint8(out.images), labels=out.labels.numpy().astype(np.int64))
    else:
        save_image(grid(out.images, rows=len(classes)), path)  # atomic: a full disk leaves no 0-byte file
    print(
        f"wrote {len(labels)} images ({len(classes)} classes x {args.n}) to {path} "
        f"in {seconds:.1f} s ({seconds / len(labels):.3f} s/image)"
    )
    if args.classifier:
        from argen.eval.classifier import accuracy
        from argen.pretrained import load_pretrained

        clf_path = classifier_path(args.classifier)
        acc = accuracy(load_pretrained(clf_path), out.images, out.labels)
        print(f"class accuracy under {clf_path}: {acc:.4f}")


def cmd_edit(args: argparse.Namespace) -> None:
    from argen.data.datasets import load_dataset
    from argen.data.images import grid, load_image, to_tensor
    from argen.pipeline import ARPipeline

    overrides = sampler_overrides(args)
    check_image_count(1, args.n, what="variants")
    pipe = ARPipeline.from_pretrained(args.model, device=args.device or "cpu", torch_dtype=DTYPES[args.dtype])
    check_for_model(pipe, overrides)
    size, channels = pipe.tokenizer.config.image_size, pipe.tokenizer.config.image_channels
    if args.digit is not None:
        test = load_dataset("mnist:test", size, channels)
        if not 0 <= args.digit < len(test):
            raise ConfigError(f"--digit {args.digit} is out of range: mnist:test has digits 0..{len(test) - 1}")
        image, own = test[args.digit]
        label = args.label if args.label is not None else str(int(own))
    else:
        image = to_tensor(load_image(args.image, channels, size))
        if args.label is None:
            raise ConfigError("--label is required with --image")
        label = args.label
    try:
        x0, y0, x1, y1 = (int(v) for v in args.box.split(","))
    except ValueError as e:
        raise ConfigError(f"--box must be x0,y0,x1,y1 integers, got {args.box!r}") from e
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise ConfigError(f"--box {args.box} must lie inside the {size}x{size} image with x0 < x1 and y0 < y1")
    regenerate = torch.zeros(1, 1, size, size, dtype=torch.bool)
    regenerate[..., y0:y1, x0:x1] = True
    keep = ~regenerate if not args.outpaint else regenerate
    images = image[None].expand(args.n, -1, -1, -1)
    out = pipe.edit(
        images,
        keep.expand(args.n, -1, -1, -1),
        [label] * args.n,
        seed=args.seed,
        output_type="pt",
        **overrides,
    )
    masked = torch.where(keep[0], image, torch.full_like(image, -0.3))  # the hole shown in grey
    save_image(grid(torch.cat([image[None], masked[None], out.images]), rows=1), args.out)
    print(f"wrote source, kept region and {args.n} edits (class {label}) to {args.out}")

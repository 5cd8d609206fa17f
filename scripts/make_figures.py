"""Render the README's pictures from the shipped models: docs/samples.png, docs/orders.png, docs/edit.png,
docs/progressive.png.

python scripts/make_figures.py
"""

from pathlib import Path

import torch
from PIL import Image

from argen.data.datasets import load_dataset
from argen.data.images import grid
from argen.pipeline import ARPipeline

DOCS = Path(__file__).resolve().parents[1] / "docs"


def enlarge(image: Image.Image, factor: int = 3) -> Image.Image:
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    raster = ARPipeline.from_pretrained("raster")
    labels = torch.arange(10).repeat_interleave(10)
    enlarge(grid(raster(labels, seed=0, output_type="pt").images, rows=10)).save(DOCS / "samples.png")

    # Every shipped order at its own defaults, the same seed: one row per order, two of each class.
    orders = ["raster", "next-scale", "masked", "random-order", "mar"]
    two_each = torch.arange(10).repeat_interleave(2)
    rows = [ARPipeline.from_pretrained(name)(two_each, seed=0, output_type="pt").images for name in orders]
    enlarge(grid(torch.cat(rows), rows=len(orders))).save(DOCS / "orders.png")

    # Editing real held-out digits with the next-scale model: rows = in-painting (centre), out-painting (keep
    # the centre), class-conditional editing (bottom half becomes another class); columns = source, kept
    # region, four edits.
    pipe = ARPipeline.from_pretrained("next-scale")
    test = load_dataset("mnist:test", 28)
    rows = []
    for index, region, outside, label in [
        (3, (6, 6, 22, 22), False, None),
        (120, (7, 7, 21, 21), True, None),
        (250, (0, 14, 28, 28), False, "7"),
    ]:
        image, own = test[index]
        box = torch.zeros(1, 1, 28, 28, dtype=torch.bool)
        x0, y0, x1, y1 = region
        box[..., y0:y1, x0:x1] = True
        keep = box if outside else ~box
        target = label if label is not None else str(int(own))
        out = pipe.edit(
            image[None].expand(4, -1, -1, -1), keep.expand(4, -1, -1, -1), [target] * 4, seed=0, output_type="pt"
        )
        masked = torch.where(keep[0], image, torch.full_like(image, -0.3))
        rows.append(torch.cat([image[None], masked[None], out.images]))
    enlarge(grid(torch.cat(rows), rows=3)).save(DOCS / "edit.png")

    frames = list(pipe.progressive(list(range(10)), seed=1))  # each (10, C, H, W)
    enlarge(grid(torch.stack(frames, dim=1).flatten(0, 1), rows=10)).save(DOCS / "progressive.png")
    print(f"wrote figures to {DOCS}")


if __name__ == "__main__":
    main()

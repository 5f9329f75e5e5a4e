"""Write a dataset of random photographs with the datasets library, to time train_butterflies.py without the hub.

    python -m tools.synthetic_photos --out /path/to/photos                  # 1,000 JPEGs of 2000 x 1328 px
    python train_butterflies.py --hf-dataset /path/to/photos --image-size 64 ...

The Smithsonian butterflies subset of sheet 2, 2.5 holds 1,000 photographs of about 2000 x 1328 px; this makes as
many of that size (--count, --width, --height): smooth random colour fields with grain, JPEG-compressed like
photographs, in an 'image' column beside a 'name' column, saved with ``Dataset.save_to_disk``. Loading them costs
what loading the real photographs costs (decoding, making square, resizing); training on them what training on
the butterflies costs. Their content is noise: use them for timing, never for results.
"""
from __future__ import annotations

import argparse
import io
import os

import numpy as np
from PIL import Image

from lab.cli import OneLineParser, exit_on_error
from lab.image_data import datasets_library


def random_photograph(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random colour field (a 6 x 4 grid of random colours, resized bicubically) with grain, as a JPEG
    (quality 90)."""
    field = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    grain = rng.normal(0, 8, (height, width, 3))
    picture = Image.fromarray(np.clip(np.asarray(field) + grain, 0, 255).astype(np.uint8))
    encoded = io.BytesIO()
    picture.save(encoded, format="JPEG", quality=90)
    return Image.open(io.BytesIO(encoded.getvalue()))


def write_photos(out: str, count: int, width: int, height: int, seed: int = 0) -> None:
    """Save ``count`` random photographs as a dataset in ``out`` (a folder that must not exist yet)."""
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; choose a new --out")
    if min(count, width, height) <= 0:
        raise ValueError(f"--count, --width and --height must be positive, got {count}, {width}, {height}")
    library = datasets_library()
    rng = np.random.default_rng(seed)
    features = library.Features({"name": library.Value("string"), "image": library.Image()})

    def rows():
        for index in range(count):
            yield {"name": f"photo {index}", "image": random_photograph(rng, width, height)}
    library.Dataset.from_generator(rows, features=features).save_to_disk(out)
    print(f"wrote {count} photographs of {width} x {height} px to {out}")


def main() -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the folder to write (must not exist)")
    parser.add_argument("--count", type=int, default=1000, help="photographs (default: 1000)")
    parser.add_argument("--width", type=int, default=2000, help="width in pixels (default: 2000)")
    parser.add_argument("--height", type=int, default=1328, help="height in pixels (default: 1328)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args()
    exit_on_error(write_photos, args.out, args.count, args.width, args.height, args.seed)


if __name__ == "__main__":
    main()

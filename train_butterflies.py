"""Train the unconditional DDPM on the Smithsonian butterflies (sheet 2, 2.5): ``python train_butterflies.py [flags]``.

The sheet loads the photographs with the datasets library, ``load_dataset("huggan/smithsonian_butterflies_subset",
cache_dir=..., split="train")`` (--hf-dataset, --cache-dir; or a dataset saved with save_to_disk, or --image-folder),
and recommends making them square and downsampling them. Each photograph is cropped (--square pad: padded) to a
square and resized once to --image-size (64 px by default; 128 as the sheet suggests). The butterflies have no
classes, so the run trains the unconditional model of the sheets' maths: every sample on the null class c = 0 of
classifier-free guidance (p_uncond = 1), sampled with w = 0 (train_config.BUTTERFLIES), into log_butterflies/.
Needs the datasets library: pip install -r requirements-butterflies.txt.
"""
from lab.cli import one_line_errors
from lab.train_config import BUTTERFLIES
from training import command_line_config, train

if __name__ == "__main__":
    with one_line_errors():        # bad input: one line on stderr and exit code 2
        train(command_line_config(BUTTERFLIES, description=__doc__.splitlines()[0]))

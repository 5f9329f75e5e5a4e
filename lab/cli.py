"""What every command-line tool here shares: one-line errors, the choice of device, and the flag groups.

Each flag is defined once, here. Its help text and default come from the TrainConfig field of the same name
(lab/train_config.py), so a tool and the training scripts always agree. Two kinds of parser use the groups:

- the training parser (``training_parser``): only the flags given land in the namespace (argparse.SUPPRESS),
  because they override the script's defaults or a resumed run's config;
- a tool's parser: every flag has its default (``tool_defaults``); the data flags default to None, which means
  "the checkpoint's own".
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

from ddpm import default_device
from lab.speed import CPU_SAMPLE_CHUNK, CUDA_SAMPLE_CHUNK
from lab.train_config import BUILT_IN, DEVICES, TrainConfig, field_choices, field_help, flag_fields

class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit code 2), like every other error here."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


class Flags:
    """Adds flags to one parser: with real defaults (a tool) or suppressed ones (the training parser)."""

    def __init__(self, parser: argparse.ArgumentParser, defaults: TrainConfig | None):
        self.parser, self.defaults = parser, defaults

    def add(self, name: str, *flags: str, default=None, help: str | None = None, **options) -> None:
        """``--name`` (and other spellings ``flags``) for the TrainConfig field ``name`` or a tool's own setting."""
        known = name in TrainConfig.__dataclass_fields__
        text = help or field_help(name)
        if known and "choices" not in options and field_choices(name):
            options["choices"] = field_choices(name)
        if self.defaults is not None and known:
            text += f" (default: {getattr(self.defaults, name)})"
            default = argparse.SUPPRESS
        self.parser.add_argument("--" + name.replace("_", "-"), *flags, dest=name, default=default, help=text,
                                 **options)

    def switch(self, name: str, help: str | None = None) -> None:
        """A boolean flag: --name and --no-name (Python 3.8 has no argparse.BooleanOptionalAction)."""
        flag = "--" + name.replace("_", "-")
        if self.defaults is None:
            self.parser.add_argument(flag, dest=name, action="store_true", help=help or field_help(name))
            return
        text = f"{help or field_help(name)} (default: {getattr(self.defaults, name)}; --no-{flag[2:]} turns it off)"
        group = self.parser.add_mutually_exclusive_group()
        group.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=text)
        group.add_argument("--no-" + flag[2:], dest=name, action="store_false", default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------------------------------------------
# Flag groups
# ----------------------------------------------------------------------------------------------------------------

def add_device_flag(flags: Flags) -> None:
    flags.add("device", default="auto")


def add_seed_flag(flags: Flags) -> None:
    flags.add("seed", type=int, default=0)


def add_data_flags(flags: Flags, data_root: bool = True) -> None:
    """--data-root (unless ``data_root`` is False: no built-in dataset), --image-folder, --cache-dir; a tool's
    default None means the checkpoint's own data."""
    if data_root:
        flags.add("data_root")
    flags.add("image_folder")
    flags.add("cache_dir")


def add_sampler_flags(flags: Flags) -> None:
    """--sampler, --steps (also --sample-steps), --eta, --spacing, --clip-denoised."""
    flags.add("sampler", default="ddpm")
    flags.add("sample_steps", "--steps", type=int, metavar="STEPS")
    flags.add("eta", type=float, default=0.0)
    flags.add("spacing", default="logsnr")
    flags.switch("clip_denoised")


def add_guidance_flag(flags: Flags, many: bool, default) -> None:
    """--guidance: several weights (a list, e.g. 0 1 3) or one."""
    if many:
        flags.add("guidance", type=float, nargs="+", metavar="W", default=default)
    else:
        flags.add("guidance", type=float, default=default, help=f"guidance weight w of S1 eq. 5 (default: {default})")


def add_checkpoint_flags(flags: Flags, required: bool = True, weights: bool = True,
                         help: str = "training checkpoint (model_ep*.pth)") -> None:
    """--checkpoint and, for a tool that uses the network, --weights (the EMA weights when the run kept them, or
    the raw trained ones)."""
    flags.parser.add_argument("--checkpoint", required=required, help=help)
    if weights:
        flags.parser.add_argument("--weights", choices=("ema", "raw"), default="ema",
                                  help="the checkpoint's EMA weights (when kept) or its raw trained ones "
                                       "(default: ema)")


def add_judging_flags(flags: Flags) -> None:
    """--n-per-class and --chunk-size of the tools that sample every class many times and judge the images."""
    flags.parser.add_argument("--n-per-class", type=int, nargs="+", default=[50], metavar="N",
                              help="generated images per class: one number for every guidance weight, or one per "
                                   "--guidance weight in its order, e.g. 100 50 50 (default: 50)")
    flags.parser.add_argument("--chunk-size", type=int, default=None,
                              help="images per sampling call (default: the fast path's for this machine: "
                                   f"{CPU_SAMPLE_CHUNK} on a CPU, {CUDA_SAMPLE_CHUNK} on CUDA)")


def add_compile_flag(flags: Flags) -> None:
    """--compile / --no-compile: torch.compile the U-Net always / never; with neither, the fast path's rule
    compiles where the run is long enough to repay it (lab/speed.py, docs/speed.md)."""
    group = flags.parser.add_mutually_exclusive_group()
    default = argparse.SUPPRESS if flags.defaults is not None else None
    group.add_argument("--compile", dest="compile", action="store_const", const=True, default=default,
                       help="torch.compile the U-Net, on CUDA with CUDA graphs (mode 'reduce-overhead'); default: "
                            "where this machine's rule says the run repays the tens of seconds of compiling")
    group.add_argument("--no-compile", dest="compile", action="store_const", const=False, default=default,
                       help="keep the U-Net eager")


def add_fast_path_flags(flags: Flags) -> None:
    """--no-fast and --compile/--no-compile for a tool that samples."""
    flags.parser.add_argument("--no-fast", dest="fast", action="store_false",
                              help="sample on the plain path (fp32, eager, 250 images per call) instead of this "
                                   "machine's fast path (lab/speed.py)")
    add_compile_flag(flags)


def data_flags(args: argparse.Namespace) -> dict:
    """The data flags given on a tool's command line (--data-root, --image-folder, --cache-dir) as TrainConfig
    fields; the ones not given are left out (the checkpoint's own apply)."""
    flags = {"data_root": args.data_root, "image_folder": args.image_folder, "cache_dir": args.cache_dir}
    return {name: value for name, value in flags.items() if value is not None}


def add_out_flag(flags: Flags, help: str, required: bool = True, default=None) -> None:
    flags.parser.add_argument("--out", required=required, default=default, help=help)


def add_count_flag(flags: Flags, help: str, default: int = 8) -> None:
    """--n: how many images (per class, or in a row)."""
    flags.parser.add_argument("--n", type=int, default=default, help=f"{help} (default: {default})")


def add_overwrite_flag(flags: Flags, help: str = "replace output files that exist (default: refuse)") -> None:
    flags.parser.add_argument("--overwrite", action="store_true", help=help)


def tool_flags(parser: argparse.ArgumentParser) -> Flags:
    """The flag groups of a tool's parser, with real defaults."""
    return Flags(parser, None)


def training_parser(defaults: TrainConfig, description: str) -> argparse.ArgumentParser:
    """A flag for every TrainConfig field marked as one of the script's dataset; only the flags given land in the
    namespace."""
    parser = OneLineParser(description=description, argument_default=argparse.SUPPRESS)
    flags = Flags(parser, defaults)
    groups = {"image_folder": lambda group: add_data_flags(group, defaults.dataset in BUILT_IN),
              "device": add_device_flag, "seed": add_seed_flag, "sampler": add_sampler_flags,
              "compile": add_compile_flag}
    grouped = {"data_root", "image_folder", "cache_dir", "device", "seed", "sampler", "sample_steps", "eta",
               "spacing", "clip_denoised"}
    for item in flag_fields(defaults.dataset):
        if item.name in groups:
            groups[item.name](flags)
        elif item.name == "guidance":
            add_guidance_flag(flags, many=True, default=None)
        elif item.name in grouped:
            continue
        elif isinstance(item.default, bool):
            flags.switch(item.name)
        else:
            kind = {"image_folder": str, "subset": int, "resume": str}.get(item.name, type(getattr(defaults, item.name)))
            flags.add(item.name, type=kind)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Running a command
# ----------------------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA, else MPS, else the CPU; an explicit device must be available."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        return default_device()
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available here (use --device auto or cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps was requested but MPS is not available here (use --device auto or cpu)")
    return torch.device(name)


def refuse_existing(path: str, overwrite: bool) -> None:
    """Refuse to replace an existing output file unless asked: committed results are evidence."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it, or choose another output name")


@contextlib.contextmanager
def one_line_errors():
    """Bad input (ValueError and its kinds: bad checkpoint, data, flag; OSError; a non-finite loss) inside the
    block ends the program with one line on stderr and exit code 2, not a traceback."""
    try:
        yield
    except (ValueError, OSError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def exit_on_error(command, *args) -> None:
    """Run command(*args) with ``one_line_errors``."""
    with one_line_errors():
        command(*args)

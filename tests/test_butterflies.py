"""Sheet 2, 2.5: the butterflies through the datasets library, on synthetic photographs the tests make.

The datasets library builds and saves the test datasets itself; the hub path runs unchanged except for the one
call that downloads (``datasets.load_dataset``), which returns the saved dataset instead. Without the library
(it is an extra: requirements-butterflies.txt) the tests that need it are skipped and say why.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import training
from ddpm import DDPM
from lab import image_data
from lab.generation import SamplingDDPM
from lab.checkpoints import load_checkpoint
from lab.cli import one_line_errors
from lab.image_data import make_square, square_image
from lab.train_config import BUTTERFLIES, HF_BUTTERFLIES
from networks.Conditional_UNet import UNet, count_trainable_parameters
from tools import sample, visualize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}     # the scripts' processes on one thread, as conftest's tests
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
# (width, height) of the synthetic photographs: landscape, portrait, square, odd differences, very long
SIZES = [(48, 16), (30, 44), (33, 33), (41, 20), (17, 60), (64, 23), (25, 26), (50, 31), (21, 34), (40, 40),
         (36, 13), (19, 45)]


def needs_datasets():
    return pytest.importorskip("datasets", reason="the datasets library is not installed (an extra for sheet 2, "
                                                  "2.5: pip install -r requirements-butterflies.txt)")


def three_stripes(width: int = 48, height: int = 16) -> Image.Image:
    """Red, green and blue vertical thirds."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    third = width // 3
    for index, colour in enumerate((RED, GREEN, BLUE)):
        array[:, index * third:(index + 1) * third] = colour
    return Image.fromarray(array)


def photographs(count: int = len(SIZES)) -> list:
    """Random pictures of mixed sizes and aspect ratios, the first the three stripes; one greyscale, one RGBA."""
    rng = np.random.default_rng(0)
    pictures = [three_stripes()]
    for width, height in SIZES[1:count]:
        pictures.append(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
    pictures[3] = pictures[3].convert("L")
    pictures[4] = pictures[4].convert("RGBA")
    return pictures


@pytest.fixture
def saved_dataset(tmp_path):
    """A dataset of the photographs with an image column among others, built and saved by the datasets library."""
    datasets = needs_datasets()
    pictures = photographs()
    features = datasets.Features({"name": datasets.Value("string"), "image": datasets.Image()})
    dataset = datasets.Dataset.from_dict({"name": [f"butterfly {i}" for i in range(len(pictures))],
                                         "image": pictures}, features=features)
    folder = tmp_path / "saved"
    dataset.save_to_disk(str(folder))
    return str(folder)


@pytest.fixture
def hub_from_disk(saved_dataset, monkeypatch):
    """Replaces the download of ``datasets.load_dataset`` (and only that call) by the saved dataset; records the
    calls' arguments."""
    datasets = needs_datasets()
    calls = []

    def load_dataset(name, cache_dir=None, split=None):
        calls.append({"name": name, "cache_dir": cache_dir, "split": split})
        return datasets.load_from_disk(saved_dataset)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


# ---- square and resize ----------------------------------------------------------------------------------------

def test_crop_keeps_the_centred_square():
    cropped = np.asarray(make_square(three_stripes(48, 16), "crop"))
    assert cropped.shape == (16, 16, 3)
    assert (cropped == GREEN).all()
    portrait = np.asarray(make_square(three_stripes(48, 16).transpose(Image.Transpose.ROTATE_90), "crop"))
    assert portrait.shape == (16, 16, 3) and (portrait == GREEN).all()


def test_pad_centres_the_whole_picture_on_black():
    padded = np.asarray(make_square(three_stripes(48, 16), "pad"))
    assert padded.shape == (48, 48, 3)
    assert (padded[:16] == 0).all() and (padded[32:] == 0).all()
    assert (padded[16:32, :16] == RED).all() and (padded[16:32, 16:32] == GREEN).all()
    assert (padded[16:32, 32:] == BLUE).all()


def test_odd_differences_cut_or_pad_the_extra_pixel_at_the_right_and_bottom():
    picture = Image.fromarray(np.arange(5 * 2, dtype=np.uint8).reshape(2, 5))        # 5 wide, 2 high
    assert np.asarray(make_square(picture, "crop")).tolist() == [[1, 2], [6, 7]]      # columns 1-2 of 0-4
    padded = np.asarray(make_square(picture, "pad"))
    assert padded.shape == (5, 5) and padded[1:3].tolist() == np.arange(10).reshape(2, 5).tolist()
    assert (padded[0] == 0).all() and (padded[3:] == 0).all()


def test_square_image_gives_uint8_channels_first_and_resizes_with_antialiasing():
    stripes = square_image(three_stripes(48, 16), 3, 16, "crop")
    assert stripes.dtype == torch.uint8 and stripes.shape == (3, 16, 16)
    assert (stripes.permute(1, 2, 0) == torch.tensor(GREEN, dtype=torch.uint8)).all()
    grey = square_image(three_stripes(48, 16), 1, 16, "crop")
    assert grey.shape == (1, 16, 16)
    # a 1-pixel checkerboard shrunk 8x: antialiasing averages it to mid-grey (skipping pixels would keep 0 or 255)
    checkerboard = Image.fromarray(((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8))
    small = square_image(checkerboard, 1, 8, "crop").float()
    assert (small - 127.5).abs().max() < 8


def test_bad_square_mode_is_refused():
    with pytest.raises(ValueError, match="--square"):
        make_square(three_stripes(), "stretch")


def test_the_unet_trains_at_64_and_128_px_and_only_the_first_decoder_grows():
    """decoder0's transposed convolution (kernel = stride = H/4) is the one layer whose size depends on H: its
    weight [2F, 2F, H/4, H/4] grows with H^2, every other parameter stays."""
    counts = {}
    for height in (32, 64, 128):
        network = UNet(3, 32, 1, height)
        counts[height] = count_trainable_parameters(network)
        with torch.no_grad():
            out = network.eval()(torch.randn(2, 3, height, height), torch.rand(2, 1, 1, 1), torch.zeros(2, 1))
        assert out.shape == (2, 3, height, height)
    for height in (64, 128):
        assert counts[height] - counts[32] == 64 * 64 * ((height // 4) ** 2 - 8 ** 2)
    assert count_trainable_parameters(UNet(3, 32, 10, 32)) == 717_955
    assert count_trainable_parameters(UNet(1, 32, 10, 28)) == 655_361


# ---- the datasets library -------------------------------------------------------------------------------------

def test_the_hub_path_loads_squares_resizes_and_caches(hub_from_disk, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    loaded = image_data.load_hf_dataset(HF_BUTTERFLIES, 3, 8, "crop", cache)
    assert hub_from_disk == [{"name": HF_BUTTERFLIES, "cache_dir": cache, "split": "train"}]   # the sheet's call
    assert loaded.images.shape == (len(SIZES), 3, 8, 8) and loaded.images.dtype == torch.uint8
    assert (loaded.labels == 0).all() and len(loaded.classes) == 1
    assert (loaded.images[0].permute(1, 2, 0) == torch.tensor(GREEN, dtype=torch.uint8)).all()   # the stripes
    for index, picture in enumerate(photographs()):
        assert torch.equal(loaded.images[index], square_image(picture, 3, 8, "crop")), index
    assert len(os.listdir(cache)) == 1

    def no_decoding(*args):
        raise AssertionError("decoded again instead of read from the cache")
    monkeypatch.setattr(image_data, "square_image", no_decoding)
    again = image_data.load_hf_dataset(HF_BUTTERFLIES, 3, 8, "crop", cache)
    assert torch.equal(again.images, loaded.images) and again.classes == loaded.classes
    with pytest.raises(AssertionError, match="decoded again"):             # other settings: another cache file
        image_data.load_hf_dataset(HF_BUTTERFLIES, 3, 8, "pad", cache)


def test_a_saved_dataset_loads_without_the_hub(saved_dataset, tmp_path, monkeypatch):
    datasets = needs_datasets()
    monkeypatch.setattr(datasets, "load_dataset", None)          # never called for a folder from save_to_disk
    padded = image_data.load_hf_dataset(saved_dataset, 3, 12, "pad", None)
    stripes = padded.images[0].permute(1, 2, 0).int()
    assert stripes[0].abs().max() < 10 and stripes[-1].abs().max() < 10             # black above and below
    for column, colour in ((1, RED), (6, GREEN), (10, BLUE)):
        assert (stripes[5:7, column] - torch.tensor(colour)).abs().max() < 40, column


def test_a_dataset_without_images_is_refused(tmp_path):
    datasets = needs_datasets()
    datasets.Dataset.from_dict({"name": ["a", "b"]}).save_to_disk(str(tmp_path / "words"))
    with pytest.raises(image_data.DataError, match="no image column"):
        image_data.load_hf_dataset(str(tmp_path / "words"), 3, 8, "crop", None)


# ---- train_butterflies.py end to end ---------------------------------------------------------------------------

def butterflies_argv(out, *extra):
    return ["--cache-dir", "", "--out", str(out), "--image-size", "8", "--epochs", "2", "--batch-size", "4",
            "--n-features", "8", "--timesteps", "10", "--n-sample", "10", "--eval-images", "2",
            "--eval-timesteps", "3", "--sample-every", "1", "--gif-every", "2", "--save-every", "1", "--device",
            "cpu", *extra]


def train_butterflies(argv):
    """What ``python train_butterflies.py ARGV`` does."""
    with one_line_errors():
        return training.train(training.command_line_config(BUTTERFLIES, "test", argv))


def test_train_butterflies_from_the_hub_writes_every_artifact_and_resumes(hub_from_disk, tmp_path, monkeypatch):
    seen = {"p_losses": [], "guided_noise": []}          # the class vectors of every loss and sampling step
    with monkeypatch.context() as recorders:
        for owner, name in ((DDPM, "p_losses"), (SamplingDDPM, "guided_noise")):
            def recording(self, *args, _original=getattr(owner, name), _name=name, **kwargs):
                seen[_name].append(args[2].detach().clone())
                return _original(self, *args, **kwargs)
            recorders.setattr(owner, name, recording)
        train_butterflies(butterflies_argv(tmp_path / "run"))
    assert hub_from_disk and hub_from_disk[0]["name"] == HF_BUTTERFLIES
    names = set(os.listdir(tmp_path / "run"))
    assert {"image_ep1_w0.0.png", "image_ep2_w0.0.png", "gif_ep2_w0.0.gif", "model_ep1.pth", "model_ep2.pth",
            "loss.csv", "loss.png"} <= names
    assert "gif_ep1_w0.0.gif" not in names
    grid = Image.open(tmp_path / "run" / "image_ep2_w0.0.png")
    assert grid.size == (10 * 10 + 2, 2 * 10 + 2)      # 10 generated above 10 real images, 8 px, padding 2
    assert Image.open(tmp_path / "run" / "gif_ep2_w0.0.gif").n_frames == 8
    checkpoint = load_checkpoint(str(tmp_path / "run" / "model_ep2.pth"))
    config = checkpoint["config"]
    assert (config["dataset"], config["n_classes"], config["image_size"], config["drop_prob"]) == \
        ("butterflies", 1, 8, 1.0)
    assert all(row["test_loss"] > 0 for row in checkpoint["losses"])
    # the unconditional model: training and test losses and the grids' sampling all use the null class c = 0 only
    assert len(seen["p_losses"]) == 2 * 3 + 2 * 3 and len(seen["guided_noise"]) == 2 * 10   # steps, T
    assert all(c.shape[1] == 1 and not c.any() for calls in seen.values() for c in calls)
    # tools.sample draws the unconditional model's images from the checkpoint; it has no classes to choose
    drawn = tmp_path / "drawn.png"
    sample.main(["--checkpoint", str(tmp_path / "run" / "model_ep2.pth"), "--n", "3", "--sampler", "ddim",
                 "--steps", "2", "--device", "cpu", "--out", str(drawn)])
    assert Image.open(drawn).size == (3 * 10 + 2, 10 + 2)
    with pytest.raises(SystemExit):
        sample.main(["--checkpoint", str(tmp_path / "run" / "model_ep2.pth"), "--classes", "0", "--out",
                     str(tmp_path / "classes.png")])
    visualize.main(["forward", "--checkpoint", str(tmp_path / "run" / "model_ep2.pth"), "--out",
                    str(tmp_path / "forward.png")])                      # a photograph of the run, diffused
    assert (tmp_path / "forward.png").stat().st_size > 0
    settings = ["--sample-every", "5", "--gif-every", "5", "--eval-every", "0"]
    train_butterflies(butterflies_argv(tmp_path / "straight", *settings, "--epochs", "3"))
    train_butterflies(butterflies_argv(tmp_path / "resumed", *settings, "--epochs", "2"))
    train_butterflies(butterflies_argv(tmp_path / "resumed", *settings, "--epochs", "3", "--resume", "auto"))
    straight = load_checkpoint(str(tmp_path / "straight" / "model_ep3.pth"))
    resumed = load_checkpoint(str(tmp_path / "resumed" / "model_ep3.pth"))
    for key in ("model", "ema"):
        for name, value in straight[key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")


def test_train_butterflies_from_a_saved_dataset_and_from_an_image_folder(saved_dataset, tmp_path):
    """The command line itself, in a fresh process: --hf-dataset with a folder from save_to_disk, and
    --image-folder with photographs in nested folders (no classes), then resumed for a second epoch."""
    folder = tmp_path / "photos"
    for index, picture in enumerate(photographs()):
        (folder / f"box{index % 3}").mkdir(parents=True, exist_ok=True)
        picture.convert("RGB").save(folder / f"box{index % 3}" / f"photo{index}.png")
    for source, out in ((["--hf-dataset", saved_dataset], "from_saved"), (["--image-folder", str(folder)], "folder")):
        command = [sys.executable, "train_butterflies.py", *source,
                   *butterflies_argv(tmp_path / out, "--epochs", "1", "--square", "pad")]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"training on {len(SIZES) - 1} images" in result.stdout        # one held out for the test loss
        assert {"image_ep1_w0.0.png", "gif_ep1_w0.0.gif", "model_ep1.pth"} <= set(os.listdir(tmp_path / out))
    resumed = subprocess.run(command + ["--epochs", "2", "--resume", "auto"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300, env=ONE_THREAD)              # the image folder's run goes on
    assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stderr[-2000:]
    assert load_checkpoint(str(tmp_path / "folder" / "model_ep2.pth"))["epoch"] == 2


# ---- bad input: one line, exit code 2 ---------------------------------------------------------------------------

def run_script(arguments, environment):
    """``python train_butterflies.py ARGUMENTS`` in a fresh process with ``environment``: (exit code, stderr)."""
    result = subprocess.run([sys.executable, "train_butterflies.py", *arguments], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**ONE_THREAD, **environment})
    return result.returncode, result.stderr.strip()


def test_offline_the_hub_dataset_fails_in_one_line_naming_the_alternatives(tmp_path):
    """The real download of the sheet's dataset, in a process where the library is offline (it reads the switch
    when imported)."""
    needs_datasets()
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code, error = run_script(["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")], offline)
    assert code == 2 and len(error.splitlines()) == 1, error
    assert HF_BUTTERFLIES in error and "--hf-dataset" in error and "--image-folder" in error
    assert not (tmp_path / "out").exists()


def one_line_error(argv, capsys):
    """The one line on stderr of ``train_butterflies.py ARGV`` that exits with code 2."""
    with pytest.raises(SystemExit) as exit_info:
        train_butterflies(argv)
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(error.splitlines()) == 1, error
    return error


def test_without_the_datasets_library_one_line_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)                   # makes `import datasets` fail
    error = one_line_error(["--cache-dir", "", "--out", str(tmp_path / "out")], capsys)
    assert "datasets library" in error and "pip install -r requirements-butterflies.txt" in error


@pytest.mark.parametrize("extra, fragment", [
    (["--image-size", "30"], "--image-size must be a multiple of 4"),
    (["--guidance", "0", "3"], "--guidance must be 0 for an unconditional model"),
    (["--square", "stretch"], "invalid choice"),
    (["--data-root", "data"], "unrecognized arguments"),
])
def test_bad_settings_are_refused_in_one_line(tmp_path, capsys, extra, fragment):
    (tmp_path / "photos").mkdir()
    three_stripes().save(tmp_path / "photos" / "stripes.png")
    error = one_line_error(["--image-folder", str(tmp_path / "photos"), "--out", str(tmp_path / "out"), *extra],
                           capsys)
    assert fragment in error
    assert not (tmp_path / "out").exists()


def test_an_image_folder_without_images_is_refused(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(image_data.DataError, match="holds no images"):
        image_data.load_unlabelled_folder(str(tmp_path / "empty"), 3, 8, "crop")


def test_synthetic_photos_load_like_the_butterflies(tmp_path):
    """tools.synthetic_photos (the timing data of docs/reference.md) writes what load_hf_dataset reads."""
    needs_datasets()
    from tools.synthetic_photos import write_photos
    write_photos(str(tmp_path / "photos"), count=3, width=30, height=20)
    loaded = image_data.load_hf_dataset(str(tmp_path / "photos"), 3, 8, "crop", None)
    assert loaded.images.shape == (3, 3, 8, 8) and loaded.images.float().std() > 0
    with pytest.raises(FileExistsError):
        write_photos(str(tmp_path / "photos"), count=3, width=30, height=20)

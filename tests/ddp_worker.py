"""Run by tests/test_distributed.py (and tests/test_gpu.py) under torchrun: train a tiny model, then save this
rank's parameters. Arguments: IMAGE_FOLDER OUT [DEVICE [compile]] (device: cpu unless given).

BatchNorm running statistics are left out: DDP broadcasts rank 0's before every forward pass, so they differ
by the last step's update only, and rank 0's are the ones saved in checkpoints."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

from train_mnist import MNIST  # noqa: E402
from training import resolve_config, train  # noqa: E402

image_folder, out = sys.argv[1], sys.argv[2]
device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
config = resolve_config(MNIST, dict(image_folder=image_folder, cache_dir="", out=out, epochs=2, batch_size=8,
                                    n_features=8, timesteps=10, guidance=[1.0], n_sample=1, sample_every=2,
                                    gif_every=2, save_every=1, eval_images=10, eval_timesteps=2, device=device,
                                    compile="compile" in sys.argv[4:]))
model = train(config)
print(f"process group backend: {torch.distributed.get_backend()}")
torch.save(dict(model.nn_model.named_parameters()), os.path.join(out + "_weights", f"rank{os.environ['RANK']}.pt"))

"""Train the conditional DDPM on MNIST (sheet 1, task 3): ``python train_mnist.py [flags]``, ``--help`` lists them.

The sheet's settings (train_config.MNIST): Adam with a constant learning rate, T = 400, beta_1 = 1e-4,
beta_T = 0.02, p_uncond = 0.1, guidance weights w in {0, 1, 3}, 4 samples per class, grids, GIFs and
checkpoints every 5 epochs, into log_mnist/.
"""
from lab.cli import one_line_errors
from lab.train_config import MNIST
from training import command_line_config, train

if __name__ == "__main__":
    with one_line_errors():        # bad input: one line on stderr and exit code 2
        train(command_line_config(MNIST, description=__doc__.splitlines()[0]))

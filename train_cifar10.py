"""Train the conditional DDPM on CIFAR-10 (sheet 1, task 4): ``python train_cifar10.py [flags]``, ``--help`` lists them.

The sheet's settings (train_config.CIFAR10): Adam with a constant learning rate, T = 400, beta_1 = 1e-4,
beta_T = 0.02, p_uncond = 0.1, guidance weights w in {1, 3}, 4 samples per class, grids every 10 and GIFs every
20 epochs, into log_cifar10/. Random horizontal flips are on (--no-flip turns them off).
"""
from lab.cli import one_line_errors
from lab.train_config import CIFAR10
from training import command_line_config, train

if __name__ == "__main__":
    with one_line_errors():        # bad input: one line on stderr and exit code 2
        train(command_line_config(CIFAR10, description=__doc__.splitlines()[0]))

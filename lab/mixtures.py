"""Guidance towards a mixture of classes (composed guidance): beyond the sheets. Sheet 1, question 5 asks how one
could guide the model towards a mixture of two or more classes (answers.txt answers it); ``tools.sample`` samples
such mixtures through ``lab.generation.SamplingDDPM``.

Not handed out: with one class the composed guidance is eq. 5 itself, the students' own task, so the handout has
a stub in place of this file (staff/handout.py).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ddpm import DDPM, classifier_free_guidance


def composed_guidance(conditionals: torch.Tensor, unconditional: torch.Tensor | float, w: float,
                      proportions: Sequence[float]) -> torch.Tensor:
    """Guidance towards a mixture sum_k p_k c_k: eq. 5 per class, averaged with the proportions p_k (sum 1).

    sum_k p_k ((1 + w) eps(c_k) - w eps(0)) = eps(0) + (1 + w) sum_k p_k (eps(c_k) - eps(0)), the composed
    guidance of Liu et al. (2022). conditionals [K, N, C, H, W]; returns [N, C, H, W]. K = 1, p = (1,) is eq. 5.
    """
    return sum(p * classifier_free_guidance(conditional, unconditional, w)
               for p, conditional in zip(proportions, conditionals))


def composed_noise(ddpm: DDPM, y_t: torch.Tensor, t: int, conditions: torch.Tensor, w: float,
                   proportions: Sequence[float]) -> torch.Tensor:
    """Composed guidance for conditions [K, N, n_classes] with K ``proportions``: the K conditional copies of y_t
    and (for w != 0) the unconditional one in one network call (``ddpm.noise_of_copies``). Returns
    [N, C, H, W]."""
    n_conditions, n = conditions.shape[:2]
    if len(proportions) != n_conditions:
        raise ValueError(f"need one proportion per condition: {n_conditions} conditions, "
                         f"got {len(proportions)} proportions")
    if y_t.shape[0] != n:
        raise ValueError(f"conditions must hold one class vector per image: {y_t.shape[0]} images, got "
                         f"conditions of shape {list(conditions.shape)}")
    classes = conditions.reshape(n_conditions * n, -1)
    if w != 0:
        classes = torch.cat((classes, torch.zeros(n, classes.shape[-1], device=classes.device)))
    noise = ddpm.noise_of_copies(y_t, t, classes).float().view(-1, *y_t.shape)
    unconditional = noise[n_conditions] if w != 0 else 0.0
    return composed_guidance(noise[:n_conditions], unconditional, w, proportions)

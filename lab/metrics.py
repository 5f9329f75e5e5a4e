"""Sample-quality metrics on a judge's features: class accuracy, Frechet distance, diversity (pure maths)."""
from __future__ import annotations

import math

import numpy as np
import torch


def class_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose predicted class [N] equals the class [N] they belong to or were conditioned on."""
    return (predicted == labels).double().mean().item()


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    features = features.double()
    return features.mean(dim=0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


def symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix [D, D] by eigen decomposition (negative round-off
    eigenvalues are clipped to 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance_from_statistics(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor,
                                     cov_b: torch.Tensor) -> float:
    """Frechet distance of N(mean_a, cov_a) and N(mean_b, cov_b): means [D], covariances [D, D].

    ||mean_a - mean_b||^2 + tr(cov_a + cov_b - 2 (cov_a cov_b)^(1/2)), where tr (cov_a cov_b)^(1/2) is computed as
    tr (S cov_b S)^(1/2) with S = cov_a^(1/2): the same eigenvalues, but of a symmetric matrix.
    """
    mean_a, cov_a, mean_b, cov_b = (x.double() for x in (mean_a, cov_a, mean_b, cov_b))
    root_a = symmetric_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(distance.item(), 0.0)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] and [M, D] (N, M >= 2)."""
    return frechet_distance_from_statistics(*feature_statistics(features_a), *feature_statistics(features_b))


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over all pairs of distinct rows of features [N, D] (N >= 2)."""
    n = features.shape[0]
    distances = torch.cdist(features.double(), features.double())
    return (distances.sum() / (n * (n - 1))).item()


def diversity(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise feature distance among images of the same class, averaged over the classes with >= 2 images.

    features [N, D], labels [N]. 0 when all images of each class have the same features; nan when no class has two.
    """
    per_class = [mean_pairwise_distance(features[labels == label]) for label in labels.unique()
                 if (labels == label).sum() >= 2]
    return float(np.mean(per_class)) if per_class else math.nan


def noise_floor_split(n_real: int, n_generated: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint random index sets into the real images: one of min(n_generated, n_real // 2), the rest.

    Their Frechet distance is what a perfect generator would score with as many images as were generated.
    """
    order = torch.randperm(n_real, generator=torch.Generator().manual_seed(seed))
    size = max(2, min(n_generated, n_real // 2))
    return order[:size], order[size:]

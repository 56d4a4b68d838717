"""Student's t, mapped to a standard normal deviate with the same tail probability: how the unknown scores'
z-scores (pipeline/evaluation/unknown.py) stay N(0, 1) on known clips whatever the number of support clips,
in closed form (numpy), accurate far in the tails so that far-off queries keep their order.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def t_cdf(t: np.ndarray, dof: np.ndarray) -> np.ndarray:
    """Student's t CDF for whole degrees of freedom (the closed-form series in cos of atan(t / sqrt(dof)))."""
    t, dof = np.broadcast_arrays(np.asarray(t, dtype=np.float64), np.maximum(np.rint(dof), 1).astype(np.int64))
    if t.size == 0:
        return np.zeros(t.shape)
    theta = np.arctan(t / np.sqrt(dof))
    c2 = np.cos(theta) ** 2
    odd = dof % 2 == 1
    term, total = np.ones_like(t), np.ones_like(t)
    for k in range(1, int(dof.max()) // 2 + 1):  # the series has (dof - 1) // 2 or dof // 2 - 1 terms
        term = term * c2 * np.where(odd, (2 * k) / (2 * k + 1), (2 * k - 1) / (2 * k))
        total = total + np.where(np.where(odd, 2 * k + 1 <= dof - 1, 2 * k <= dof - 2), term, 0.0)
    odd_a = np.where(dof > 1, theta + np.sin(theta) * np.cos(theta) * total, theta) * 2 / np.pi
    even_a = np.sin(theta) * total
    return np.clip(0.5 + 0.5 * np.where(odd, odd_a, even_a), 0.0, 1.0)


def t_tail_log(t_abs: np.ndarray, dof: np.ndarray) -> np.ndarray:
    """log P(T < -t_abs) for Student's t(dof), accurate far in the tail where 1 - CDF would cancel:
    0.5 I_x(dof/2, 1/2) with x = dof / (dof + t^2), as x^a (1-x)^b / (a B(a, b)) 2F1(a + b, 1; a + 1; x)."""
    a = np.maximum(np.rint(dof), 1) / 2
    x = a * 2 / (a * 2 + t_abs**2)
    gammaln = torch.special.gammaln
    log_beta = (gammaln(torch.from_numpy(a)) - gammaln(torch.from_numpy(a + 0.5))).numpy() + math.lgamma(0.5)
    term, total = np.ones_like(x), np.ones_like(x)
    for k in range(400):  # used where the tail is below 1e-6, so x is small and the series short
        term = term * (a + 0.5 + k) / (a + 1 + k) * x
        total = total + term
        if (term < 1e-17 * total).all():  # below half an ulp, and falling: later terms leave every sum unchanged
            break
    return np.log(0.5) + a * np.log(x) + 0.5 * np.log1p(-x) - np.log(a) - log_beta + np.log(total)


def gaussian(t: np.ndarray, dof: np.ndarray) -> np.ndarray:
    """The standard normal deviate with the same tail probability as t under Student's t(dof): strictly
    increasing in t, symmetric, finite for any finite t (the tails in log space, so far-off queries keep
    their order)."""
    t, dof = np.broadcast_arrays(np.asarray(t, dtype=np.float64), np.asarray(dof, dtype=np.float64))
    t_abs = np.abs(t)
    lower = t_cdf(-t_abs, dof)
    far = lower < 1e-6
    log_p = np.log(np.maximum(lower, 1e-300))
    if far.any():
        log_p[far] = t_tail_log(t_abs[far], dof[far])
    exact = torch.special.ndtri(torch.from_numpy(np.exp(np.maximum(log_p, -700.0)))).numpy()
    u = -2 * log_p  # beyond e^-700: log Phi(z) ~ -z^2 / 2 - log(-z) - log(2 pi) / 2, inverted
    asymptotic = -np.sqrt(np.maximum(u - np.log(np.maximum(u, 1.0)) - np.log(2 * np.pi), 0.0))
    z = np.where(log_p > -700, exact, asymptotic)
    return np.where(t < 0, z, -z)

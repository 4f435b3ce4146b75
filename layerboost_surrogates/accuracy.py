"""Accuracy predictors: the proxy quality (KL by default) of a plan, predicted from single-swap sensitivities
and corrected by the trials already evaluated.

Both predictors implement `Predictor` (fit / predict -> mean, variance) and expose their mean as `terms()`:
per-(layer, option) costs plus pairwise costs, which is exactly what the MILP front solver optimises.

Choice of space. KL is positive and grows faster than additively when many layers are swapped, which argues
for log space; but a log-space model is not linear in the plan, so the solver could no longer optimise it
exactly. We keep the mean linear in KL space and take the log-space view in the noise model instead: the
noise sd of a plan is proportional to `floor + predicted KL` (relative error), so the fit weights each trial by
1 / (floor + prior)^2 -- to first order the same as least squares on log(floor + KL), and low-KL plans (the
interesting end of the front) are not drowned by the large residuals of plans that swap everything.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol, Sequence

import numpy as np

from layerboost_core.plan import LayerPlan

BASELINE = "softmax"  # the unchanged option: contributes 0 by definition of the sensitivities


@dataclass(frozen=True)
class QualityTerms:
    """A predicted quality that is linear in the plan's indicators plus pairwise products.

    quality(plan) = sum_l unary[l, k(l)] + sum over (l1, k1, l2, k2, c) in pairs of c * [k(l1)=k1][k(l2)=k2],
    where k(l) indexes `options` and softmax contributes nothing.
    """

    options: tuple[str, ...]  # non-softmax options: the columns of `unary`
    unary: np.ndarray  # [L, K]
    pairs: tuple[tuple[int, int, int, int, float], ...] = ()

    def value(self, plan: LayerPlan) -> float:
        index = {o: k for k, o in enumerate(self.options)}
        chosen = {layer: index[o] for layer, o in enumerate(plan.layers) if o != BASELINE}
        total = sum(float(self.unary[layer, k]) for layer, k in chosen.items())
        total += sum(c for l1, k1, l2, k2, c in self.pairs if chosen.get(l1) == k1 and chosen.get(l2) == k2)
        return total


@dataclass(frozen=True)
class SensitivityTable:
    """Single-swap score of each (layer, non-softmax option); softmax is 0."""

    options: tuple[str, ...]
    values: np.ndarray  # [L, K]

    @property
    def num_layers(self) -> int:
        return self.values.shape[0]

    @classmethod
    def of(cls, source, num_layers: int | None = None, metric: str = "kl") -> "SensitivityTable":
        """From sensitivity rows ({layer, option, <metric>, ...} as in sensitivity.csv), a mapping
        {(layer, option): score}, or a SensitivityTable (returned as is)."""
        if isinstance(source, SensitivityTable):
            return source
        if isinstance(source, Mapping):
            score = {(int(l), str(o)): float(v) for (l, o), v in source.items()}
        else:
            score = {}
            for row in source:
                if metric not in row:
                    raise ValueError(f"sensitivity: row {dict(row)} has no {metric!r} score")
                score[(int(row["layer"]), str(row["option"]))] = float(row[metric])
        options = tuple(sorted({o for _, o in score if o != BASELINE}))
        layers = num_layers if num_layers is not None else 1 + max(l for l, _ in score)
        values = np.zeros((layers, len(options)))
        for layer in range(layers):
            for k, option in enumerate(options):
                if (layer, option) not in score:
                    raise ValueError(f"sensitivity: no score for layer {layer} / {option}")
                values[layer, k] = score[(layer, option)]
        return cls(options, values)

    def indicators(self, plans: Sequence[LayerPlan]) -> np.ndarray:
        """[n, L*K] one-hot of each plan's non-softmax choices (column l*K + k)."""
        index = {o: k for k, o in enumerate(self.options)}
        out = np.zeros((len(plans), self.values.size))
        for row, plan in enumerate(plans):
            if len(plan) != self.num_layers:
                raise ValueError(f"plan {plan} has {len(plan)} layers, the sensitivity table {self.num_layers}")
            for layer, option in enumerate(plan.layers):
                if option == BASELINE:
                    continue
                if option not in index:
                    raise ValueError(f"plan {plan}: layer {layer} uses {option!r}, which has no sensitivity score")
                out[row, layer * len(self.options) + index[option]] = 1.0
        return out

    def prior(self, plans: Sequence[LayerPlan]) -> np.ndarray:
        """The additive prediction: sum over layers of the single-swap scores."""
        return self.indicators(plans) @ self.values.ravel()

    def default_floor(self) -> float:
        """A typical single-swap score: the scale below which KL differences are treated as noise."""
        positive = self.values[self.values > 0]
        return float(np.median(positive)) if positive.size else 1.0


class Predictor(Protocol):
    """Predicts the proxy quality of plans; `predict` returns (mean, variance) arrays."""

    def fit(self, plans: Sequence[LayerPlan], values: Sequence[float]) -> "Predictor": ...

    def predict(self, plans: Sequence[LayerPlan]) -> tuple[np.ndarray, np.ndarray]: ...


def _clean(plans, values) -> tuple[list[LayerPlan], np.ndarray]:
    values = np.asarray(values, dtype=float)
    keep = np.isfinite(values)
    return [p for p, k in zip(plans, keep) if k], values[keep]


class AdditivePredictor:
    """Sum of single-swap sensitivities, times a global scale fitted (relative-error least squares) on trials.

    Its variance is a relative error, `(rel_sd * (floor + mean))^2`, with rel_sd estimated from the trials
    (`default_rel_sd` before any)."""

    def __init__(self, table: SensitivityTable, fit_scale: bool = True, floor: float | None = None,
                 default_rel_sd: float = 0.5):
        self.table, self.fit_scale = table, fit_scale
        self.floor = table.default_floor() if floor is None else float(floor)
        self.scale, self.rel_sd = 1.0, default_rel_sd

    def fit(self, plans: Sequence[LayerPlan], values: Sequence[float]) -> "AdditivePredictor":
        plans, y = _clean(plans, values)
        if not plans:
            return self
        p = self.table.prior(plans)
        w = 1.0 / (self.floor + np.maximum(p, 0.0)) ** 2
        if self.fit_scale and np.sum(w * p * p) > 0:
            self.scale = float(np.sum(w * p * y) / np.sum(w * p * p))
        if len(plans) > 1:
            relative = (y - self.scale * p) / (self.floor + self.scale * np.maximum(p, 0.0))
            self.rel_sd = float(np.sqrt(np.mean(relative ** 2)))
        return self

    def predict(self, plans: Sequence[LayerPlan]) -> tuple[np.ndarray, np.ndarray]:
        mean = self.scale * self.table.prior(plans)
        return mean, (self.rel_sd * (self.floor + np.maximum(mean, 0.0))) ** 2

    def terms(self, rng: np.random.Generator | None = None) -> QualityTerms:
        """The mean as solver terms; with `rng`, a plausible alternative: each score scaled by a log-normal
        factor of the fitted relative error (Thompson-style exploration before any interaction fit)."""
        unary = self.scale * self.table.values
        if rng is not None:
            unary = unary * np.exp(rng.normal(0.0, self.rel_sd, unary.shape))
        return QualityTerms(self.table.options, unary)


def pair_index(table: SensitivityTable, pairs: str) -> list[tuple[int, int]]:
    """Pairs of indicator columns (l1*K + k1, l2*K + k2), l1 < l2: 'adjacent' layers, 'all' layers, or 'none'."""
    if pairs not in ("adjacent", "all", "none"):
        raise ValueError(f"pairs: {pairs!r}; allowed: adjacent, all, none")
    if pairs == "none":
        return []
    layers, options = table.values.shape
    out = []
    for l1 in range(layers):
        for l2 in range(l1 + 1, layers if pairs == "all" else min(layers, l1 + 2)):
            out += [(l1 * options + k1, l2 * options + k2) for k1 in range(options) for k2 in range(options)]
    return out


def shared_pair_features(table: SensitivityTable, pairs: list[tuple[int, int]], kind: str) -> np.ndarray:
    """[P, F]: features that are fixed combinations of the pair products, so a few weights can express an
    effect every pair shares: per (option, option), the number of adjacent layers taking them (e.g. runs of
    removed layers hurting more than their parts); with all pairs also sum_{a<b} (s_a + s_b) x_a x_b, i.e.
    prior * (swapped layers - 1), the compounding of errors as more layers are swapped."""
    options = table.values.shape[1]
    columns = [np.array([float(b // options == a // options + 1 and (a % options, b % options) == kk)
                         for a, b in pairs]) for kk in itertools.product(range(options), repeat=2)]
    if kind == "all":
        flat = table.values.ravel()
        columns.append(np.array([flat[a] + flat[b] for a, b in pairs]))
    return np.stack(columns, axis=1) if pairs else np.zeros((0, 0))


class InteractionPredictor:
    """Additive prior + a Bayesian linear correction fitted on trials.

    residual = KL - scale * prior is modelled as w . phi(plan), phi = one-hot (layer, non-softmax option),
    products of indicator pairs (`pairs`: adjacent layers, all layers, or none) and a few shared combinations
    of those products (`shared_pair_features`), with w ~ N(0, I / alpha) and
    noise sd = (floor + scale * prior) / sqrt(beta). alpha and beta maximise the evidence (MacKay's fixed
    point, on the SVD of the weighted design, so more features than trials is fine). Features no trial has
    touched keep their prior variance, so predictions far from the data are uncertain.
    """

    def __init__(self, table: SensitivityTable, pairs: str = "adjacent", floor: float | None = None,
                 iterations: int = 200):
        self.table, self.pairs = table, pair_index(table, pairs)
        self.shared = shared_pair_features(table, self.pairs, pairs)  # [P, F]
        self.additive = AdditivePredictor(table, fit_scale=True, floor=floor)
        self.floor, self.iterations = self.additive.floor, iterations
        dim = table.values.size + len(self.pairs) + self.shared.shape[1]
        self.weights = np.zeros(dim)
        self.alpha, self.beta = 1.0 / self.floor ** 2, 1.0 / self.additive.rel_sd ** 2
        self._basis, self._variances = np.zeros((dim, 0)), np.zeros(0)  # see predict()

    def features(self, plans: Sequence[LayerPlan]) -> np.ndarray:
        x = self.table.indicators(plans)  # [n, L*K]
        if not self.pairs:
            return x
        a, b = np.array(self.pairs).T
        products = x[:, a] * x[:, b]  # [n, P]
        return np.hstack([x, products, products @ self.shared])  # [n, L*K + P + F]

    def fit(self, plans: Sequence[LayerPlan], values: Sequence[float]) -> "InteractionPredictor":
        plans, y = _clean(plans, values)
        self.additive.fit(plans, y)
        if len(plans) < 2:
            return self
        scale = self.additive.scale
        prior = self.table.prior(plans)
        root_w = 1.0 / (self.floor + scale * np.maximum(prior, 0.0))
        design = self.features(plans) * root_w[:, None]  # [n, d]
        target = (y - scale * prior) * root_w  # [n]
        n = design.shape[0]
        u, s, vt = np.linalg.svd(design, full_matrices=False)  # posterior lives in span(vt) + its complement
        s2 = s ** 2
        projected = u.T @ target  # target in the left-singular basis
        alpha, beta = self.alpha, 1.0 / max(float(np.var(target)), 1e-12)
        alpha_range = (1e-8 / self.floor ** 2, 1e12 / self.floor ** 2)  # prior sd of a weight: 1e4..1e-6 floors
        total = float(target @ target)
        for _ in range(self.iterations):
            coef = beta * s / (alpha + beta * s2) * projected  # posterior mean in the basis vt
            gamma = float(np.sum(beta * s2 / (alpha + beta * s2)))
            fitted = s * coef
            # targets are relative errors: below 1e-6 of them is exact data, not a noise level to trust
            residual = max(total - 2 * float(fitted @ projected) + float(fitted @ fitted), 1e-12 * n)
            new_alpha = float(np.clip(gamma / max(float(coef @ coef), 1e-300), *alpha_range))
            new_beta = max(n - gamma, 1e-6) / residual
            converged = abs(new_alpha - alpha) <= 1e-6 * alpha and abs(new_beta - beta) <= 1e-6 * beta
            alpha, beta = new_alpha, new_beta
            if converged:
                break
        self.alpha, self.beta = alpha, beta
        self.weights = vt.T @ (beta * s / (alpha + beta * s2) * projected)
        self._basis, self._variances = vt.T, 1.0 / (alpha + beta * s2)
        return self

    def predict(self, plans: Sequence[LayerPlan]) -> tuple[np.ndarray, np.ndarray]:
        phi = self.features(plans)
        scaled_prior = self.additive.scale * self.table.prior(plans)
        mean = scaled_prior + phi @ self.weights
        # posterior covariance = B diag(v) B^T + (I - B B^T) / alpha  (directions no trial has seen)
        epistemic = np.sum(phi ** 2, axis=1) / self.alpha + ((phi @ self._basis) ** 2) @ (self._variances - 1 / self.alpha)
        noise = (self.floor + np.maximum(scaled_prior, 0.0)) ** 2 / self.beta
        return mean, epistemic + noise

    def terms(self, rng: np.random.Generator | None = None) -> QualityTerms:
        """The mean as solver terms; with `rng`, one draw of the weights from the posterior (Thompson)."""
        weights = self.weights
        if rng is not None:
            basis = self._basis
            unseen = rng.standard_normal(weights.size)
            unseen = (unseen - basis @ (basis.T @ unseen)) / np.sqrt(self.alpha)
            weights = weights + basis @ (np.sqrt(self._variances) * rng.standard_normal(basis.shape[1])) + unseen
        layers, options = self.table.values.shape
        unary = self.additive.scale * self.table.values + weights[: layers * options].reshape(layers, options)
        pairs = tuple((a // options, a % options, b // options, b % options, float(c))
                      for (a, b), c in zip(self.pairs, self._pair_weights(weights)) if c != 0.0)
        return QualityTerms(self.table.options, unary, pairs)

    def _pair_weights(self, weights: np.ndarray) -> np.ndarray:
        """The effective coefficient of each pair product: its own weight plus its share of the shared ones."""
        start = self.table.values.size
        own, shared = weights[start:start + len(self.pairs)], weights[start + len(self.pairs):]
        return own + self.shared @ shared if len(self.pairs) else own

    def pair_coefficients(self) -> dict[tuple[tuple[int, str], tuple[int, str]], float]:
        """{((layer, option), (layer, option)): fitted interaction (own + shared weights) for every modelled pair."""
        options = self.table.options
        return {((a // len(options), options[a % len(options)]), (b // len(options), options[b % len(options)])):
                float(c) for (a, b), c in zip(self.pairs, self._pair_weights(self.weights))}


def make_predictor(table: SensitivityTable, plans: Iterable[LayerPlan], values: Iterable[float],
                   pairs: str = "adjacent", min_trials: int = 8):
    """The predictor to use with this many trials: additive (scale only) below `min_trials`, else interaction."""
    plans, values = list(plans), list(values)
    if len(plans) < min_trials:
        return AdditivePredictor(table).fit(plans, values)
    return InteractionPredictor(table, pairs=pairs).fit(plans, values)

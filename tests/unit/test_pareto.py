"""Hypervolume in two and three objectives against hand-computed boxes, and the non-dominated set."""
from __future__ import annotations

import random

import pytest

from layerboost_core.pareto import hypervolume_2d, hypervolume_3d, non_dominated


def test_one_point_is_a_box():
    assert hypervolume_3d([(0.5, 0.5, 0.5)], (1, 1, 1)) == pytest.approx(0.125)
    assert hypervolume_3d([(0.5, 0.5, 1.5)], (1, 1, 1)) == 0.0  # outside the reference box


def test_two_overlapping_boxes_count_their_union():
    # boxes [0.2,1]x[0.6,1]x[0.4,1] and [0.6,1]x[0.2,1]x[0.4,1]: 0.32*... by inclusion-exclusion
    a, b = (0.2, 0.6, 0.4), (0.6, 0.2, 0.4)
    box = lambda p: (1 - p[0]) * (1 - p[1]) * (1 - p[2])  # noqa: E731
    overlap = (1 - 0.6) * (1 - 0.6) * (1 - 0.4)
    assert hypervolume_3d([a, b], (1, 1, 1)) == pytest.approx(box(a) + box(b) - overlap)


def test_three_dimensions_reduce_to_two_on_a_flat_set():
    points2 = [(0.1, 0.8), (0.4, 0.3), (0.7, 0.1)]
    flat = [(x, y, 0.0) for x, y in points2]
    assert hypervolume_3d(flat, (1, 1, 2)) == pytest.approx(2 * hypervolume_2d(points2, (1, 1)))


def test_monte_carlo_agrees():
    rng = random.Random(0)
    points = [tuple(rng.random() for _ in range(3)) for _ in range(12)]
    exact = hypervolume_3d(points, (1, 1, 1))
    samples = [tuple(rng.random() for _ in range(3)) for _ in range(40000)]
    hits = sum(any(all(p[i] <= s[i] for i in range(3)) for p in points) for s in samples)
    assert exact == pytest.approx(hits / len(samples), abs=0.01)


def test_non_dominated():
    points = [(1, 1, 1), (0, 2, 1), (2, 2, 2), (1, 1, 1), (0, 0, 3)]
    assert non_dominated(points) == [0, 1, 3, 4]
    assert non_dominated([p[:2] for p in points]) == [4]  # (0, 0) beats every other point on the first two
    assert non_dominated([]) == []

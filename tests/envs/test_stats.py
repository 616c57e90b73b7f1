"""Agreement statistics against values worked out by hand (the working is in each test's comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from envs.stats import cohen_kappa, krippendorff_alpha_nominal

nan = np.nan


def test_cohen_kappa_two_categories():
    # Table (rows: first annotator yes/no, cols: second) [[20, 5], [10, 15]], N = 50:
    # p_o = 35/50 = 0.7; row marginals .5/.5, column marginals .6/.4 -> p_e = .5*.6 + .5*.4 = 0.5;
    # kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4.
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_cohen_kappa_three_categories():
    # A = aabbccabca, B = abbbcaabcc. Table (rows A, cols B, order a b c): [[2,1,1],[0,3,0],[1,0,2]].
    # p_o = 7/10; row sums 4,3,3 and column sums 3,4,3 -> p_e = (12 + 12 + 9)/100 = 33/100;
    # kappa = (70 - 33) / (100 - 33) = 37/67.
    assert cohen_kappa(list("aabbccabca"), list("abbbcaabcc")) == pytest.approx(37 / 67)


def test_cohen_kappa_perfect_and_degenerate():
    assert cohen_kappa(["a", "b", "a"], ["a", "b", "a"]) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa(["a", "a"], ["a", "a"]))  # p_e = 1: undefined
    with pytest.raises(ValueError):
        cohen_kappa(["a"], ["a", "b"])


def test_krippendorff_alpha_reference_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 coders, 12 units.
    # Unit 12 has one value and drops out; coincidences give n = 40, sum_c o_cc = 32 and
    # n_c = 9, 13, 10, 5, 3 (sum of squares 384) -> alpha = 1 - 39 * 8 / (1600 - 384) = 113/152.
    data = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
        [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan],
    ]
    assert krippendorff_alpha_nominal(data) == pytest.approx(113 / 152)


def test_krippendorff_alpha_small_with_missing():
    # 3 annotators x 5 units (x=0, y=1): (x,x,x) -> o_xx += 3; (x,y) -> o_xy, o_yx += 1;
    # (y,y,y) -> o_yy += 3; (x,y) -> o_xy, o_yx += 1; unit 5 has one value. o = [[3,2],[2,3]],
    # n_x = n_y = 5, n = 10 -> alpha = 1 - 9 * 4 / (100 - 50) = 7/25.
    data = [[0, 0, 1, nan, 1], [0, 1, 1, 0, nan], [0, nan, 1, 1, nan]]
    assert krippendorff_alpha_nominal(data) == pytest.approx(7 / 25)


def test_krippendorff_alpha_degenerate():
    assert krippendorff_alpha_nominal([[0, 1], [0, 1]]) == pytest.approx(1.0)
    assert math.isnan(krippendorff_alpha_nominal([[0, 0], [0, 0]]))  # one category: no expected disagreement
    assert math.isnan(krippendorff_alpha_nominal([[0, nan], [nan, 1]]))  # nothing pairable

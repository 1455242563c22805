"""analysis/power.py: the noncentral-t power against a simulation, and the Bonferroni interval."""

import numpy as np
import pytest
from scipy import stats

from analysis.power import bonferroni_interval, detectable_difference, paired_power, pairs_for_power


def test_paired_power_matches_a_simulated_t_test():
    generator = np.random.default_rng(0)
    delta, sd, pairs = 0.017, 0.026, 12
    differences = generator.normal(delta, sd, size=(20_000, pairs))
    rejected = stats.ttest_1samp(differences, 0.0, axis=1).pvalue < 0.05
    assert paired_power(delta, sd, pairs) == pytest.approx(rejected.mean(), abs=0.015)


def test_no_effect_has_the_test_level_as_power_and_more_seeds_more_power():
    assert paired_power(0.0, 1.0, 8) == pytest.approx(0.05, abs=1e-9)
    needed = pairs_for_power(0.017, 0.026)
    assert paired_power(0.017, 0.026, needed) >= 0.8 > paired_power(0.017, 0.026, needed - 1)


def test_bonferroni_over_one_comparison_is_the_interval_itself_and_widens_with_more():
    assert bonferroni_interval(0.023, 0.002, 0.043, 5, 1) == pytest.approx((0.0025, 0.0435))
    low, high = bonferroni_interval(0.023, 0.002, 0.043, 5, 8)
    assert low < 0.0 < high


def test_the_detectable_difference_has_the_asked_power():
    difference = detectable_difference(0.026, 8)
    assert paired_power(difference, 0.026, 8) == pytest.approx(0.8, abs=1e-6)

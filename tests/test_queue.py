"""The labeling queue: every policy is a permutation of the pool; highest, uncertain and diverse put the right images
first; the validation and the speed on a large pool (pure numpy)."""

import math
import time

import numpy as np
import pytest

from aae_ray.queue import POLICIES, default_candidates, queue_order


def random_pool(n: int, d: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Codes from a standard normal and their T2 as the squared norm, as a whitened latent space would give."""
    codes = np.random.default_rng(seed).standard_normal((n, d))
    return (codes**2).sum(1), codes


def clustered_pool(seed: int = 0, n: int = 4000, d: int = 16, radius: float = 10.0):
    """n normal codes, 30 of them replaced by 3 tight clusters of 10 near-duplicates each, far from the centre and
    from each other, so the 30 cluster items are exactly the 30 highest T2. Cluster 0 lies a little farther out than
    1, and 1 than 2, so by T2 alone cluster 0 fills the top 10. Returns (t2, codes, cluster), cluster -1 = normal."""
    rng = np.random.default_rng(seed)
    codes = rng.standard_normal((n, d))
    directions = np.linalg.qr(rng.standard_normal((d, 3)))[0].T  # 3 orthonormal directions
    centres = directions * radius * np.array([[1.1], [1.05], [1.0]])
    cluster = np.full(n, -1)
    members = rng.choice(n, 30, replace=False).reshape(3, 10)
    for c in range(3):
        codes[members[c]] = centres[c] + 0.01 * rng.standard_normal((10, d))
        cluster[members[c]] = c
    t2 = (codes**2).sum(1)
    assert set(np.argsort(-t2)[:30]) == set(members.ravel())  # the fixture's premise
    return t2, codes, cluster


def assert_permutation(order: np.ndarray, n: int) -> None:
    assert order.dtype.kind == "i"
    assert order.shape == (n,)
    assert np.array_equal(np.sort(order), np.arange(n))


# --- every policy -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_every_policy_returns_a_permutation_of_the_pool(policy, n):
    t2, codes = random_pool(n, seed=n)
    assert_permutation(queue_order(t2, codes, 3.0, policy), n)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_is_a_permutation_with_ties_zeros_and_duplicates(policy):
    t2 = np.array([2.0, 2.0, 0.0, 5.0, 0.0, 2.0, 9.0, 9.0])
    codes = np.zeros((8, 3))  # every code identical: all distances zero
    assert_permutation(queue_order(t2, codes, 2.0, policy), 8)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_is_deterministic(policy):
    t2, codes = random_pool(500, seed=3)
    first = queue_order(t2, codes, 4.0, policy, seed=0)
    assert np.array_equal(first, queue_order(t2.copy(), codes.copy(), 4.0, policy, seed=0))
    assert np.array_equal(first, queue_order(t2, codes, 4.0, policy, seed=123))  # no policy draws random numbers


@pytest.mark.parametrize("policy", POLICIES)
def test_an_empty_pool_gives_an_empty_int_array(policy):
    order = queue_order(np.array([]), np.zeros((0, 4)), 1.0, policy)
    assert order.shape == (0,)
    assert order.dtype.kind == "i"


def test_highest_and_uncertain_need_no_codes():
    t2 = np.array([1.0, 3.0, 2.0])
    assert_permutation(queue_order(t2, None, 2.0, "highest"), 3)
    assert_permutation(queue_order(t2, None, 2.0, "uncertain"), 3)
    assert np.array_equal(queue_order(t2, None, 2.0), [1, 2, 0])  # highest is the default policy


# --- highest ------------------------------------------------------------------------------------------------------


def test_highest_orders_by_t2_descending():
    t2 = np.array([0.5, 7.0, 3.0, 12.0, 1.0])
    assert np.array_equal(queue_order(t2, None, 5.0, "highest"), [3, 1, 2, 4, 0])


def test_highest_breaks_ties_stably_by_index():
    t2 = np.array([1.0, 3.0, 3.0, 2.0, 3.0, 1.0, 0.0, 0.0])
    assert np.array_equal(queue_order(t2, None, 2.0, "highest"), [1, 2, 4, 3, 0, 5, 6, 7])


def test_highest_breaks_many_ties_by_index():
    t2 = np.random.default_rng(9).integers(0, 5, 1000).astype(float)
    expected = sorted(range(1000), key=lambda i: (-t2[i], i))
    assert np.array_equal(queue_order(t2, None, 2.0, "highest"), expected)


def test_highest_on_a_random_pool_is_sorted():
    t2, codes = random_pool(1000, seed=5)
    order = queue_order(t2, codes, 1.0, "highest")
    assert np.all(np.diff(t2[order]) <= 0)


# --- uncertain ----------------------------------------------------------------------------------------------------


def test_uncertain_puts_the_items_nearest_the_threshold_first():
    #                0     1    2     3     4    5     6     7
    t2 = np.array([1.0, 7.0, 9.0, 64.0, 8.0, 0.0, -1.0, 20.0])
    order = queue_order(t2, None, 8.0, "uncertain")
    # |log(t2 / 8)|: 4 -> 0, 2 -> 0.118, 1 -> 0.134, 7 -> 0.92, then 0 and 3 at log(8) each, then 5 and 6 at the
    # floor; equal closeness goes to the higher T2: 3 (64) before 0 (1), 5 (0) before 6 (-1).
    assert np.array_equal(order, [4, 2, 1, 7, 3, 0, 5, 6])


def test_uncertain_is_scale_free_in_t2():
    """A factor of 2 above the threshold is as close as a factor of 2 below it; ties go to the higher T2."""
    t2 = np.array([2.5, 20.0, 4.0, 5.0])
    assert np.array_equal(queue_order(t2, None, 10.0, "uncertain"), [1, 3, 2, 0])


def test_uncertain_puts_nonpositive_t2_last():
    t2 = np.array([0.0, 1e-6, 1e6, -3.0, 2.0])
    order = queue_order(t2, None, 2.0, "uncertain")
    assert list(order[:1]) == [4]
    assert set(order[-2:]) == {0, 3}
    assert list(order[-2:]) == [0, 3]  # both at the floor: the higher T2 first


# --- diverse ------------------------------------------------------------------------------------------------------


def test_the_clustered_fixture_defeats_highest():
    t2, codes, cluster = clustered_pool()
    first3 = cluster[queue_order(t2, codes, 1.0, "highest")[:3]]
    assert max(np.bincount(first3 + 1)) >= 2  # at least 2 of the first 3 in the same cluster


def test_diverse_first_three_come_from_three_different_clusters():
    t2, codes, cluster = clustered_pool()
    first3 = cluster[queue_order(t2, codes, 1.0, "diverse")[:3]]
    assert sorted(first3) == [0, 1, 2]


@pytest.mark.parametrize("seed", range(5))
def test_diverse_first_page_of_12_covers_all_three_clusters(seed):
    t2, codes, cluster = clustered_pool(seed)
    page = cluster[queue_order(t2, codes, 1.0, "diverse")[:12]]
    assert {0, 1, 2} <= set(page)
    assert set(cluster[queue_order(t2, codes, 1.0, "highest")[:12]]) != {0, 1, 2}  # highest misses one


def test_diverse_starts_with_the_highest_t2():
    t2, codes, _ = clustered_pool(seed=1)
    assert queue_order(t2, codes, 1.0, "diverse")[0] == np.argmax(t2)


def test_diverse_puts_every_candidate_before_every_non_candidate():
    t2, codes = random_pool(600, d=6, seed=2)
    highest = queue_order(t2, codes, 1.0, "highest")
    order = queue_order(t2, codes, 1.0, "diverse", candidates=50)
    assert set(order[:50]) == set(highest[:50])
    assert not np.array_equal(order[:50], highest[:50])  # the candidates really were reordered
    assert np.array_equal(order[50:], highest[50:])  # the rest by T2 descending


def test_diverse_default_candidates():
    assert default_candidates(0) == 0
    assert default_candidates(150) == 150
    assert default_candidates(1000) == 200
    assert default_candidates(20_000) == 1000
    t2, codes = random_pool(5000, seed=4)
    highest = queue_order(t2, codes, 1.0, "highest")
    order = queue_order(t2, codes, 1.0, "diverse")
    assert set(order[:250]) == set(highest[:250])
    assert np.array_equal(order[250:], highest[250:])


def test_diverse_with_more_candidates_than_the_pool_reorders_the_whole_pool():
    t2, codes = random_pool(40, seed=6)
    order = queue_order(t2, codes, 1.0, "diverse", candidates=10_000)
    assert_permutation(order, 40)
    assert np.array_equal(order, queue_order(t2, codes, 1.0, "diverse", candidates=40))


def test_diverse_does_not_jump_to_a_far_but_barely_suspicious_candidate():
    """Item 5 is the farthest from the first pick but has the lowest T2: plain k-center would take it second; the T2
    weight takes the moderately far, high-T2 item 2 first. Item 1, a near-duplicate of the first pick, comes last."""
    codes = np.array([[0.0, 0.0], [0.01, 0.0], [3.0, 0.0], [-1.0, 1.0], [0.0, -1.0], [-5.0, 5.0]])
    t2 = np.array([10.0, 9.9, 9.0, 5.0, 4.0, 3.0])
    order = queue_order(t2, codes, 1.0, "diverse", candidates=6)
    assert list(order[:3]) == [0, 2, 5]
    assert order[-1] == 1


def test_diverse_standardises_each_dimension():
    """Multiplying one latent dimension by a constant must not change the order."""
    t2, codes = random_pool(300, d=5, seed=7)
    scaled = codes * np.array([1.0, 1000.0, 1.0, 0.001, 1.0])
    assert np.array_equal(
        queue_order(t2, codes, 1.0, "diverse", candidates=80), queue_order(t2, scaled, 1.0, "diverse", candidates=80)
    )


def test_diverse_on_a_large_pool_is_fast():
    t2, codes = random_pool(20_000, d=16, seed=8)
    start = time.perf_counter()
    order = queue_order(t2, codes, 1.0, "diverse")
    elapsed = time.perf_counter() - start
    assert_permutation(order, 20_000)
    assert elapsed < 2.0, f"diverse on 20,000 x 16 (1000 candidates) took {elapsed:.2f} s"


# --- validation ---------------------------------------------------------------------------------------------------


def test_unknown_policy_lists_the_policies():
    with pytest.raises(ValueError, match="unknown queue policy") as err:
        queue_order(np.ones(3), None, 1.0, "random")
    for policy in POLICIES:
        assert policy in str(err.value)


@pytest.mark.parametrize(
    "t2", [np.ones((3, 2)), np.float64(1.0), np.array([1.0, np.nan]), np.array([np.inf, 1.0]), np.array([-np.inf])]
)
@pytest.mark.parametrize("policy", POLICIES)
def test_t2_must_be_one_dimensional_and_finite(t2, policy):
    codes = np.zeros((np.size(t2), 2))
    with pytest.raises(ValueError, match="t2"):
        queue_order(t2, codes, 1.0, policy)


def test_diverse_needs_codes():
    with pytest.raises(ValueError, match="codes"):
        queue_order(np.ones(3), None, 1.0, "diverse")


@pytest.mark.parametrize("shape", [(4, 2), (2, 2), (3,), (3, 2, 1)])
@pytest.mark.parametrize("policy", POLICIES)
def test_codes_must_have_one_row_per_pool_item(shape, policy):
    with pytest.raises(ValueError, match="codes"):
        queue_order(np.ones(3), np.zeros(shape), 1.0, policy)


def test_diverse_needs_finite_codes():
    codes = np.zeros((3, 2))
    codes[1, 0] = np.nan
    with pytest.raises(ValueError, match="codes"):
        queue_order(np.ones(3), codes, 1.0, "diverse")


@pytest.mark.parametrize("candidates", [0, -5, 2.5, True])
def test_diverse_needs_a_positive_integer_candidate_count(candidates):
    with pytest.raises(ValueError, match="candidates"):
        queue_order(np.ones(3), np.zeros((3, 2)), 1.0, "diverse", candidates=candidates)


@pytest.mark.parametrize("threshold", [0.0, -1.0, math.nan, math.inf])
def test_uncertain_needs_a_finite_positive_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        queue_order(np.ones(3), None, threshold, "uncertain")
    assert_permutation(queue_order(np.ones(3), None, threshold, "highest"), 3)  # the others ignore it

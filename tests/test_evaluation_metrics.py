"""Evaluation metrics on hand-made scores with known answers, and the justification sentence."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.evaluation import (
    SIM_BINS,
    QueryResult,
    answer_outcome,
    calibrate,
    cmc_curve,
    confusion_matrix,
    expected_rank1,
    mean_average_precision,
    part_metrics,
    rates_at,
    roc_curve,
    similarity_histogram,
    threshold_sweep,
    true_ranks,
    wilson_interval,
)
from trainer.explain import justification, part_tiers
from trainer.recognition import (
    Correspondence,
    Decision,
    PixelFeatures,
    Recognition,
    correspondence_from_matches,
    decide,
)


def test_ranks_cmc_and_map():
    rates = np.array([[0.9, 0.1, 0.3], [0.2, 0.5, 0.6], [0.1, 0.2, 0.3], [0.4, 0.4, 0.1]])
    tie = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 0], [0.2, 0.5, 0]])
    ranks = true_ranks(rates, tie, np.array([0, 1, 0, 0]))
    assert ranks.tolist() == [1, 2, 3, 2]  # last: tied rate, lower similarity -> second
    np.testing.assert_allclose(cmc_curve(ranks, 3), [0.25, 0.75, 1.0])
    assert mean_average_precision(ranks) == pytest.approx((1 + 0.5 + 1 / 3 + 0.5) / 4)
    m = confusion_matrix(np.array([0, 1, 0]), np.array([0, 2, 0]), 3)
    assert m.tolist() == [[2, 0, 0], [0, 0, 1], [0, 0, 0]]


def test_expected_rank1_shares_ties():
    rates = np.array([[0.0, 0.0, 0.0, 0.0], [0.5, 0.2, 0.5, 0.1], [0.1, 0.9, 0, 0]])
    assert expected_rank1(rates, np.array([2, 0, 0])) == pytest.approx((0.25 + 0.5 + 0.0) / 3)


def test_roc_eer_and_tar_at_far():
    genuine_scores = np.array([0.9, 0.8, 0.7, 0.3])
    impostor_scores = np.array([0.6, 0.5, 0.2, 0.1, 0.05] * 20)  # 100 impostors
    scores = np.concatenate([genuine_scores, impostor_scores])
    labels = np.concatenate([np.ones(4, bool), np.zeros(100, bool)])
    roc = roc_curve(scores, labels)
    assert roc.tar_at_far == pytest.approx(0.75)  # accept >= 0.7: no impostor passes
    assert roc.eer == pytest.approx(0.225)  # at t = 0.6: FAR 20%, FRR 25%
    assert roc.eer_threshold == pytest.approx(0.6)
    assert roc.auc == pytest.approx(0.9)  # P(genuine > impostor) = (3 + 0.6) / 4
    perfect = roc_curve(np.array([1.0, 0.9, 0.1]), np.array([True, True, False]))
    assert perfect.eer == 0.0 and perfect.tar_at_far == 1.0


def test_rates_from_similarity_histograms_match_direct_counting():
    rng = np.random.default_rng(1)
    sim = rng.uniform(-1, 1, 500).astype(np.float32)
    same = rng.random(500) < 0.6
    hist = similarity_histogram(sim, same)
    assert hist.shape == (SIM_BINS,) and hist.sum() == same.sum()
    for t in (0.0, 0.25, 0.5, 0.73):
        direct = np.mean(same & (sim >= t))
        assert rates_at(hist, 500, t) == pytest.approx(direct, abs=2 / 500)


def _query(true_row: int, genuine_sims: list[float], other_sims: list[float], n: int = 10) -> QueryResult:
    """Three-identity query: same-part pixel similarities for the true identity and for the two others."""
    hists = []
    for row in range(3):
        sims = np.array(genuine_sims if row == true_row else other_sims, dtype=np.float32)
        hists.append(similarity_histogram(sims, np.ones(len(sims), bool)))
    hist = np.stack(hists)
    rates = rates_at(hist, n, 0.5)
    return QueryResult(
        "k", true_row, rates, np.zeros(3), hist, n, np.zeros((16, 16), np.int64), np.zeros(0), np.zeros(0)
    )


def test_threshold_sweep_and_calibration_prefer_the_separating_threshold():
    # genuine pixels are very similar (0.8-0.9); impostors are mediocre (0.3-0.45): any T in (0.45, 0.8]
    # separates them, T <= 0.3 does not (all pixels count for everyone)
    results = [_query(q % 3, [0.85] * 6 + [0.8] * 2, [0.45] * 5 + [0.3] * 3) for q in range(9)]
    sweep = threshold_sweep(results, np.array([0.0, 0.5, 0.95]))
    assert sweep["rank1"] == pytest.approx([1 / 3, 1.0, 1 / 3])
    assert sweep["genuine_rate"] == pytest.approx([0.8, 0.8, 0.0])
    assert sweep["impostor_rate"] == pytest.approx([0.8, 0.0, 0.0])
    cal = calibrate(results, np.array([0.0, 0.3, 0.5, 0.7, 0.95]))
    assert cal.rank1 == pytest.approx(1.0)
    assert cal.similarity_threshold in (0.5, 0.7)
    assert 0.0 <= cal.unknown_threshold <= 0.8
    assert cal.eer_open_set == pytest.approx(0.0)
    assert cal.samples == 9


def test_part_metrics_iou_and_accuracy():
    conf = np.zeros((16, 16), np.int64)
    conf[0, 0] = 50
    conf[1, 1] = 8  # head: 8 right, 2 called torso
    conf[1, 2] = 2
    conf[2, 2] = 10
    m = part_metrics(conf)
    assert m["per_part"]["head"]["accuracy"] == pytest.approx(0.8)
    assert m["per_part"]["head"]["iou"] == pytest.approx(0.8)
    assert m["per_part"]["torso"]["iou"] == pytest.approx(10 / 12, abs=1e-4)
    assert m["pixel_accuracy"] == pytest.approx(68 / 70)
    assert m["per_part"]["left_foot"]["iou"] is None


# ----------------------------------------------------------------------------------------------------------
# The justification sentence


def _recognition(
    part_counts: dict[int, tuple[int, int]],
    identity: str = "id0003",
    rate: float = 0.62,
    threshold: float = 0.0,
) -> Recognition:
    parts, matched = [], []
    for p, (n, k) in part_counts.items():
        parts += [p] * n
        matched += [True] * k + [False] * (n - k)
    parts_a = np.array(parts, dtype=np.int64)
    point_parts = np.arange(16, dtype=np.uint8)
    best_point = np.where(np.array(matched), parts_a, 0)  # matched pixels pick a point on their own part
    corr = correspondence_from_matches(
        best_point, np.ones(len(parts_a), np.float32), parts_a, point_parts, 0.5
    )
    assert isinstance(corr, Correspondence)
    decision = Decision(identity, "id0003", rate, threshold, [0])
    px = PixelFeatures(
        np.zeros((len(parts_a), 2), np.float32),
        parts_a,
        np.zeros((len(parts_a), 2), np.int64),
        np.zeros((1, 1), np.uint8),
        4,
        (1, 1),
    )
    return Recognition(decision, [], px, corr, None, None, 0.5)


def test_justification_names_strong_weak_and_hidden_parts():
    # head, torso, left upper leg strong; right lower arm weak; left hand partial; the rest hidden
    counts = {
        1: (10, 9),
        2: (20, 15),
        9: (6, 5),
        6: (10, 1),
        7: (5, 2),
        3: (5, 3),
        4: (5, 3),
        5: (5, 3),
        10: (5, 3),
        11: (5, 3),
        12: (5, 3),
    }
    rec = _recognition(counts)
    tiers = part_tiers(rec.best.part_pixels, rec.best.part_matched)
    assert tiers["strong"] == [1, 2, 3, 4, 5, 9, 10, 11, 12]
    assert tiers["weak"] == [6] and tiers["partial"] == [7] and tiers["hidden"] == [8, 13, 14]
    s = justification(rec)
    assert s.startswith("Recognised as id0003 (correspondence rate 62%): ")
    assert (
        "head, torso, both upper arms, left lower arm, both upper legs and both lower legs match strongly"
        in s
    )
    assert "left hand matches partly" in s
    assert "right lower arm matches weakly" in s
    assert s.endswith("right hand and the feet are not visible.") or s.endswith(
        "right hand and both feet are not visible."
    )


def test_justification_for_the_issue_example_and_unknown():
    rec = _recognition(
        {
            1: (10, 9),
            2: (20, 15),
            9: (6, 5),
            3: (4, 0),
            4: (4, 0),
            5: (4, 0),
            6: (4, 0),
            7: (4, 0),
            8: (4, 0),
            10: (4, 0),
            11: (4, 0),
            12: (4, 0),
        }
    )
    s = justification(rec)
    assert "head, torso and left upper leg match strongly" in s
    assert s.endswith("the feet are not visible.")
    unk = _recognition({1: (10, 1)}, identity="unknown", rate=0.1, threshold=0.3)
    s = justification(unk)
    assert s.startswith(
        "Unknown person (closest id0003 at correspondence rate 10%, under the open-set threshold 30%)"
    )
    assert "no part matches strongly" in s and "head matches weakly" in s
    empty = _recognition({})
    assert justification(empty).startswith("No person was found")


def test_wilson_interval_of_rank1_matches_the_textbook_values():
    # 39 of 200 right (the demo's 19.5%): Wilson 95% interval 14.6%-25.5% (scipy's binomtest gives the same)
    low, high = wilson_interval(39, 200)
    assert low == pytest.approx(0.1460552, abs=1e-6) and high == pytest.approx(0.2554404, abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775328), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((0.7224672, 1.0), abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_example_outcome_names_what_was_answered_not_who_ranked_first():
    names = ["ann", "bob"]
    accepted = decide(names, [0.6, 0.2], unknown_threshold=0.3)
    rejected = decide(names, [0.25, 0.2], unknown_threshold=0.3)
    assert answer_outcome(accepted, "ann") == "correct"
    assert answer_outcome(accepted, "bob") == "wrong"
    # ann ranks first but under U: the system said "unknown", so the example is not filed as correct
    assert rejected.best == "ann" and answer_outcome(rejected, "ann") == "unknown"

"""Caption and VQA metrics against hand-computed values and values produced by pycocoevalcap 1.2."""
import math

import pytest

from mm.evaluate import bleu, cider_d, normalize_answer, ptb_tokenize, vqa_accuracy


def test_bleu_by_hand():
    scores = bleu(["the cat sat on the mat"], [["the cat sat on a mat"]])
    # clipped matches 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty
    expected = [5 / 6, (5 / 6 * 3 / 5) ** 0.5, (5 / 6 * 3 / 5 * 1 / 2) ** (1 / 3), (5 / 6 * 3 / 5 * 1 / 2 / 3) ** 0.25]
    assert scores == pytest.approx(expected, rel=1e-6)


def test_bleu_brevity_uses_closest_reference_length():
    # closest reference length 3 (not 5): 2/3 -> penalty exp(1 - 3/2)
    assert bleu(["the cat"], [["the cat sat", "a cat on the mat"]])[1] == pytest.approx(math.exp(-0.5), rel=1e-6)
    # tie between 3 and 5 for length 4 -> the shorter, so no penalty; n-grams may match any reference
    assert bleu(["a b c d"], [["a b c", "a b c d e"]])[3] == pytest.approx(1.0, rel=1e-6)


def test_cider_d_by_hand():
    corpus, per_item = cider_d(["a b", "c d"], [["a b"], ["e f"]])
    assert per_item == pytest.approx([10 * (1 + 1 + 0 + 0) / 4, 0.0])  # unigram and bigram cosines are 1
    assert corpus == pytest.approx(2.5)
    # longer hypothesis: clipped cosines 2/sqrt(6) and 1/sqrt(2), Gaussian penalty on 2 vs 1 bigrams (sigma 6)
    _, per_item = cider_d(["a b c", "x y"], [["a b"], ["z w"]])
    assert per_item[0] == pytest.approx(10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72))


# Reference values: pycocoevalcap 1.2 Bleu(4) / Cider() on these items after ptb_tokenize (computed once, offline).
HYPS = ["a man riding a horse on a beach", "two dogs play in the grass", "a red bus parked on the street",
        "a plate of food with broccoli", "a cat"]
REFS = [["a man rides a horse along the beach", "a person on a horse at the seaside", "man riding horse on sand"],
        ["two dogs playing on the grass", "a pair of dogs run in a field"],
        ["a red double decker bus on a city street", "a bus parked by the road", "red bus on the street", "a red bus"],
        ["a plate with broccoli and meat", "food on a white plate"],
        ["a cat sitting on a couch", "a small cat on the sofa"]]


def test_matches_pycocoevalcap_values():
    assert bleu(HYPS, REFS) == pytest.approx(
        [0.808441007580049, 0.6749951748267379, 0.3510079115020001, 4.0154397174411465e-05], rel=1e-9)
    corpus, per_item = cider_d(HYPS, REFS)
    assert corpus == pytest.approx(2.0274725408400536, rel=1e-9)
    assert per_item == pytest.approx([2.014960267097292, 1.823314019978596, 2.7593095060250534, 1.88659395651007,
                                      1.653184954589255], rel=1e-9)


def test_ptb_tokenize():
    assert ptb_tokenize("A dog's toy, isn't it? Black-and-white.") == "a dog 's toy is n't it black-and-white"


def test_metrics_reject_mismatched_input():
    with pytest.raises(ValueError):
        bleu(["a"], [])
    with pytest.raises(ValueError):
        cider_d(["a"], [[]])


def test_vqa_normalisation():
    assert normalize_answer("Two dogs!") == "2 dogs"
    assert normalize_answer("The cat.") == "cat"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("  Yes\n") == "yes"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("3.5") == "3.5"


def test_vqa_accuracy_ten_answers_leave_one_out():
    # 2 matching humans: out of the 10 subsets of 9, 2 hold 1 match (1/3), 8 hold 2 (2/3)
    assert vqa_accuracy("two", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("A dog.", ["dog"] * 4 + ["cat"] * 6) == 1.0
    assert vqa_accuracy("bird", ["dog"] * 10) == 0.0


def test_vqa_accuracy_fewer_answers():
    assert vqa_accuracy("Yes", ["yes"]) == 1.0
    assert vqa_accuracy("no", ["yes"]) == 0.0
    assert vqa_accuracy("red", ["red", "blue", "blue", "green"]) == pytest.approx(1 / 3)

"""Outcomes, golden facts and criteria: parsing, classification from raw facts, exact early
decisions (checked against brute-force enumeration) and task facts vs scikit-learn."""

from __future__ import annotations

import itertools
import json
import sqlite3

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from flipguard.errors import FlipguardError
from flipguard.inject import (
    CLASSES,
    ClassificationTask,
    DetectionTask,
    Golden,
    Outcome,
    classify,
    parse_criterion,
)


def _score_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x - y).flatten(1).abs().amax(1)


def test_parse_criterion_texts_and_errors():
    assert parse_criterion(None).text == "accuracy-drop:0.01"
    assert parse_criterion(" Auroc-Drop:0.05 ").text == "auroc-drop:0.05"
    assert parse_criterion("mismatch:0").delta == 0.0
    assert parse_criterion("any-flip").text == "any-flip"
    crit = parse_criterion("accuracy-drop:0.2")
    assert parse_criterion(crit) is crit
    for bad in ("accuracy", "accuracy-drop", "accuracy-drop:x", "auroc-drop:1.5",
                "any-flip:0.1", "bogus:0.1", "mismatch:nan"):
        with pytest.raises(FlipguardError) as exc:
            parse_criterion(bad)
        msg = str(exc.value)
        assert "criterion" in msg and "\n" not in msg


@pytest.mark.parametrize(("text", "outcome", "golden", "expected"), [
    ("accuracy-drop:0.01", Outcome(noop=True, masked=True), Golden(accuracy=0.9), "masked"),
    ("accuracy-drop:0.01", Outcome(masked=True, accuracy=0.0), Golden(accuracy=0.9), "masked"),
    ("accuracy-drop:0.01", Outcome(n_changed=3, accuracy=0.895), Golden(accuracy=0.9),
     "sdc-benign"),
    ("accuracy-drop:0.01", Outcome(n_changed=3, accuracy=0.88), Golden(accuracy=0.9),
     "sdc-critical"),
    ("accuracy-drop:0.01", Outcome(n_changed=1, accuracy=0.9, nonfinite_scores=True),
     Golden(accuracy=0.9), "non-finite"),
    ("any-flip", Outcome(n_changed=2, flips_to_anomalous=0, flips_to_normal=0), Golden(),
     "sdc-benign"),
    ("any-flip", Outcome(n_changed=2, flips_to_anomalous=1, flips_to_normal=0), Golden(),
     "sdc-critical"),
    ("auroc-drop:0.02", Outcome(n_changed=2, auroc=0.87), Golden(auroc=0.9), "sdc-critical"),
    ("auroc-drop:0.02", Outcome(n_changed=2, auroc=0.89), Golden(auroc=0.9), "sdc-benign"),
    ("mismatch:0.1", Outcome(n_changed=5, mismatches=2),
     Golden(kind="classification", n_images=10), "sdc-critical"),
    ("mismatch:0.2", Outcome(n_changed=5, mismatches=2),
     Golden(kind="classification", n_images=10), "sdc-benign"),
    ("mismatch:0.2", Outcome(n_changed=5, mismatches=0, nonfinite_outputs=True),
     Golden(kind="classification", n_images=10), "non-finite"),
])
def test_classify_from_raw_facts(text, outcome, golden, expected):
    crit = parse_criterion(text)
    assert crit.classify(outcome, golden) == expected
    assert classify(outcome, golden, text) == expected
    assert expected in CLASSES
    assert crit.is_critical(outcome, golden) == (expected in ("sdc-critical", "non-finite"))


def test_outcome_round_trips_json_and_sqlite():
    o = Outcome(n_images=7, n_changed=3, early_stopped=True, nonfinite_scores=True,
                flips_to_anomalous=2, flips_to_normal=0, accuracy=0.5, f1=0.25, auroc=None,
                max_abs_dscore=float("inf"))
    d = o.to_dict()
    assert all(v is None or isinstance(v, bool | int | float) for v in d.values())
    assert Outcome.from_dict(json.loads(json.dumps(d))) == o
    con = sqlite3.connect(":memory:")
    cols = list(d)
    con.execute(f"create table t ({', '.join(cols)})")
    con.execute(f"insert into t values ({', '.join('?' * len(cols))})", [d[c] for c in cols])
    row = dict(zip(cols, con.execute("select * from t").fetchone(), strict=True))
    assert isinstance(row["early_stopped"], int)  # SQLite stores bools as 0/1
    back = Outcome.from_dict({**row, "layer": "ignored"})
    assert back == o and back.early_stopped is True
    g = Golden(kind="detection", n_images=4, accuracy=0.75, f1=0.5, auroc=0.6, threshold=0.3,
               n_anomalous=2, facts=np.zeros(4), labels=np.zeros(4))
    g2 = Golden.from_dict(json.loads(json.dumps(g.to_dict())))
    assert g2.accuracy == 0.75 and g2.threshold == 0.3 and g2.facts is None


def test_detection_facts_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    task = DetectionTask(_score_fn, 0.5, labels)
    g_scores = rng.random(40)
    golden = task.golden(g_scores, False)
    assert golden.accuracy == pytest.approx(accuracy_score(labels, g_scores > 0.5), abs=0)
    assert golden.auroc == pytest.approx(roc_auc_score(labels, g_scores), abs=1e-12)
    assert np.array_equal(golden.decisions, g_scores > 0.5)
    f_scores = g_scores + rng.normal(0, 0.2, 40)
    f_scores[3] = np.nan
    out = task.outcome_fields(f_scores, golden)
    pred = ~np.isfinite(f_scores) | (f_scores > 0.5)
    gpred = g_scores > 0.5
    assert out["accuracy"] == pytest.approx(accuracy_score(labels, pred), abs=0)
    assert out["f1"] == pytest.approx(f1_score(labels, pred), abs=1e-12)
    ranked = np.where(np.isfinite(f_scores), f_scores, 1e300)  # non-finite ranks on top
    assert out["auroc"] == pytest.approx(roc_auc_score(labels, ranked), abs=1e-12)
    assert out["flips_to_anomalous"] == int((pred & ~gpred).sum())
    assert out["flips_to_normal"] == int((~pred & gpred).sum())
    assert out["nonfinite_scores"] is True and out["max_abs_dscore"] == float("inf")
    fin = np.isfinite(f_scores)
    out2 = task.outcome_fields(np.where(fin, f_scores, g_scores), golden)
    assert out2["max_abs_dscore"] == pytest.approx(np.abs(f_scores[fin] - g_scores[fin]).max())
    assert out2["nonfinite_scores"] is False


def test_classification_facts():
    labels = np.array([0, 1, 2, 1])
    task = ClassificationTask(labels)
    logits = torch.tensor([[3.0, 0, 0], [0, 2.0, 0], [1.0, 0, 0], [0, 0, 5.0]])
    facts = task.image_facts(torch.zeros(4, 1), logits).numpy()
    assert facts.tolist() == [0, 1, 0, 2]
    golden = task.golden(facts, False)
    assert golden.accuracy == 0.5
    out = task.outcome_fields(np.array([0, 1, 2, 1]), golden)
    assert out == {"mismatches": 2, "accuracy": 1.0}
    with pytest.raises(FlipguardError, match="labels"):
        ClassificationTask(np.zeros((2, 2))).check(2)
    with pytest.raises(FlipguardError, match="labels: expected one label per input"):
        task.check(5)


def _completions(task, golden, facts, remaining, choices):
    """Every way the remaining images could turn out (finite values only)."""
    idx = np.flatnonzero(remaining)
    for combo in itertools.product(choices, repeat=idx.size):
        f = facts.copy()
        f[idx] = combo
        yield f


@pytest.mark.parametrize("text", ["accuracy-drop:0.1", "accuracy-drop:0.3", "auroc-drop:0.1",
                                  "any-flip"])
def test_early_certainty_is_exact_for_detection(text):
    """certain() <=> every completion of the remaining images is critical."""
    crit = parse_criterion(text)
    rng = np.random.default_rng(1)
    n, thr = 8, 0.5
    seen = set()
    for trial in range(60):
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        task = DetectionTask(_score_fn, thr, labels)
        golden = task.golden(rng.random(n), False)
        remaining = np.zeros(n, dtype=bool)
        remaining[n - 1 - trial % 4:] = True
        facts = golden.facts.copy()
        ev = ~remaining
        facts[ev] = rng.random(int(ev.sum()))
        part = Outcome(n_changed=1, **task.outcome_fields(facts, golden))
        certain = crit.certain(part, golden, remaining, facts)
        # any-flip/accuracy only see the side of the threshold; AUROC needs extreme ranks
        choices = (-1e9, 0.25, 0.75, 1e9)
        verdicts = [crit.is_critical(Outcome(n_changed=1, **task.outcome_fields(f, golden)),
                                     golden)
                    for f in _completions(task, golden, facts, remaining, choices)]
        assert certain == all(verdicts), (trial, certain, verdicts)
        seen.add(certain)
        if certain:  # the stored partial outcome keeps the verdict
            assert crit.is_critical(part, golden)
    assert seen == {True, False}  # both verdicts occur


def test_early_certainty_for_classifier_and_nonfinite():
    task = ClassificationTask(np.array([0, 1, 2, 0, 1]))
    golden = task.golden(np.array([0, 1, 2, 0, 1]), False)
    remaining = np.array([False, False, True, True, True])
    crit = parse_criterion("mismatch:0.3")
    facts = np.array([1, 0, 2, 0, 1])
    o = Outcome(n_changed=2, **task.outcome_fields(facts, golden))
    assert crit.certain(o, golden, remaining, facts)  # 2/5 > 0.3 already
    o1 = Outcome(n_changed=1, **task.outcome_fields(np.array([1, 1, 2, 0, 1]), golden))
    assert not crit.certain(o1, golden, remaining, np.array([1, 1, 2, 0, 1]))
    acc = parse_criterion("accuracy-drop:0.3")
    assert acc.certain(o, golden, remaining, facts)  # at best 3/5 correct: drop 0.4
    assert not acc.certain(o1, golden, remaining, np.array([1, 1, 2, 0, 1]))
    nf = Outcome(n_changed=1, nonfinite_outputs=True, mismatches=0, accuracy=1.0)
    assert crit.certain(nf, golden, remaining, golden.facts)
    assert not crit.certain(Outcome(masked=True), golden, remaining, golden.facts)

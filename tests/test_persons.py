"""A person's answer adds up their posts' evidence, the prior counting once: calibration cannot collapse it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, matthews_corrcoef

from mbti_lightning import calibration, evaluation, persons
from mbti_lightning.predict import per_author


def weak_posts(n_persons: int, posts: int, share: float, seed: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """A class-balanced model's (rows, 2) logits for persons (`share` of them class 0), each with `posts` weak posts
    (log-odds 0.3 toward the person's class, noise 1, and a lean of the person's own shared by their posts, so
    that they are not independent): what a briefly trained model gives on real text."""
    rng = np.random.default_rng(seed)
    person_labels = (rng.random(n_persons) > share).astype(int)
    person = np.repeat(np.arange(n_persons), posts)
    labels = person_labels[person]
    lean = rng.normal(0, 0.3, n_persons)[person]
    z = np.where(labels == 1, 0.3, -0.3) + lean + rng.normal(0, 1, len(labels))
    return torch.tensor(np.stack([np.zeros_like(z), z], 1)), labels, person


def person_scores(votes: np.ndarray, labels: np.ndarray, person: np.ndarray) -> tuple[float, float]:
    truth = np.bincount(person, weights=labels) / np.bincount(person) > 0.5
    return matthews_corrcoef(truth, votes), f1_score(truth, votes, average="macro")


def test_calibrated_persons_on_a_skewed_axis_keep_the_raw_models_skill():
    """86/14, 50 weak posts a person: with calibration (which puts the 86/14 prior into every post's scores) the
    per-person MCC and macro-F1 are not below the raw model's; the mean of the posts' log-odds, as before, gave
    every person the majority letter (MCC 0). Checked with scikit-learn on the votes."""
    val_logits, val_labels, _ = weak_posts(100, 50, 0.86, seed=1)
    cal = calibration.fit(val_logits, torch.as_tensor(val_labels))
    assert cal.offsets and cal.offsets[1] < -1  # the prior of the minority class went into the scores

    logits, labels, person = weak_posts(200, 50, 0.86, seed=2)
    uniform = persons.Persons.uniform(2).log_prior  # the class-balanced model's prior
    raw = person_scores(persons.votes(logits.log_softmax(-1).numpy(), person, uniform), labels, person)
    calibrated_log_probs = cal(logits).log_softmax(-1).numpy()
    prior = persons.calibrated_prior(uniform, cal)
    calibrated = person_scores(persons.votes(calibrated_log_probs, person, prior), labels, person)
    assert raw[0] > 0.4 and calibrated[0] >= raw[0] - 0.02 and calibrated[1] >= raw[1] - 0.02

    mean_votes = np.zeros((200, 2))
    np.add.at(mean_votes, person, calibrated_log_probs)  # the old rule: the prior at full strength
    assert person_scores(mean_votes.argmax(1), labels, person)[0] == 0


def test_the_prior_of_a_class_weighted_model_is_its_shares_times_its_weights():
    counts = torch.tensor([86.0, 14.0])
    balanced = counts.sum() / (2 * counts)
    assert persons.trained_prior(counts, balanced).exp().tolist() == pytest.approx([0.5, 0.5])
    assert persons.trained_prior(counts, torch.ones(2)).exp().tolist() == pytest.approx([0.86, 0.14])


def test_a_persons_probability_is_calibrated_on_validation_persons_and_predict_gives_the_same_answer():
    val_logits, val_labels, val_person = weak_posts(100, 50, 0.5, seed=3)
    uniform = persons.Persons.uniform(2).log_prior
    rule = persons.fit(val_logits.log_softmax(-1), val_labels, val_person, uniform)
    assert rule.calibrated and rule.temperature > 1  # 50 posts of one person are not 50 independent witnesses
    logits, labels, person = weak_posts(100, 50, 0.5, seed=4)
    before = evaluation.person_calibration(persons.Persons(uniform), logits.log_softmax(-1), labels, person)
    after = evaluation.person_calibration(rule, logits.log_softmax(-1), labels, person)
    assert after["ece"] < before["ece"]

    _, counts, probs = per_author(person.tolist(), {"J-P": logits.log_softmax(-1).float()}, {"J-P": rule})
    votes, _ = evaluation.person_votes(logits.log_softmax(-1).numpy(), labels, person, uniform)
    assert counts.tolist() == [50] * 100 and probs["J-P"].argmax(-1).tolist() == votes.tolist()


def test_too_few_validation_persons_leave_a_persons_probability_uncalibrated():
    val_logits, val_labels, val_person = weak_posts(persons.MIN_PERSONS - 1, 5, 0.5, seed=5)
    rule = persons.fit(val_logits.log_softmax(-1), val_labels, val_person, persons.Persons.uniform(2).log_prior)
    assert not rule.calibrated


def test_offsets_that_lower_the_held_out_mcc_are_rejected_and_the_reason_is_given():
    """86/14 with weak posts: the offsets that restore the prior turn almost every post to the majority letter, so
    per post MCC and balanced accuracy fall on held-out validation persons; calibration keeps less, and says why."""
    logits, labels, person = weak_posts(200, 10, 0.86, seed=6)
    outputs = evaluation.SplitOutputs({"N-S": logits.float()}, labels[:, None], person)
    full = calibration.fit(logits, torch.as_tensor(labels))
    assert full.offsets  # fitted on every row, the offsets do lower the NLL there
    (cal,) = evaluation.calibrate(outputs, fit=True).values()
    assert cal.decision["kept"] != "temperature and offsets" and not cal.offsets
    assert "not temperature and offsets (lowered mcc" in cal.decision["why"]
    held = cal.decision["held_out"]
    assert held["temperature and offsets"]["mcc"] < held["none"]["mcc"]


def test_the_reports_per_person_figures_are_scikit_learns_on_the_same_votes():
    logits, labels, person = weak_posts(60, 8, 0.7, seed=7)
    outputs = evaluation.SplitOutputs({"J-P": logits.float()}, labels[:, None], person)
    uniform = persons.Persons.uniform(2).log_prior
    figures = evaluation.figures({"J-P": ("J", "P")}, outputs, {}, resamples=50, priors={"J-P": uniform})
    votes, truth = evaluation.person_votes(logits.log_softmax(-1).numpy(), labels, person, uniform)
    people = figures["J-P"]["people"]["model"]
    assert people["mcc"]["value"] == pytest.approx(matthews_corrcoef(truth, votes))
    assert people["macro_f1"]["value"] == pytest.approx(f1_score(truth, votes, average="macro"))


def test_the_persons_temperature_is_fitted_on_persons_with_several_posts_only():
    """Single-post persons' scores are a post's, not a sum's: adding many of them must not move the temperature."""
    logits, labels, person = weak_posts(40, 20, 0.5, seed=3)
    prior = persons.Persons.uniform(2).log_prior
    alone = persons.fit(logits.log_softmax(-1), labels, person, prior)
    singles, single_labels, _ = weak_posts(400, 1, 0.5, seed=4)
    both = persons.fit(
        torch.cat([logits, 5 * singles]).log_softmax(-1),  # overconfident single posts: a lower temperature's pull
        np.concatenate([labels, single_labels]),
        np.concatenate([person, 40 + np.arange(400)]),
        prior,
    )
    assert alone.calibrated and both.temperature == pytest.approx(alone.temperature, rel=1e-6)


def test_a_split_of_one_person_is_named_not_a_traceback():
    from mbti_lightning.errors import UserError

    one = np.ones((1, 4))
    with pytest.raises(UserError, match="the split scored has 1 person: an interval that resamples persons needs two"):
        evaluation.scored({"model": one.reshape(1, 2, 2)}, 100, 0)

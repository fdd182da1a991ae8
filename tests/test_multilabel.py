"Multi-label metrics of the Unified V3 chapter against scikit-learn, absent labels, the fastai metrics and the recipe file."
import math

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

from fundus_lab.data import UNIFIED_LABELS
from fundus_lab.multilabel import (FASTAI_MULTILABEL_METRICS, UNIFIED_CONFIG, fastai_multilabel_metrics,
                                   multilabel_metrics, odir_score, tune_thresholds)


@pytest.fixture
def scored():
    rng = np.random.default_rng(3)
    flags = (rng.random((120, 7)) < 0.2).astype(int)
    probs = np.clip(0.4 * flags + 0.6 * rng.random((120, 7)), 0, 1)
    return flags, probs


def test_metrics_match_scikit_learn(scored):
    flags, probs = scored
    thresholds = tune_thresholds(flags, probs)
    result = multilabel_metrics(flags, probs, thresholds)
    predicted = (probs >= thresholds).astype(int)
    assert result["macro_f1"] == pytest.approx(f1_score(flags, predicted, average="macro", zero_division=0))
    assert result["micro_f1"] == pytest.approx(f1_score(flags, predicted, average="micro", zero_division=0))
    assert result["auc_macro"] == pytest.approx(roc_auc_score(flags, probs, average="macro"))
    assert set(result["per_label"]) == set(UNIFIED_LABELS)


def test_odir_score_is_the_challenge_formula(scored):
    flags, probs = scored
    gt, pr = flags.ravel(), probs.ravel()
    kappa, f1, auc = cohen_kappa_score(gt, pr > 0.5), f1_score(gt, pr > 0.5, average="micro"), roc_auc_score(gt, pr)
    assert odir_score(flags, probs)["score"] == pytest.approx((kappa + f1 + auc) / 3)


def test_absent_label_gives_nan_auc_not_a_crash(scored):
    flags, probs = scored
    flags = flags.copy(); flags[:, 2] = 0
    result = multilabel_metrics(flags, probs)
    assert math.isnan(result["per_label"]["C"]["auc"]) and math.isfinite(result["auc_macro"])
    assert tune_thresholds(flags, probs, default=0.3)[2] == pytest.approx(0.3)


def test_logits_are_refused_with_advice(scored):
    flags, probs = scored
    with pytest.raises(ValueError, match="sigmoid"): multilabel_metrics(flags, probs * 10 - 5)


def test_fastai_metrics_equal_direct_metrics(scored):
    flags, probs = scored
    logits = torch.logit(torch.tensor(probs).clamp(1e-6, 1 - 1e-6)).float()
    expected = multilabel_metrics(flags, torch.sigmoid(logits))
    for metric in fastai_multilabel_metrics():
        metric.reset()
        metric.accum_values(torch.sigmoid(logits), torch.tensor(flags).float())
        assert metric.value == pytest.approx(expected[metric.name], abs=1e-6)
    assert [m.name for m in fastai_multilabel_metrics()] == list(FASTAI_MULTILABEL_METRICS)


def test_recipe_file():
    recipe = yaml.safe_load(UNIFIED_CONFIG.read_text())
    assert (recipe["task"], recipe["model_name"], recipe["image_size"], recipe["dropout"]) == ("multilabel", "convnext_base", 448, 0.3)
    from fundus_lab.experiments import load_training_config
    assert load_training_config("unified_v3")["loss"] == "adaptive_focal"

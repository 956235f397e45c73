"""Membership inference: can an observer tell the forget set from data the model never
saw? Two scores per sequence, both over its target tokens (a QA record's response, every
token of a text window):

- Min-K% Prob (Shi et al., 2024): the mean of the k% lowest log p(x_i | x_<i).
- Min-K%++ (Zhang et al., 2024): the same over each token's log-probability standardised
  by the model's own distribution at that position,
      (log p(x_i | x_<i) - mu_i) / sigma_i,  mu_i = E_{z~p}[log p(z)],
      sigma_i^2 = E_{z~p}[(log p(z))^2] - mu_i^2.
Members tend to score higher. The AUC of a score between members (the forget set) and
non-members (a holdout set from the same distribution) is how well it tells them apart:
0.5 is chance. PrivLeak (MUSE): (AUC_unlearned - AUC_reference) / AUC_reference, against a
model that never saw the forget set.
"""

from __future__ import annotations

from typing import Any

import torch

from core.engine.data import Example, Records, collate, encode_records
from core.engine.losses import IGNORE_INDEX


def min_k_scores(token_logp: torch.Tensor, mask: torch.Tensor, k: float) -> torch.Tensor:
    """Per sequence, the mean of the k share (0 < k <= 1) of its lowest values.

    token_logp, mask: [B, T]; the values where mask is False do not count. Returns [B]
    (NaN for a sequence with no counted value). At least one value counts per sequence."""
    masked = token_logp.masked_fill(~mask, float("inf"))
    ordered = masked.sort(dim=1).values  # lowest first; the masked-out ones last
    counts = mask.sum(dim=1)
    take = (counts.float() * k).ceil().clamp(min=1).long()  # [B]
    positions = torch.arange(ordered.shape[1], device=ordered.device)[None, :]
    chosen = positions < take[:, None]
    sums = ordered.masked_fill(~chosen, 0.0).sum(dim=1)
    scores = sums / take
    return scores.masked_fill(counts == 0, float("nan"))


@torch.no_grad()
def sequence_scores(
    model: Any, tokenizer: Any, examples: list[Example], *, k: float = 0.2, batch_size: int = 16
) -> dict[str, list[float]]:
    """Min-K% and Min-K%++ of each example, over its target tokens."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, list[float]] = {"min_k": [], "min_k_plus_plus": []}
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id)
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        ).logits.float()
        labels = batch["labels"].to(device)
        mask = labels != IGNORE_INDEX
        logp_all = torch.log_softmax(logits, dim=-1)  # [B, T, V]
        target = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T]
        probs = logp_all.exp()
        mu = (probs * logp_all).sum(-1)
        sigma = ((probs * logp_all.square()).sum(-1) - mu.square()).clamp(min=1e-12).sqrt()
        out["min_k"] += min_k_scores(target, mask, k).tolist()
        out["min_k_plus_plus"] += min_k_scores((target - mu) / sigma, mask, k).tolist()
    model.train(was_training)
    return out


def auc(member_scores: list[float], non_member_scores: list[float]) -> float:
    """ROC AUC of telling members (higher scores) from non-members (scikit-learn's)."""
    from sklearn.metrics import roc_auc_score

    labels = [1] * len(member_scores) + [0] * len(non_member_scores)
    return float(roc_auc_score(labels, list(member_scores) + list(non_member_scores)))


def membership_inference(
    model: Any,
    tokenizer: Any,
    members: Records,
    non_members: Records,
    *,
    max_length: int,
    k: float = 0.2,
    max_samples: int = 500,
    batch_size: int = 16,
) -> dict[str, Any]:
    """AUC of Min-K% and Min-K%++ between the forget set (members) and a holdout set of
    the same kind (non-members), with the settings used."""
    sets = {}
    for name, records in (("members", members), ("non_members", non_members)):
        subset = Records(records.kind, records.items[:max_samples], records.lines[:max_samples])
        examples = encode_records(subset, tokenizer, max_length).examples
        sets[name] = sequence_scores(model, tokenizer, examples, k=k, batch_size=batch_size)
    result: dict[str, Any] = {
        "k": k,
        "members": len(sets["members"]["min_k"]),
        "non_members": len(sets["non_members"]["min_k"]),
    }
    for score in ("min_k", "min_k_plus_plus"):
        result[f"{score}_auc"] = auc(sets["members"][score], sets["non_members"][score])
    return result


def privleak(auc_unlearned: float, auc_reference: float) -> float:
    """MUSE's PrivLeak, (AUC_unlearned - AUC_reference) / AUC_reference: 0 when the
    unlearned model leaks membership as little as a model that never saw the data."""
    return (auc_unlearned - auc_reference) / auc_reference

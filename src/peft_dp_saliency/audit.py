"""Empirical privacy audit: canaries, membership scores, and lower bounds on epsilon.

The audit inserts canaries into the sensitive set, trains with the real pipeline, and runs a
membership-inference attack on inserted vs held-out canaries. Each canary is inserted by its
own fair coin, independently of the others: the setting of Steinke, Nasr & Jagielski (2023,
"Privacy auditing with one (1) training run"), where one training run gives a rigorous bound.
Two bounds are reported, both at confidence 1 - alpha:

- ``eps_lb_one_run`` (rigorous, the headline): the attacker guesses "member" for the k highest
  scores and "non-member" for the k lowest and abstains on the rest. Under (eps, delta)-DP the
  number of correct guesses W out of r = 2k satisfies (their Theorem 5.2)

      P[W >= v] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta max_i P[v > B >= v - i] / i,

  so eps_lb_one_run is the largest eps whose p-value is below alpha. A few k are tried, each at
  level alpha / (number of k) (Bonferroni), so choosing k costs nothing extra.
- ``eps_lb`` (the usual one-run heuristic of Jagielski et al. 2020 / Nasr et al. 2021): a DP
  guarantee gives FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta for every
  threshold, so an attack's measured rates turn into

      eps_lb = max(log((1 - delta - FPR_up) / FNR_up), log((1 - delta - FNR_up) / FPR_up), 0)

  with one-sided Clopper-Pearson upper bounds FPR_up, FNR_up (each at level alpha/2). The
  threshold is chosen on one half of the canaries and evaluated on the other half. The
  interval treats canaries of one run as independent trials, which they are not (Jagielski et
  al. train one model per trial): a heuristic, kept because the literature reports it.

Scores (higher = "more likely a member"), from the per-example diffusion loss averaged over
fixed (timestep, noise) pairs shared by all canaries and models:

- ``loss``: minus the trained model's loss;
- ``loss_gain``: the public model's loss minus the trained model's (calibrates each canary's
  own difficulty, as in Carlini et al.'s reference-model attacks; the public model is public);
- ``loss_ratio``: log(public loss / trained loss), the same calibration on a relative scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from scipy import stats

from .diffusion import EncodedDataset


# ---------------------------------------------------------------------------------------------
# Canaries


@dataclass
class Canaries:
    """m canary images with labels, which of them are inserted, and the threshold/evaluation split.

    images: m RGB PIL images (R x R); labels: (m,) int64 class indices;
    inserted: (m,) bool, an independent fair coin per canary (about half True);
    tuning: (m,) bool, the half used to choose the attack threshold (balanced within
    inserted and held-out canaries); the other half gives the bound;
    new_class_names: names of classes added for the canaries (labels from the number of
    existing classes on), empty when the canaries use the existing classes.
    """

    images: list
    labels: torch.Tensor
    inserted: torch.Tensor
    tuning: torch.Tensor
    new_class_names: list

    def __len__(self) -> int:
        return len(self.images)


def random_pattern_images(count: int, resolution: int, grid: int = 8,
                          generator: torch.Generator | None = None) -> list[Image.Image]:
    """`count` distinct images of grid x grid random RGB blocks, upscaled (nearest) to resolution.

    Out of distribution for clothing photos and for emoji; two such images coincide with
    probability 256^(-3 grid^2), and distinctness is checked anyway.
    """
    blocks = torch.randint(0, 256, (count, grid, grid, 3), generator=generator, dtype=torch.uint8)
    if len({bytes(b.numpy().tobytes()) for b in blocks}) != count:
        raise RuntimeError("two canaries coincide; use another seed")
    return [Image.fromarray(b.numpy(), mode="RGB").resize((resolution, resolution), Image.NEAREST)
            for b in blocks]


def make_canaries(count: int, resolution: int, num_classes: int, seed: int,
                  own_classes: bool = False, grid: int = 8) -> Canaries:
    """`count` random-pattern canaries (grid x grid blocks), each inserted by its own fair coin.

    Labels: round-robin over the `num_classes` existing classes, or with `own_classes` one new
    class per canary ("canary <i>", so its own prompt): a stronger canary, since the model can
    tie the image to a prompt no other example uses. Class names are public, data-independent.
    """
    if count < 4:
        raise ValueError(f"at least 4 canaries are needed (2 per side of the split), got {count}")
    generator = torch.Generator().manual_seed(seed)
    images = random_pattern_images(count, resolution, grid, generator)
    labels = num_classes + torch.arange(count) if own_classes else torch.arange(count) % num_classes
    new_class_names = [f"canary {i}" for i in range(count)] if own_classes else []
    inserted = torch.rand(count, generator=generator) < 0.5
    tuning = torch.zeros(count, dtype=torch.bool)
    for group in (inserted, ~inserted):  # half of the inserted and half of the held-out canaries
        members = group.nonzero().flatten()
        tuning[members[torch.randperm(len(members), generator=generator)[: len(members) // 2]]] = True
    return Canaries(images, labels, inserted, tuning, new_class_names)


# ---------------------------------------------------------------------------------------------
# Scores


@torch.no_grad()
def mean_diffusion_loss(family, denoiser, noise_scheduler, data: EncodedDataset, timesteps: list[int],
                        noises_per_timestep: int, seed: int, batch_size: int = 64) -> torch.Tensor:
    """(m,) per-example diffusion loss of the family's denoiser, averaged over fixed (timestep, noise) pairs.

    timesteps are on the training scale 0..num_train_timesteps (flow families: sigma = t / that). The
    pairs depend only on (seed, example index), so two models are scored on the same ones.
    """
    generator = torch.Generator().manual_seed(seed)
    latents = data.latents
    total = torch.zeros(len(data), dtype=torch.float64)
    pairs = 0
    for t in timesteps:
        for _ in range(noises_per_timestep):
            noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
            for idx in torch.arange(len(data)).split(batch_size):
                batch_latents, conditioning = data.batch(idx.to(latents.device))
                steps = family.fixed_timesteps(t, len(idx), latents.device)
                loss = family.per_sample_loss(denoiser, noise_scheduler, batch_latents, conditioning,
                                              noise[idx.to(latents.device)], steps)
                total[idx] += loss.double().cpu()
            pairs += 1
    return (total / pairs).float()


def membership_scores(trained_loss: torch.Tensor, public_loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Attack statistics, higher = more likely a member (each (m,))."""
    return {"loss": -trained_loss, "loss_gain": public_loss - trained_loss,
            "loss_ratio": torch.log(public_loss / trained_loss)}


# ---------------------------------------------------------------------------------------------
# From an attack to a lower bound on epsilon


def clopper_pearson_upper(failures: int, trials: int, alpha: float) -> float:
    """One-sided upper confidence bound (level 1 - alpha) on a binomial rate from `failures`/`trials`."""
    if trials <= 0:
        return 1.0
    if failures >= trials:
        return 1.0
    return float(stats.beta.ppf(1 - alpha, failures + 1, trials - failures))


def epsilon_lower_bound(false_positives: int, negatives: int, false_negatives: int, positives: int,
                        delta: float, alpha: float = 0.05) -> float:
    """eps_lb (nats, >= 0) implied by an attack's errors, valid with confidence 1 - alpha."""
    fpr_up = clopper_pearson_upper(false_positives, negatives, alpha / 2)
    fnr_up = clopper_pearson_upper(false_negatives, positives, alpha / 2)
    bounds = [0.0]
    for numerator, denominator in ((1 - delta - fpr_up, fnr_up), (1 - delta - fnr_up, fpr_up)):
        if numerator > 0 and denominator > 0:
            bounds.append(math.log(numerator / denominator))
    return max(bounds)


def _errors(scores: np.ndarray, members: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """(false positives, negatives, false negatives, positives) of "member iff score >= threshold"."""
    guess = scores >= threshold
    return (int((guess & ~members).sum()), int((~members).sum()),
            int((~guess & members).sum()), int(members.sum()))


def best_threshold(scores: np.ndarray, members: np.ndarray, delta: float, alpha: float) -> float:
    """The threshold (among the scores, +inf) with the largest eps_lb on these canaries
    (ties, e.g. all 0, broken by the largest TPR - FPR)."""
    candidates = np.append(np.unique(scores), np.inf)

    def quality(threshold):  # eps_lb first, then TPR - FPR among thresholds with equal eps_lb
        fp, neg, fn, pos = _errors(scores, members, threshold)
        return epsilon_lower_bound(fp, neg, fn, pos, delta, alpha), (pos - fn) / pos - fp / neg

    return float(max(candidates, key=quality))


def auc(scores: np.ndarray, members: np.ndarray) -> float:
    """Area under the ROC curve (probability a member outscores a non-member; ties count 1/2)."""
    pos, neg = scores[members], scores[~members]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


# Guesses per side (as fractions of m) tried by the one-run bound; fixed in advance, so the
# Bonferroni correction over them is what makes picking the best one honest.
ONE_RUN_GUESS_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


def one_run_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P[>= `correct` right out of `guesses`] under (epsilon, delta)-DP with `canaries` independent
    fair inclusion coins (Steinke, Nasr & Jagielski 2023, Theorem 5.2); written out here because
    dp_accounting and Opacus have no auditing code."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}")
    accuracy = 1 / (1 + math.exp(-epsilon))  # randomized response at epsilon
    tail = float(stats.binom.sf(correct - 1, guesses, accuracy))
    if delta == 0 or correct == 0:
        return min(tail, 1.0)
    # max over i in 1..v of P[v > Binomial >= v - i] / i
    below = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, accuracy)
    spread = float(np.max(np.cumsum(below) / np.arange(1, correct + 1)))
    return min(tail + 2 * canaries * delta * spread, 1.0)


def one_run_epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float,
                                alpha: float = 0.05, tolerance: float = 1e-4) -> float:
    """The largest epsilon (nats, >= 0) that `correct` right guesses out of `guesses` reject at
    level alpha; rounded down to `tolerance`, so never above the exact bound."""
    if one_run_p_value(canaries, guesses, correct, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0  # p(low) < alpha <= p(high); the p-value grows with epsilon
    while one_run_p_value(canaries, guesses, correct, high, delta) < alpha:
        low, high = high, 2 * high
    while high - low > tolerance:
        middle = (low + high) / 2
        low, high = (middle, high) if one_run_p_value(canaries, guesses, correct, middle, delta) < alpha \
            else (low, middle)
    return low


def one_run_attack(scores: np.ndarray, members: np.ndarray, delta: float,
                   alpha: float = 0.05) -> tuple[float, int, int]:
    """(eps_lb_one_run, guesses, correct guesses) of the best k in ONE_RUN_GUESS_FRACTIONS:
    "member" for the k highest scores, "non-member" for the k lowest, each k at level alpha / 5."""
    order = np.argsort(-scores, kind="stable")
    best = (0.0, 0, 0)
    for fraction in ONE_RUN_GUESS_FRACTIONS:
        k = max(1, int(len(scores) * fraction))
        correct = int(members[order[:k]].sum() + (~members[order[-k:]]).sum())
        bound = one_run_epsilon_lower_bound(len(scores), 2 * k, correct, delta,
                                            alpha / len(ONE_RUN_GUESS_FRACTIONS))
        best = max(best, (bound, 2 * k, correct))
    return best


@dataclass
class AttackResult:
    """One statistic's attack. eps_lb_one_run: the rigorous one-run bound over all canaries, from
    one_run_guesses guesses of which one_run_correct were right. AUC on all canaries. Threshold
    from the tuning half; on the evaluation half its TPR/FPR and the Clopper-Pearson eps_lb
    (heuristic). eps_lb_all_canaries chooses and evaluates the threshold on all canaries:
    optimistic (selection not accounted), for reference. All bounds at confidence 1 - alpha."""

    statistic: str
    eps_lb_one_run: float
    one_run_guesses: int
    one_run_correct: int
    auc: float
    threshold: float
    tpr: float
    fpr: float
    eps_lb: float
    eps_lb_all_canaries: float
    evaluation_members: int
    evaluation_non_members: int

    def to_dict(self) -> dict:
        data = asdict(self)
        data["threshold"] = data["threshold"] if math.isfinite(data["threshold"]) else "inf"
        return data


def attack(statistic: str, scores: torch.Tensor, canaries: Canaries, delta: float,
           alpha: float = 0.05) -> AttackResult:
    """The one-run bound on all canaries, and the threshold attack with honest threshold selection
    (tuning half -> evaluation half)."""
    scores_np, members = scores.double().numpy(), canaries.inserted.numpy()
    tune, evaluate = canaries.tuning.numpy(), ~canaries.tuning.numpy()
    threshold = best_threshold(scores_np[tune], members[tune], delta, alpha)
    fp, neg, fn, pos = _errors(scores_np[evaluate], members[evaluate], threshold)
    all_threshold = best_threshold(scores_np, members, delta, alpha)
    one_run_bound, guesses, correct = one_run_attack(scores_np, members, delta, alpha)
    return AttackResult(
        statistic=statistic, eps_lb_one_run=one_run_bound, one_run_guesses=guesses,
        one_run_correct=correct, auc=auc(scores_np, members), threshold=threshold,
        tpr=(pos - fn) / pos, fpr=fp / neg, eps_lb=epsilon_lower_bound(fp, neg, fn, pos, delta, alpha),
        eps_lb_all_canaries=epsilon_lower_bound(*_errors(scores_np, members, all_threshold), delta, alpha),
        evaluation_members=pos, evaluation_non_members=neg)


def max_provable_epsilon(members: int, non_members: int, delta: float, alpha: float = 0.05) -> float:
    """The largest eps_lb any attack can show with this many evaluation canaries (a perfect attack)."""
    return epsilon_lower_bound(0, non_members, 0, members, delta, alpha)

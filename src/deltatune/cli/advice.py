"""Warnings after a run that learnt (next to) nothing, naming the flags to try.

A few dozen rows with the defaults give a few optimizer steps: the loss barely moves and the held-out
accuracy stays where always answering the most common label would put it. Nothing fails, so without a
warning the user reads the numbers as "the method does not work on my data". Two checks:

- the training loss fell by less than :data:`MIN_LOSS_DROP` (relative) from the first epoch to the last;
- (classification) the held-out accuracy is not clearly above chance: a one-sided binomial test against
  the best constant answer's accuracy on the same test set, at level :data:`ALPHA`. On a small test set
  that also covers "too few test examples to tell", which the message says.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Optional

#: Relative drop of the per-epoch training loss (first epoch -> last) below which it "did not fall".
MIN_LOSS_DROP = 0.05
#: Significance level of the above-chance test.
ALPHA = 0.05


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """``P(X >= successes)`` for ``X ~ Binomial(trials, p)`` (exact sum; test sets are small enough)."""
    if successes <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    total = 0.0
    for k in range(successes, trials + 1):
        log_term = math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1) + k * log_p \
            + (trials - k) * log_q
        total += math.exp(log_term)
    return min(total, 1.0)


def loss_did_not_fall(history: list[dict]) -> Optional[tuple[float, float]]:
    """(first, last) epoch training loss if it fell by less than :data:`MIN_LOSS_DROP`, else None (also
    with a single epoch: nothing to compare)."""
    losses = [row["train_loss"] for row in history if row.get("train_loss") is not None]
    if len(losses) < 2:
        return None
    first, last = losses[0], losses[-1]
    if not math.isfinite(last) or first - last < MIN_LOSS_DROP * abs(first):
        return first, last
    return None


def chance_accuracy(test_rows: list[dict]) -> tuple[float, str]:
    """The accuracy of always answering the test set's most common label, and that label."""
    label, count = Counter(str(row["label"]) for row in test_rows).most_common(1)[0]
    return count / len(test_rows), label


def run_warnings(task: str, history: list[dict], test_rows: list[dict], n_train: int, epochs: int,
                 batch_size: int, lr: float) -> list[str]:
    """The warnings for one adapter run (empty when it learnt something), each one line."""
    found = []
    steps = epochs * math.ceil(n_train / batch_size)
    # Measured on 40 rows of the bundled data with the embedded MiniLM (100 held-out rows): the defaults
    # (10 steps at 5e-4) reach 0.43, --lr 3e-3 alone 0.65, --epochs 10 --lr 3e-3 0.99, and
    # --batch-size 4 --lr 3e-3 0.97: a larger step size and more steps, together.
    tries = (f"try more optimizer steps and a larger step size, e.g. --epochs {max(10, 2 * epochs)} "
             f"--lr {max(3e-3, 2 * lr):g}, or a smaller --batch-size (now {batch_size})")
    fell = loss_did_not_fall(history)
    if fell is not None:
        found.append(f"the training loss barely fell ({fell[0]:.3f} -> {fell[1]:.3f} over {epochs} epochs, "
                     f"{steps} optimizer steps on {n_train} examples): {tries}")
    accuracy = history[-1].get("eval_accuracy") if history else None
    if task == "seq-cls" and accuracy is not None and test_rows:
        n = len(test_rows)
        chance, label = chance_accuracy(test_rows)
        correct = round(accuracy * n)
        if binomial_tail(correct, n, chance) > ALPHA:
            small = f"; with only {n} test examples, also pass a larger --test-data" if n < 50 else ""
            found.append(f"held-out accuracy {accuracy:.3f} ({correct}/{n}) is not clearly above chance "
                         f"({chance:.3f}, always answering {label!r}): {tries}{small}")
    return found

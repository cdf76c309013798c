"""`CleaningConfig`: which samples the mentor judges mislabelled, and what is done with them.

Apart from `noisy_meta.labels.cleaning` so that the command line's parser can offer its choices
without importing torch or Hugging Face ``datasets``.
"""

from __future__ import annotations

from dataclasses import dataclass

CLEANING_CRITERIA = ("confident_disagreement", "given_label_prob")
CLEANING_ACTIONS = ("remove", "relabel")


@dataclass(frozen=True)
class CleaningConfig:
    """Which training samples the mentor judges mislabelled, and what is done with them.

    Attributes:
        criterion: ``"confident_disagreement"`` (default): flagged when the mentor's top-1
            class is not the given label and its probability is above ``threshold`` (0: any
            disagreement). ``"given_label_prob"``: flagged when the mentor's probability of
            the given label is below ``threshold`` (0.5 is a re-implementation's "keep
            p > 0.5"). Beware: under heavy noise a well-calibrated mentor gives even correctly
            labelled samples a probability near ``1 - noise rate`` (about 0.5 at 50% symmetric
            noise), so a fixed probability threshold flags most of the data there.
        threshold: in [0, 1) for ``"confident_disagreement"``, in (0, 1] for ``"given_label_prob"``.
        action: ``"remove"`` the flagged samples, or ``"relabel"`` them with the mentor's
            top-1 class.
    """

    criterion: str = "confident_disagreement"
    threshold: float = 0.0
    action: str = "remove"

    def __post_init__(self) -> None:
        errors = []
        if self.criterion not in CLEANING_CRITERIA:
            errors.append(f"criterion must be one of {CLEANING_CRITERIA}, got {self.criterion!r}")
        number = not isinstance(self.threshold, bool) and isinstance(self.threshold, (int, float))
        if self.criterion == "given_label_prob" and not (number and 0 < self.threshold <= 1):
            errors.append(f"threshold must be a number in (0, 1] for 'given_label_prob', got {self.threshold!r}")
        elif self.criterion != "given_label_prob" and not (number and 0 <= self.threshold < 1):
            errors.append(f"threshold must be a number in [0, 1) for 'confident_disagreement', got {self.threshold!r}")
        if self.action not in CLEANING_ACTIONS:
            errors.append(f"action must be one of {CLEANING_ACTIONS}, got {self.action!r}")
        if errors:
            raise ValueError("invalid CleaningConfig: " + "; ".join(errors))

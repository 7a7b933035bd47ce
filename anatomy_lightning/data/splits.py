"""Held-out splits of data.train_file: which questions validation and `test` take, and how a
checkpoint's recorded split is restored.

Splits are lists of uids, so a checkpoint records them as plain data and a later run (a resumed
fit, or `test` on the checkpoint) uses exactly the questions the training run held out, whatever
its own seed and fractions say.
"""

from __future__ import annotations

import random
from typing import Any

from anatomy_lightning.data.schema import DataError, Question

__all__ = ["Split", "apply_split", "hold_out", "recorded_split"]

Split = dict[str, list[str] | None]  # {"val": uids | None, "test": uids | None}; None = not held out


def hold_out(
    pool: list[Question], seed: int, val_fraction: float, test_fraction: float, *, hold_val: bool,
    hold_test: bool, source: str,
) -> Split:
    """uids of the validation (`hold_val`: no val_file) and held-out test (`hold_test`: test_split
    heldout without test_file) shares of `pool`: one seeded shuffle, validation first, so turning
    the test hold-out on leaves the validation split as it was. `source` names the file in errors."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(order) * val_fraction)) if hold_val and val_fraction > 0 else 0
    n_test = max(1, int(len(order) * test_fraction)) if hold_test else 0
    if pool and n_val + n_test >= len(pool):
        raise DataError(
            f"data: {source} has {len(pool)} questions; holding out {n_val} for validation and {n_test} "
            "for test leaves none to train on; lower data.val_fraction / data.test_fraction or give data.val_file"
        )
    val, test = sorted(order[:n_val]), sorted(order[n_val:n_val + n_test])  # uids in file order
    return {"val": [pool[i].uid for i in val] if n_val else None,
            "test": [pool[i].uid for i in test] if hold_test else None}


def apply_split(
    pool: list[Question], split: Split, source: str
) -> tuple[list[Question], list[Question] | None, list[Question] | None]:
    """(train, val, test) questions of `pool` under `split`, each in file order; val / test are None
    where the split holds none out. A uid missing from `pool` means the file changed since the
    split was recorded: refused, naming `source`."""
    known = {q.uid for q in pool}
    for what, uids in split.items():
        lost = [u for u in uids or [] if u not in known]
        if lost:
            raise DataError(
                f"data: the checkpoint's {what} split holds {len(lost)} questions that are not in "
                f"data.train_file {source} (e.g. {lost[:3]}); the file changed since training: pass the "
                f"file the checkpoint was trained on, or give data.{what}_file"
            )
    val, test = set(split["val"] or ()), set(split["test"] or ())
    train = [q for q in pool if q.uid not in val and q.uid not in test]
    held_val = [q for q in pool if q.uid in val] if split["val"] is not None else None
    held_test = [q for q in pool if q.uid in test] if split["test"] is not None else None
    return train, held_val, held_test


def recorded_split(recorded: dict[str, Any] | None, *, scores_heldout: bool, has_val_file: bool,
                   source: str) -> Split | None:
    """The split to use from a checkpoint's record (None: the checkpoint recorded none to apply).

    A test hold-out stays out of training even when this run does not score it (resuming a fit);
    `test` with a held-out split on a checkpoint trained without one is refused: that run trained
    on every question of the file outside validation.
    """
    if scores_heldout and (recorded is None or recorded.get("test") is None):
        raise DataError(
            "data.test_split is heldout, but the checkpoint was trained without it, so its run trained on "
            f"every question of {source} outside validation; set data.test_file to a file it never saw"
        )
    if recorded is None:
        return None
    return {"val": None if has_val_file else recorded.get("val"), "test": recorded.get("test")}

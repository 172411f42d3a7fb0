"""Held-out evaluation in the train stage: the loss and perplexity of rows the model does not train on, before
training, every `training.eval_steps` steps and after.

The rows are the trainer's own: TRL prepares the held-out data set as it prepares the training one and its
collator makes the labels, so the loss is on the tokens training puts it on (the answers only where
`data.train_on` is assistant). Perplexity is exp of the mean loss per token over all the rows (not a mean of
per-row means). The same token rows go to the gguf stage (`heldout.json`), which measures each GGUF on them.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("tunectl")

HELDOUT = "heldout.json"


@dataclass
class Rows:
    """Token rows as the collator makes them: ids, and which positions carry the loss (1) or not (0)."""

    source: str  # "held-out" rows, or the first "training" rows where none are held out (gguf fidelity only)
    ids: list[list[int]]
    loss_on: list[list[int]]

    @property
    def tokens(self) -> int:
        """Predicted tokens: a position carries the loss from the one before it, so the first never does."""
        return sum(sum(mask[1:]) for mask in self.loss_on)

    def capped(self, tokens: int) -> Rows:
        """Whole rows from the start while they add up to at most `tokens` predicted tokens (the first row always)."""
        keep, total = 0, 0
        for mask in self.loss_on:
            total += sum(mask[1:])
            if keep and total > tokens:
                break
            keep += 1
        return Rows(self.source, self.ids[:keep], self.loss_on[:keep])

    def write(self, path: Path) -> None:
        doc = {
            "source": self.source,
            "rows": [{"ids": i, "loss_on": m} for i, m in zip(self.ids, self.loss_on, strict=True)],
        }
        path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")

    @classmethod
    def read(cls, path: Path) -> Rows:
        doc = json.loads(path.read_text())
        return cls(doc["source"], [r["ids"] for r in doc["rows"]], [r["loss_on"] for r in doc["rows"]])


def collated(trainer: Any, dataset: Any, source: str, limit: int | None = None) -> Rows:
    """The rows of a data set the trainer has prepared, through its collator one at a time (no padding)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    ids, loss_on = [], []
    for i in range(n):
        batch = trainer.data_collator([dataset[i]])
        ids.append(batch["input_ids"][0].tolist())
        loss_on.append([int(x != -100) for x in batch["labels"][0].tolist()])
    return Rows(source, ids, loss_on)


def measure(model: Any, rows: Rows) -> dict[str, float]:
    """Mean loss per predicted token over the rows, and its perplexity, with the model in eval mode (restored)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for ids, mask in zip(rows.ids, rows.loss_on, strict=True):
                n = sum(mask[1:])
                if not n:
                    continue
                x = torch.tensor([ids], device=device)
                labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask, strict=True)]], device=device)
                out = model(input_ids=x, labels=labels)
                total += float(out.loss) * n  # the model's loss is the mean over the row's predicted tokens
                count += n
    finally:
        model.train(was_training)
    loss = total / count if count else float("nan")
    return {"loss": round(loss, 6), "perplexity": round(math.exp(loss), 4) if count else float("nan"), "tokens": count}


def callback(model_rows: Rows, every: int, is_main: bool) -> Any:
    """A trainer callback that measures the rows every `every` optimizer steps and puts the result in the trainer's
    log history (so a checkpoint keeps it and a resumed run has the earlier points)."""
    from transformers import TrainerCallback

    class HeldOut(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if not is_main or state.global_step % every or model is None:
                return
            m = measure(model, model_rows)
            log.info("step %d: held-out loss %.4f, perplexity %.3f", state.global_step, m["loss"], m["perplexity"])
            state.log_history.append({"step": state.global_step, "eval_loss": m["loss"],
                                      "eval_perplexity": m["perplexity"]})  # fmt: skip

    return HeldOut()


def history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The measurements the callback left in the trainer's log history, one per step."""
    points = {h["step"]: h for h in log_history if "eval_loss" in h}
    return [{"step": s, "loss": h["eval_loss"], "perplexity": h["eval_perplexity"]} for s, h in sorted(points.items())]

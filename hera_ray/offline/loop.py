"""The training loop both LoRA trainers share (encoder heads and causal adapters).

AdamW over the trainable parameters, a linear decay of the learning rate to 0 over all steps,
gradient clipping at 1.0, length-bucketed batches, and a progress bar with the loss. Each
trainer supplies only how a batch of example indices becomes a loss.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any, Callable, Sequence


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Index batches of similar lengths (little padding), in random order.

    Examples are shuffled, then sorted by length inside windows of 8 batches, so batches differ
    from epoch to epoch but each one pads to a near-equal length.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 8
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def fit(model: Any, lengths: Sequence[int], batch_loss: Callable[[list[int]], Any], *, epochs: int, lr: float,
        batch_size: int, rng: random.Random, desc: str, progress: bool = True) -> dict[str, Any]:
    """Train ``model``'s trainable parameters; ``batch_loss(indices)`` returns the loss tensor of a batch.

    Returns ``{"steps", "final_loss", "train_s"}``; ``final_loss`` is the mean over the last epoch,
    which is less noisy than the last batch.
    """
    import torch
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = math.ceil(len(lengths) / batch_size) * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total))
    model.train()
    t0 = time.perf_counter()
    step = 0
    epoch_losses: list[float] = []
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    for _epoch in range(epochs):
        epoch_losses = []
        for idx in length_batches(lengths, batch_size, rng):
            loss = batch_loss(idx)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch_losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
    bar.close()
    model.eval()
    return {"steps": step, "final_loss": sum(epoch_losses) / len(epoch_losses),
            "train_s": round(time.perf_counter() - t0, 2)}

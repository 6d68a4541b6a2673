"""train: the training loop and what runs with it.

    trainer.py        Trainer: epochs of batches through a Pipeline, the optimizer, callbacks, metrics
    batches.py        deterministic batches: every dp rank its slice of each global batch
    reference.py      single-process training of the same model and batches: the parity oracle
    checkpointing.py  checkpoints in a loop: Checkpoint for your own, attach_checkpoint for the Trainer
    amp.py            mixed precision: a layer under torch.autocast, a loss scaler all ranks agree on
    clip.py           gradient clipping by the global norm over every stage's gradients
    guard.py          what a step must not do: apply inf/NaN, or go on after SIGTERM/SIGUSR1 (one agreement)
    lr.py             learning-rate schedules the examples use (Noam, half-cosine)
    metrics.py        per-epoch metrics: summed on the reporting rank, printed by rank 0, JSONL
    observe.py        per-rank observability: throughput, step and communication time, bytes, loss
    curves.py         learning curves of the parallel run over single-process training's
    survive.py        data-parallel training that survives a dead rank without a relaunch (ULFM)
"""

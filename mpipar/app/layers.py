"""Small layers that make common models pipeline-friendly: each passes ONE tensor on, so any
stage boundary can fall after it. And the word-level loss of the numbers-to-words models."""
import torch.nn.functional as F
from torch import nn


class LSTMLayer(nn.Module):
    """One LSTM layer that passes its whole output sequence [B, T, H] to the next stage."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.lstm = nn.LSTM(c_in, c_out, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0]


class LastStep(nn.Module):
    """Forecast head: a Linear on the last time step of a sequence. `zero`: weights and bias start
    at zero, so a model forecasting the change from the last reading starts at persistence (its
    gradient is not zero)."""

    def __init__(self, c_in: int, c_out: int = 1, zero: bool = False):
        super().__init__()
        self.fc = nn.Linear(c_in, c_out)
        if zero:
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(x[:, -1])


class WordCrossEntropy(nn.Module):
    """Mean token cross-entropy of logits [B, T, V] over the word positions (padding, -100 as
    data.numbers.IGNORE, skipped: cross_entropy's default ignore_index)."""

    def forward(self, logits, y):
        return F.cross_entropy(logits.float().transpose(1, 2), y)


class SentenceCrossEntropy(nn.Module):
    """Mean over sentences of each sentence's mean token cross-entropy (padding skipped). A mean
    over samples, so micro-batches and data-parallel shards weighted by their sample counts add
    up to the whole batch (a mean over tokens would not: shards hold different token counts)."""
    mean_over = "samples"        # train/metrics.Tally weights its epoch mean by samples, not tokens

    def forward(self, logits, y):
        tok = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")
        return (tok.sum(1) / (y != -100).sum(1).clamp_min(1)).mean()

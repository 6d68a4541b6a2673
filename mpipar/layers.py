"""Small layers that make common models pipeline-friendly: each passes ONE tensor on, so any
stage boundary can fall after it."""
from torch import nn


class LSTMLayer(nn.Module):
    """One LSTM layer that passes its whole output sequence [B, T, H] to the next stage."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.lstm = nn.LSTM(c_in, c_out, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0]


class LastStep(nn.Module):
    """Forecast head: a Linear on the last time step of a sequence."""

    def __init__(self, c_in: int, c_out: int = 1):
        super().__init__()
        self.fc = nn.Linear(c_in, c_out)

    def forward(self, x):
        return self.fc(x[:, -1])

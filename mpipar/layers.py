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

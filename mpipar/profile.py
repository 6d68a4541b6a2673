"""What each layer costs, for partitioning by cost (`--balance time`, the command line's default):
a short profiling pass that times each layer's forward+backward on a micro-batch of the real
shape and counts the bytes autograd saves for its backward, holding one layer at a time (so the
whole model is never allocated at once).

Profiles are cached on disk, keyed by the layers (names, parameter shapes), the micro-batch's
shape and dtype, the device and the torch version, so a restart or the supervisor's relaunch
partitions the same way without profiling again. The cache is a JSON file per key in
$MPIPAR_CACHE (default ~/.cache/mpipar), written atomically; nothing in it is executed.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import ConfigError
from .model import build_layer, param_shapes


@dataclass
class LayerCost:
    name: str
    seconds: float        # forward + backward on one micro-batch (best of the repeats)
    saved_bytes: int      # what autograd keeps for backward, per micro-batch in flight
    param_bytes: int


def profile_layers(specs, sample: torch.Tensor, seed: int, repeats: int = 3,
                   which: range | None = None) -> list[LayerCost]:
    """The costs of layers `which` (default all) on `sample`, a micro-batch of the model's
    input: the layers before them only run forward, without autograd, to make their input.
    One layer is built at a time, on the sample's device (a GPU's kernels are timed to completion)."""
    which = range(len(specs)) if which is None else which
    costs, x = [], sample
    for i, spec in enumerate(specs[:which.stop]):
        layer = build_layer(spec, i, seed, sample.device)
        if i in which:
            costs.append(_measure(layer, spec.name, x, repeats))
        if i + 1 < which.stop:
            with torch.no_grad():
                x = layer(x)
        del layer
    return costs


def _measure(layer, name: str, x: torch.Tensor, repeats: int) -> LayerCost:
    best, saved = float("inf"), 0
    for r in range(repeats + 1):          # the first run warms caches up and is not timed
        inp = x.detach().requires_grad_(x.is_floating_point())
        held = []
        try:
            with torch.autograd.graph.saved_tensors_hooks(
                    lambda t: (held.append(t.numel() * t.element_size()), t)[1], lambda t: t):
                _sync(x)
                t0 = time.perf_counter()
                out = layer(inp)
                out.float().sum().backward()
                _sync(x)
                dt = time.perf_counter() - t0
        except Exception as e:
            raise ConfigError(f"--balance time: profiling layer {name!r} on the activation "
                              f"{list(x.shape)} {str(x.dtype).removeprefix('torch.')} failed: {e}") from None
        if r:
            best = min(best, dt)
        saved = sum(held)
    param_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    return LayerCost(name, best, saved, param_bytes)


def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def cache_key(specs, sample: torch.Tensor) -> str:
    """Layers (names, parameter shapes, counted on the meta device), micro-batch shape and
    dtype, device, torch version: what the measured costs depend on."""
    shapes = [[s.name] + [list(shape) for shape in layer] for s, layer in zip(specs, param_shapes(specs))]
    doc = {"layers": shapes, "sample": list(sample.shape), "dtype": str(sample.dtype),
           "device": str(sample.device), "torch": torch.__version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def cache_dir() -> Path:
    return Path(os.environ.get("MPIPAR_CACHE") or Path.home() / ".cache" / "mpipar") / "profiles"


def read_cache(specs, sample: torch.Tensor) -> list[LayerCost] | None:
    """The stored profile for (specs, sample's shape), or None."""
    try:
        costs = [LayerCost(**row) for row in json.loads(cache_path(specs, sample).read_text())]
    except (OSError, ValueError, TypeError):
        return None
    return costs if [c.name for c in costs] == [s.name for s in specs] else None


def write_cache(specs, sample: torch.Tensor, costs: list[LayerCost]) -> None:
    path = cache_path(specs, sample)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps([asdict(c) for c in costs]))
        os.replace(tmp, path)
    except OSError:     # a read-only home: profile again next time
        pass


def cache_path(specs, sample: torch.Tensor) -> Path:
    return cache_dir() / f"{cache_key(specs, sample)}.json"


def layer_costs(specs, sample: torch.Tensor, seed: int, log=None) -> list[LayerCost]:
    """The cached profile for (specs, sample's shape), measured and stored if there is none
    (one process; pipeline.balance.shared_costs shares the measuring among ranks)."""
    costs = read_cache(specs, sample)
    if costs is not None:
        if log:
            log(f"layer costs: cached profile {cache_path(specs, sample)}")
        return costs
    costs = profile_layers(specs, sample, seed)
    write_cache(specs, sample, costs)
    return costs

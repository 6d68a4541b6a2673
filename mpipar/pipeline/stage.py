"""One pipeline stage (one model chunk) on one rank: its layers, what it stashed for backward,
its neighbours. Backward comes whole (B) or split (B: input gradient now, W: weights later)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from ..comm.messages import describe
from ..comm.tags import Kind, tag
from ..errors import ConfigError, ShapeError


# losses that compare output and target element by element: any difference in shape broadcasts
ELEMENTWISE_LOSSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss,
                      nn.SoftMarginLoss, nn.KLDivLoss, nn.PoissonNLLLoss)
ELEMENTWISE_FUNCTIONS = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy,
                         F.binary_cross_entropy_with_logits, F.soft_margin_loss, F.kl_div, F.poisson_nll_loss)


def check_loss_shapes(loss_fn, out, target) -> None:
    """Refuse an output and targets that the loss would broadcast into another loss (e.g. (16, 1)
    against (16,): a 16 x 16 mean, with only torch's warning). An elementwise loss needs equal
    shapes; any other loss is refused floating tensors of as many elements in other shapes only
    when its value changes once the output takes the targets' shape (it broadcasts them rather
    than reshaping them itself). Class indices against logits ((B, C) against (B,) integers) pass."""
    if not (isinstance(out, torch.Tensor) and isinstance(target, torch.Tensor)) or out.shape == target.shape:
        return
    if not (isinstance(loss_fn, ELEMENTWISE_LOSSES) or loss_fn in ELEMENTWISE_FUNCTIONS):
        if not (out.is_floating_point() and target.is_floating_point()) or out.numel() != target.numel():
            return
        with torch.no_grad():
            as_given = loss_fn(out, target)
            try:
                reshaped = loss_fn(out.reshape(target.shape), target)
            except (RuntimeError, IndexError, ValueError):
                return        # it needs the output's own shape: it reads the two as it means to
        if torch.equal(torch.as_tensor(as_given), torch.as_tensor(reshaped)):
            return
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    o, t = tuple(out.shape), tuple(target.shape)
    fix = ("y.unsqueeze(-1) for the targets, or out.squeeze(-1) at the model's end" if o == t + (1,) else
           "y.squeeze(-1) for the targets" if t == o + (1,) else "reshape the targets or the output")
    raise ShapeError(f"the loss {name} gets an output of shape {o} and targets of shape {t}, which it would "
                     f"broadcast into another loss: give them the same shape ({fix})")


def check_mean_loss(loss_fn, target) -> None:
    """Refuse a torch loss that is not a plain mean over samples: Pipeline weighs each micro-batch's
    loss by its share of the samples, which equals one process's loss only for such a mean (a sum,
    a mean weighted by the targets' classes, or one over the targets not ignored, would not split
    so). A plain function is trusted to be one. Checked per micro-batch (ignore_index targets)."""
    if not isinstance(loss_fn, nn.modules.loss._Loss):
        return
    why = None
    if getattr(loss_fn, "reduction", "mean") not in ("mean", "batchmean"):
        why = f"reduction={loss_fn.reduction!r}"
    elif isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        if loss_fn.weight is not None:
            why = "weight= (a mean weighted by the targets' classes)"
        elif (isinstance(target, torch.Tensor) and not target.is_floating_point()
              and bool((target == loss_fn.ignore_index).any())):
            why = f"targets equal to ignore_index={loss_fn.ignore_index} (a mean over the other targets only)"
    if why:
        raise ConfigError(
            f"the loss {type(loss_fn).__name__} with {why} is not a plain mean over samples, which Pipeline "
            f"needs (it weighs each micro-batch's loss by its share of the samples): use a loss that is a "
            f"plain mean over samples (reduction='mean', no class weights, no ignored targets), or a "
            f"function returning one")


@dataclass
class Stashed:
    """What one micro-batch's backward needs, and nothing more."""
    x: torch.Tensor                                   # the stage input (a leaf when it needs a gradient)
    root: torch.Tensor | None = None                  # loss (last stage) or output: where backward starts
    ys: list = field(default_factory=list)            # each layer's output (split backward only)
    target: object = None                             # recompute: to rebuild the loss
    weight: float = 1.0
    params: dict | None = None                        # 2BW: the weight version this micro-batch uses
    rng: tuple | None = None                          # recompute: the RNG states the forward saw (CPU, GPU)
    grad_root: torch.Tensor | None = None             # split: the gradient B started from
    grad_ys: list = field(default_factory=list)       # split: each layer output's gradient, for W


class Stage:
    """Runs F, B and W for micro-batches; `index` is the virtual stage (chunk * p + pp rank)."""

    def __init__(self, module: nn.Module, index: int, n_stages: int, pp_world, loss_fn=None,
                 device="cpu", recompute: bool = False, weights=None):
        self.module, self.index, self.n = module, index, n_stages
        self.world, self.loss_fn, self.device = pp_world, loss_fn, device
        self.p = pp_world.size if pp_world is not None else n_stages
        self.recompute, self.weights = recompute, weights     # weights: a pipedream.WeightStash
        self.layers = list(module.named_children()) if isinstance(module, nn.Sequential) else [("", module)]
        self.layer_names = [n for n, _ in self.layers] or ["(empty)"]
        self.stash: dict[int, Stashed] = {}
        self.peak_held = 0

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def on_gpu(self) -> bool:
        return torch.device(self.device).type == "cuda"

    @property
    def is_last(self) -> bool:
        return self.index == self.n - 1

    @property
    def prev(self) -> int:
        """pp rank of the previous virtual stage."""
        return (self.index - 1) % self.p

    @property
    def next(self) -> int:
        return (self.index + 1) % self.p

    # -- forward ------------------------------------------------------------------------------
    def _run(self, x, params, keep: bool):
        """The layers on x (with `params` standing in for the weights when given)."""
        ys, h = [], x
        for name, layer in self.layers:
            if params is None:
                h = layer(h)
            else:
                sub = {k[len(name) + 1:] if name else k: v for k, v in params.items()
                       if not name or k.startswith(name + ".")}
                h = functional_call(layer, sub, (h,))
            if keep:
                ys.append(h)
        return h, ys

    def _loss(self, out, target, weight):
        check_loss_shapes(self.loss_fn, out, target)
        check_mean_loss(self.loss_fn, target)
        return self.loss_fn(out, target) * weight

    def forward(self, mb: int, x: torch.Tensor, target=None, weight: float = 1.0,
                params: dict | None = None, split: bool = False) -> torch.Tensor:
        """Forward one micro-batch and stash what its backward needs (each layer's output too
        when its backward will be `split`); returns the output."""
        training = torch.is_grad_enabled()
        if training and not self.is_first:
            x = x.detach().requires_grad_(x.is_floating_point())
        has_loss = self.is_last and target is not None and self.loss_fn is not None
        try:
            if training and self.recompute:
                rng = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.on_gpu else None)
                with torch.no_grad():
                    out, _ = self._run(x, params, False)
                self._hold(mb, Stashed(x, target=target, weight=weight, params=params, rng=rng))
                return out
            out, ys = self._run(x, params, training and split)
        except RuntimeError as e:
            if self.is_first:
                raise
            raise self._shape_error(x, e) from None
        if training:
            root = self._loss(out, target, weight) if has_loss else out
            self._hold(mb, Stashed(x, root, ys[:-1], params=params))
        return out

    def _hold(self, mb: int, entry: Stashed) -> None:
        self.stash[mb] = entry
        self.peak_held = max(self.peak_held, len(self.stash))

    def _shape_error(self, x, e) -> ShapeError:
        src = self.world.world_rank_of(self.prev)
        return ShapeError(
            f"stage {self.index} (rank {self.world.world_rank}, layers {self.layer_names[0]}.."
            f"{self.layer_names[-1]}) cannot take the activation {describe(x.shape, x.dtype)} from rank "
            f"{src} (stage {self.index - 1}): {' '.join(str(e).split())}")

    def _materialize(self, e: Stashed, split: bool) -> None:
        """Recompute mode: rebuild the graph from the stashed input, with the same RNG draws."""
        if e.root is not None:
            return
        with torch.random.fork_rng(devices=[self.device] if self.on_gpu else []):
            torch.set_rng_state(e.rng[0])
            if e.rng[1] is not None:       # dropout on a GPU draws from the device's generator
                torch.cuda.set_rng_state(e.rng[1], self.device)
            with torch.enable_grad():
                out, ys = self._run(e.x, e.params, True)
        has_loss = self.is_last and e.target is not None and self.loss_fn is not None
        e.root = self._loss(out, e.target, e.weight) if has_loss else out
        e.ys = ys[:-1] if split else []

    # -- backward -----------------------------------------------------------------------------
    def backward(self, mb: int, grad: torch.Tensor | None = None, split: bool = False) -> torch.Tensor | None:
        """B: the gradient for the previous stage. Whole (weights too) unless `split`, when
        the weight gradients wait for backward_weight(mb)."""
        if not split:
            e = self.stash.pop(mb)
            self._materialize(e, False)
            e.root.backward(grad)
            return None if self.is_first else e.x.grad
        e = self.stash[mb]
        self._materialize(e, True)
        e.grad_root = grad
        wanted = ([e.x] if e.x.requires_grad else []) + [y for y in e.ys if y.requires_grad]
        grads = torch.autograd.grad(e.root, wanted, grad, retain_graph=True, allow_unused=True) if wanted else []
        gx = grads[0] if e.x.requires_grad else None
        rest = iter(grads[1:] if e.x.requires_grad else grads)
        e.grad_ys = [next(rest) if y.requires_grad else None for y in e.ys]
        return None if self.is_first else gx

    def backward_weight(self, mb: int) -> None:
        """W: each layer's weight gradients from its output's gradient kept by B; only that
        layer's part of the graph is walked, so no input-gradient work is repeated."""
        e = self.stash.pop(mb)
        last = len(self.layers) - 1
        for i, (name, layer) in enumerate(self.layers):
            params = self._layer_params(name, layer, e.params)
            root, g = (e.root, e.grad_root) if i == last else (e.ys[i], e.grad_ys[i])
            if not params or g is None and i != last:
                continue
            # accumulates into .grad like a plain backward (post-accumulate hooks fire: dp overlap)
            torch.autograd.backward(root, g, inputs=params)

    @staticmethod
    def _layer_params(name, layer, params) -> list[torch.Tensor]:
        if params is None:
            return [p for p in layer.parameters() if p.requires_grad]
        return [v for k, v in params.items() if not name or k.startswith(name + ".")]

    def loss_of(self, mb: int) -> float:
        return float(self.stash[mb].root.detach())

    @property
    def held(self) -> int:
        """Micro-batches whose activations this stage holds now."""
        return len(self.stash)

    # -- messages ------------------------------------------------------------------------
    def tag(self, kind: Kind, mb: int, chunk: int = 0) -> int:
        return tag(kind, mb, chunk)

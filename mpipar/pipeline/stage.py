"""One pipeline stage (one model chunk) on one rank: its layers, what it stashed for backward,
its neighbours. Backward comes whole (B) or split (B: input gradient now, W: weights later)."""
from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from ..comm.messages import describe
from ..comm.tags import Kind, tag
from ..data_parallel.samples import WatchedOutput
from ..errors import ConfigError, ShapeError


# losses that compare output and target element by element: any difference in shape broadcasts
ELEMENTWISE_LOSSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss,
                      nn.SoftMarginLoss, nn.KLDivLoss, nn.PoissonNLLLoss)
ELEMENTWISE_FUNCTIONS = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy,
                         F.binary_cross_entropy_with_logits, F.soft_margin_loss, F.kl_div, F.poisson_nll_loss)


CLASS_LOSSES = {F.cross_entropy: nn.CrossEntropyLoss, F.nll_loss: nn.NLLLoss}


def judged(loss_fn):
    """The loss the checks below judge: what a wrapper that only scales it stands for (amp's
    ScaledLoss: its `unscaled`), and functools.partial(F.cross_entropy, ...) (or F.nll_loss) as
    the loss module of the same settings, so that its reduction, weight and ignore_index are read."""
    loss_fn = getattr(loss_fn, "unscaled", loss_fn)
    if isinstance(loss_fn, functools.partial) and loss_fn.func in CLASS_LOSSES and not loss_fn.args:
        try:
            return CLASS_LOSSES[loss_fn.func](**loss_fn.keywords)
        except TypeError:
            pass
    return loss_fn


def check_loss_shapes(loss_fn, out, target) -> None:
    """Refuse an output and targets that the loss would broadcast into another loss (e.g. (16, 1)
    against (16,): a 16 x 16 mean, with only torch's warning). An elementwise loss needs equal
    shapes; any other loss is refused floating tensors of as many elements in other shapes only
    when its value changes once the output takes the targets' shape (it broadcasts them rather
    than reshaping them itself). Class indices against logits ((B, C) against (B,) integers) pass."""
    loss_fn = judged(loss_fn)
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


MEANS_OVER_SAMPLES = weakref.WeakSet()   # functions shown to be one on integer targets below 0
COUNTED = weakref.WeakKeyDictionary()    # loss -> the targets it counts in each sample, alike in all so far


def counted_alike(loss_fn, counted: torch.Tensor) -> tuple[bool, bool]:
    """(whether some target is not counted, whether every sample so far held the same number k > 0
    of counted ones): `counted` is a mask shaped like the targets. Then a mean over the counted
    targets is a mean over samples too (e.g. sub-graphs with as many labelled nodes each). The k is
    remembered per loss for the whole run, so micro-batches without ignored targets (k: all of a
    sample's) count too; replicas are not compared (a replica whose samples all held another k
    throughout would pass)."""
    if counted.dim() == 0 or not len(counted):
        return False, False
    lo, hi = torch.aminmax(counted.reshape(len(counted), -1).sum(1))
    lo, hi = torch.stack([lo, hi]).tolist()
    if lo != hi or lo == 0:
        return lo < counted[0].numel(), False
    try:
        return lo < counted[0].numel(), COUNTED.setdefault(loss_fn, lo) == lo
    except TypeError:                         # not weakly referable: cannot be remembered
        return lo < counted[0].numel(), False


def mean_over_samples(loss_fn, out, target) -> bool:
    """Whether a function given integer targets below 0 (torch's ignore_index, -100 by default, or
    labels such as -1) still averages over samples: its value on the batch followed by a copy of
    it whose targets all hold the lowest one, v, must be the mean of its values on the two. A mean
    over the targets not ignored keeps its value on the batch instead (and has none, NaN, on the
    copy). Shown once per function; a zero loss shows nothing."""
    if loss_fn in MEANS_OVER_SAMPLES:
        return True
    if not isinstance(out, torch.Tensor):
        return False
    with torch.no_grad():
        fill = torch.full_like(target, int(target.min()))
        alone, filled = loss_fn(out, target), loss_fn(out, fill)
        both = loss_fn(torch.cat([out, out]), torch.cat([target, fill]))
    alone, filled, both = (torch.as_tensor(v, dtype=torch.float64) for v in (alone, filled, both))
    if not torch.allclose(2 * both, alone + filled, rtol=1e-3, atol=0.0):
        return False
    if bool(alone != 0):
        with contextlib.suppress(TypeError):          # not weakly referable: shown again next time
            MEANS_OVER_SAMPLES.add(loss_fn)
    return True


INNER_CLASS_LOSS = weakref.WeakKeyDictionary()   # plain function -> (ignore_index, weighted) of its mean CE / NLL


class _LossSpy(WatchedOutput):
    """An output (and all computed from it) that notes each cross entropy / NLL call taken on it."""
    seen: list = []

    @classmethod
    def on_loss(cls, func, args, kwargs, loss) -> None:
        cls.seen.append(inspect.signature(func).bind(*args, **kwargs))


def inner_class_loss(loss_fn, out, target) -> tuple[int, bool] | None:
    """(ignore_index, with class weights) of the mean cross entropy / NLL a plain loss function
    takes on its output (None: it takes none, or sums), read once per function by running it on
    a watching view of the output: a function can hide `ignore_index=0` (padding), which the
    targets' values do not show."""
    try:
        return INNER_CLASS_LOSS[loss_fn]
    except (KeyError, TypeError):
        pass
    _LossSpy.seen = []
    with torch.no_grad():
        loss_fn(out.detach().as_subclass(_LossSpy), target)
    found = None
    for call in _LossSpy.seen:
        call.apply_defaults()
        a = call.arguments
        legacy = a.get("size_average") is not None or a.get("reduce") is not None
        if a.get("reduction", "mean") == "mean" and not legacy:
            found = (int(a.get("ignore_index", -100)), a.get("weight") is not None)
    _LossSpy.seen = []
    with contextlib.suppress(TypeError):
        INNER_CLASS_LOSS[loss_fn] = found
    return found


def check_mean_loss(loss_fn, out, target, whole: bool = False) -> None:
    """Refuse a loss that is not a plain mean over samples: Pipeline weighs each micro-batch's
    loss by its share of the samples, which equals one process's loss only for such a mean (a sum,
    a mean weighted by the targets' classes, or one over the targets not ignored, would not split
    so). A plain function is trusted to be one, except on integer targets below 0 (ignored class
    indices: it must show it, mean_over_samples). Ignored targets pass too where nothing is weighed
    (`whole`: one micro-batch, one replica) or every sample holds as many counted ones
    (counted_alike). Checked per micro-batch."""
    given, loss_fn = loss_fn, judged(loss_fn)     # what the Stage holds: what counted_alike remembers
    indices = isinstance(target, torch.Tensor) and not (target.is_floating_point() or target.is_complex())
    plain = not isinstance(loss_fn, nn.modules.loss._Loss)
    ignoring = indices and (plain or isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)))
    ignored, alike = (counted_alike(given, target >= 0 if plain else target != loss_fn.ignore_index) if ignoring
                      else (False, False))
    ignored = ignored and not whole and not alike
    if plain and indices and isinstance(out, torch.Tensor):
        inner = inner_class_loss(given, out, target)
        if inner is not None and (inner[0] >= 0 or inner[1]):   # e.g. ignore_index=0: padding the values do not show
            padded, alike = counted_alike(given, target != inner[0])
            if (padded and not whole and not alike) or (inner[1] and not whole):
                name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
                what = ("class weights (a mean weighted by the targets' classes)" if inner[1] else
                        f"ignore_index={inner[0]}, which this micro-batch's samples hold different numbers of")
                raise ConfigError(
                    f"the loss function {name} takes a mean cross entropy / NLL with {what}: a mean over its "
                    f"counted targets, not over samples, which Pipeline needs (it weighs each micro-batch's loss "
                    f"by its share of the samples): return a mean over samples, e.g. F.cross_entropy(out, y, "
                    f"reduction='sum') / y.numel() with the ignored targets' losses zeroed, or train with one "
                    f"micro-batch and one replica")
    if plain:
        if ignored and not mean_over_samples(loss_fn, out, target):
            name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
            raise ConfigError(
                f"the loss function {name} gets integer targets below 0 ({int(target.min())}: ignored class "
                f"indices, torch's ignore_index) and is no plain mean over samples with them (a mean over the other "
                f"targets only), which Pipeline needs (it weighs each micro-batch's loss by its share of the "
                f"samples): return one, e.g. F.cross_entropy(out, y, reduction='sum') / y.numel() (an ignored "
                f"target counts as zero)")
        return
    why = None
    if getattr(loss_fn, "reduction", "mean") not in ("mean", "batchmean"):
        why = f"reduction={loss_fn.reduction!r}"
    elif isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        if loss_fn.weight is not None:
            why = "weight= (a mean weighted by the targets' classes)"
        elif ignored:
            why = f"targets equal to ignore_index={loss_fn.ignore_index} (a mean over the other targets only)"
    if why:
        raise ConfigError(
            f"the loss {type(loss_fn).__name__} with {why} is not a plain mean over samples, which Pipeline "
            f"needs (it weighs each micro-batch's loss by its share of the samples): use a loss that is a "
            f"plain mean over samples (reduction='mean', no class weights, no ignored targets), or a "
            f"function returning one")


def leaves(x):
    """A received activation as this stage's input: leaves, the floating-point tensors asking for a
    gradient (a tuple's numbers and integer tensors -- positions, masks -- as they are)."""
    if isinstance(x, tuple):
        return tuple(leaves(v) for v in x)
    return x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x


def needing_grad(v) -> list[torch.Tensor]:
    """The tensors of an activation (a tensor, or a tuple of values) that backward reaches."""
    return [t for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor) and t.requires_grad]


def floats(v) -> list[torch.Tensor]:
    """A tuple's floating-point tensors: those whose gradients travel back, one each, in order."""
    return [t for t in v if isinstance(t, torch.Tensor) and t.is_floating_point()]


def with_grads(out, grad) -> tuple[list, list]:
    """(roots, their gradients) for backward from a stage's output: the tensor and its gradient
    (None under a loss), or of a tuple the floating-point tensors with the gradients the next stage
    sent for them, in order, less those that need none here (no weights behind them)."""
    if not isinstance(out, tuple):
        return [out], [grad]
    pairs = [(t, g) for t, g in zip(floats(out), grad, strict=True) if t.requires_grad]
    return [t for t, _ in pairs], [g for _, g in pairs]


def input_grads(x, grads: dict):
    """What B sends back for the stage input x: x's gradient, or for a tuple one per floating-point
    tensor, in order (zeros where this stage's graph does not reach it). `grads`: by tensor id."""
    if not isinstance(x, tuple):
        return grads.get(id(x))
    return tuple(grads.get(id(t)) if grads.get(id(t)) is not None else torch.zeros_like(t) for t in floats(x))


def describe_value(x) -> str:
    """An activation as error messages show it: '[16, 64] float32', or a tuple of such and numbers."""
    if isinstance(x, tuple):
        return "(" + ", ".join(describe_value(v) for v in x) + ")"
    return describe(x.shape, x.dtype) if isinstance(x, torch.Tensor) else repr(x)


@dataclass
class Stashed:
    """What one micro-batch's backward needs, and nothing more."""
    x: object                                         # the stage input, a tensor or tuple (leaves needing gradients)
    root: object = None                               # loss (last stage) or output: where backward starts
    ys: list = field(default_factory=list)            # each layer's output tensors needing gradients (split only)
    target: object = None                             # recompute: to rebuild the loss
    weight: float = 1.0
    params: dict | None = None                        # 2BW: the weight version this micro-batch uses
    rng: tuple | None = None                          # recompute: the RNG states the forward saw (CPU, GPU)
    grad_root: object = None                          # split: the gradient B started from
    grad_ys: list = field(default_factory=list)       # split: the gradients of ys, for W


class Stage:
    """Runs F, B and W for micro-batches; `index` is the virtual stage (chunk * p + pp rank).
    Activations are tensors, or tuples of tensors and numbers between the units of a traced
    module (pipeline/split.py): a tuple's floating-point tensors carry gradients back."""

    def __init__(self, module: nn.Module, index: int, n_stages: int, pp_world, loss_fn=None,
                 device="cpu", recompute: bool = False, weights=None):
        self.module, self.index, self.n = module, index, n_stages
        self.world, self.loss_fn, self.device = pp_world, loss_fn, device
        self.p = pp_world.size if pp_world is not None else n_stages
        self.recompute, self.weights = recompute, weights     # weights: a pipedream.WeightStash
        self.layers = list(module.named_children()) if isinstance(module, nn.Sequential) else [("", module)]
        self.layer_names = [n for n, _ in self.layers] or ["(empty)"]
        # each layer's parameters by its own names -> the stage module's names (2BW's versions are
        # keyed so); a parameter two layers share (tied) is W's work in the last of them, whose
        # output's gradient covers both uses (walking the layers between again: `shared`)
        full = {id(q): n for n, q in module.named_parameters()}
        self.param_names = [{k: full[id(q)] for k, q in layer.named_parameters()} for _, layer in self.layers]
        last_user = {g: i for i, names in enumerate(self.param_names) for g in names.values()}
        self.w_names = [[g for g in names.values() if last_user[g] == i] for i, names in enumerate(self.param_names)]
        self.shared = sum(map(len, self.param_names)) > len(last_user)
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
        """The layers on x (with `params` standing in for the weights when given); `keep`: each
        layer's output tensors that need a gradient, for split backward."""
        ys, h = [], x
        for (name, layer), names in zip(self.layers, self.param_names):
            if params is None:
                h = layer(h)
            else:
                h = functional_call(layer, {k: params[g] for k, g in names.items() if g in params}, (h,))
            if keep:
                ys.append(needing_grad(h))
        return h, ys

    def _loss(self, out, target, weight):
        check_loss_shapes(self.loss_fn, out, target)
        check_mean_loss(self.loss_fn, out, target, whole=weight == 1)
        return self.loss_fn(out, target) * weight

    def forward(self, mb: int, x, target=None, weight: float = 1.0,
                params: dict | None = None, split: bool = False):
        """Forward one micro-batch and stash what its backward needs (each layer's output too
        when its backward will be `split`); returns the output."""
        training = torch.is_grad_enabled()
        if training and not self.is_first:
            x = leaves(x)
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
            f"{self.layer_names[-1]}) cannot take the activation {describe_value(x)} from rank "
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
    def backward(self, mb: int, grad=None, split: bool = False):
        """B: the gradient for the previous stage (a tuple's: one per floating-point tensor).
        Whole (weights too) unless `split`, when the weight gradients wait for backward_weight(mb)."""
        if not split:
            e = self.stash.pop(mb)
            self._materialize(e, False)
            if isinstance(e.root, torch.Tensor):
                if e.root.requires_grad:       # not when nothing here needs a gradient (all frozen)
                    e.root.backward(grad)
            else:
                roots, grads = with_grads(e.root, grad)
                if roots:
                    torch.autograd.backward(roots, grads)
            if self.is_first:
                return None
            return e.x.grad if isinstance(e.x, torch.Tensor) else input_grads(e.x, {id(t): t.grad for t in e.x
                                                                                  if isinstance(t, torch.Tensor)})
        e = self.stash[mb]
        self._materialize(e, True)
        e.grad_root = grad
        roots, grads = with_grads(e.root, grad)
        kept = [(r, g) for r, g in zip(roots, grads) if r.requires_grad]     # all frozen: none
        roots, grads = [r for r, _ in kept], [g for _, g in kept]
        xs = needing_grad(e.x)
        wanted = xs + [y for ys in e.ys for y in ys]
        got = list(torch.autograd.grad(roots, wanted, grads, retain_graph=True, allow_unused=True)
                   if wanted and roots else [None] * len(wanted))
        rest = iter(got[len(xs):])
        e.grad_ys = [[next(rest) for _ in ys] for ys in e.ys]
        return None if self.is_first else input_grads(e.x, dict(zip(map(id, xs), got)))

    def backward_weight(self, mb: int) -> None:
        """W: each layer's weight gradients from its output's gradient kept by B; only that
        layer's part of the graph is walked, so no input-gradient work is repeated."""
        e = self.stash.pop(mb)
        last = len(self.layers) - 1
        source = e.params if e.params is not None else {
            n: q for n, q in self.module.named_parameters() if q.requires_grad}
        for i in range(len(self.layers)):
            params = [source[g] for g in self.w_names[i] if g in source]
            if i == last:
                roots, grads = with_grads(e.root, e.grad_root)
            else:   # a tensor passed on unchanged sits in two layers' outputs: its gradient counts once
                kept = {id(y): (y, g) for y, g in zip(e.ys[i], e.grad_ys[i]) if g is not None and y.grad_fn is not None}
                roots, grads = [y for y, _ in kept.values()], [g for _, g in kept.values()]
            if params and roots:
                # accumulates into .grad like a plain backward (post-accumulate hooks fire: dp overlap)
                torch.autograd.backward(roots, grads, inputs=params, retain_graph=self.shared)

    def loss_of(self, mb: int) -> float:
        return float(self.stash[mb].root.detach())

    @property
    def held(self) -> int:
        """Micro-batches whose activations this stage holds now."""
        return len(self.stash)

    # -- messages ------------------------------------------------------------------------
    def tag(self, kind: Kind, mb: int, chunk: int = 0) -> int:
        return tag(kind, mb, chunk)

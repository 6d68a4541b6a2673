"""ZeRO stage 3: the parameters sharded too, gathered whole one unit (layer) at a time.

Each unit's parameters live as one flat vector; replica r owns segment r of it (`segment_of`)
and keeps only that between uses -- its share of the model, 1/N. Just before a unit's forward
its vector is all-gathered (the parameters become views of it again); right after the forward
it is freed. Its backward needs the weights again: a hook on the unit's output fires when the
gradient reaches it, before the unit's own backward runs, and gathers the vector once more;
when every parameter of the unit has received its gradient (post-accumulate hooks) the vector
is freed again, and on the step's last backward pass the unit's gradients are reduce-scattered
(each replica keeps the sum of its own segment) and dropped: .grad is a ReducedGrad until the
step, which refuses any use (torch's clip_grad_norm_ would clip nothing; clip at the step).

Freeing shrinks the vector's storage to nothing instead of dropping it: the tensors autograd
saved in the forward (a weight, its transpose) are views of that storage and see the data again
once it is gathered back for the backward. Between uses each parameter's `.data` is a
zero-stride stand-in of its own shape (reads give zeros, never freed memory); `gathered()`
makes the whole model readable and writable, e.g. for checkpoints. A block of gathered() leaves
the memory it gathered to whatever still refers to it (a state_dict taken inside stays whole and
saves and loads) and gives the units fresh, empty storage instead of shrinking that one.

Units are reduced in one fixed order (the last first) on every replica, like stage 2's
buckets, and the gathers follow the forward and backward order, which every replica shares:
the collectives match without a handshake.

On one host the gathers go through a shared buffer of their own and the next unit's gather is
prefetched: entering unit u's forward (or its backward) starts unit u+1's (u-1's) -- its segment
copied into shared memory, the barrier posted -- and the unit's compute runs while the peers
arrive; entering u+1 only waits for what is left and copies the peers' segments in. Across hosts
each gather is the ring, on demand. Schedules that split a backward into input and
weight passes (zero-bubble) are not supported: a unit's backward there has two halves.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..comm.shared import SharedBuffer, one_host
from ..comm.waits import BOARD
from ..errors import ConfigError
from .buckets import GradientsChangedError, GradientWrites, digest
from .reduce import all_gather, reduce_scatter, segment_of
from .shm import shared_all_gather_start


class ReducedGrad(torch.Tensor):
    """A parameter's .grad once ZeRO stage 2 or 3 has reduced it over the replicas, until the step:
    no memory, and any use refused with one line -- torch's clip_grad_norm_ would otherwise clip
    nothing (a None .grad is skipped), and another backward pass into it would be lost."""

    @staticmethod
    def __new__(cls, p: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, p.shape, dtype=p.dtype, device=p.device)

    def untyped_storage(self):
        """None of its own (what memory.held_bytes counts: nothing)."""
        return torch.UntypedStorage(0)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise GradientsChangedError(
            f"{func.overloadpacket.__name__} on a .grad that ZeRO stage 2 or 3 already reduced over the "
            f"data-parallel replicas (each keeps only its segment of the sum, so .grad holds nothing until the step "
            f"and torch's clip_grad_norm_ or clip_grad_value_ would clip nothing): clip with opt.step(clip=...), "
            f"which returns the global norm; with several backward passes a step, call opt.begin_step(passes) "
            f"before the first")


def drop_reduced(params) -> None:
    """.grad None again where it is a ReducedGrad: a new round of backward passes, or the step."""
    for p in params:
        if isinstance(p.grad, ReducedGrad):
            p.grad = None


class ShardedParameters:
    """`params` (their order: the optimizer's) grouped by the module of `units` that holds
    them; this replica's segments of every unit's flat vector in `data` (what the optimizer
    steps) and the summed gradient of those segments in `grad`."""

    def __init__(self, params: list[torch.Tensor], units, world):
        self.world, self.params = world, params
        index = {id(p): i for i, p in enumerate(params)}
        self.unit_of: dict[int, int] = {}
        self.members: list[list[int]] = []           # per unit: indices into params, in module order
        self.modules = []
        for m in units:
            mine = []
            for p in m.parameters():
                i = index.get(id(p))
                if i is None:
                    continue
                if i in self.unit_of:
                    raise ConfigError(f"ZeRO stage 3 gathers parameters per unit: a parameter of shape "
                                      f"{tuple(p.shape)} is shared by two units (tie it inside one)")
                self.unit_of[i] = len(self.members)
                mine.append(i)
            if mine:
                self.members.append(mine)
                self.modules.append(m)
        if len(self.unit_of) != len(params):
            raise ConfigError(f"ZeRO stage 3 gathers parameters per unit (layer): {len(params) - len(self.unit_of)} "
                              f"parameter(s) belong to none of the {len(self.members)} unit(s)")
        dtype = params[0].dtype
        self.offset = [0] * len(params)              # where each parameter starts in its unit's vector
        self.sizes, self.segments, self.at = [], [], []
        owned = 0
        for mine in self.members:
            size = 0
            for i in mine:
                self.offset[i] = size
                size += params[i].numel()
            self.sizes.append(size)
            self.segments.append(segment_of(size, world.size, world.rank))
            self.at.append(owned)                    # where this unit's segment starts in `data`
            owned += self.segments[-1][1] - self.segments[-1][0]
        self.data = torch.zeros(owned, dtype=dtype)
        self.grad = torch.zeros(owned, dtype=dtype)
        self.full = [torch.zeros(n, dtype=dtype) for n in self.sizes]
        self.stand_in = [torch.zeros(1, dtype=dtype).expand(p.shape) for p in params]
        self.reduced = [ReducedGrad(p) for p in params]       # .grad once reduced, until the step
        self.had = [False] * len(params)      # whether each had a gradient at its reduction (the last step's)
        self.writes = GradientWrites()      # gradients not reduced yet: changed in place (a clip) before the step?
        self.is_gathered = [True] * len(self.members)
        with torch.no_grad():
            for u, mine in enumerate(self.members):
                for i in mine:
                    p = params[i]
                    self.full[u][self.offset[i]:self.offset[i] + p.numel()].copy_(p.detach().reshape(-1))
                    p.data = self._view(i)
                self._own(u).copy_(self._segment(u))
                self.free(u)
        # one host: gathers through their own double-buffered shared memory, the next one prefetched
        self.buffer = (SharedBuffer(world, 2 * max(self.sizes) * self.data.element_size())
                       if world.size > 1 and one_host(world) else None)
        self.pending = None                           # (unit, finish) of the gather in flight
        self.passes = 1
        self.scale = None       # op 'mean': () -> this replica's sample count, its gradients' weight
        self.hooks = []
        for u, m in enumerate(self.modules):
            self.hooks.append(m.register_forward_pre_hook(self._before_forward(u)))
            self.hooks.append(m.register_forward_hook(self._after_forward(u)))
        for i, p in enumerate(params):
            self.hooks.append(p.register_post_accumulate_grad_hook(self._on_grad(i)))
        for u, m in enumerate(self.modules):    # outside gathered() a unit's parameters are zero stand-ins
            self.hooks.append(m.register_state_dict_pre_hook(self._before_state_dict(u)))
        self.begin_step(1)

    # -- layout ---------------------------------------------------------------------------------
    def _view(self, i: int) -> torch.Tensor:
        p, u = self.params[i], self.unit_of[i]
        return self.full[u][self.offset[i]:self.offset[i] + p.numel()].view(p.shape)

    def _segment(self, u: int) -> torch.Tensor:
        a, b = self.segments[u]
        return self.full[u][a:b]

    def _own(self, u: int, of: torch.Tensor | None = None) -> torch.Tensor:
        a, b = self.segments[u]
        return (self.data if of is None else of)[self.at[u]:self.at[u] + b - a]

    # -- gather and free ------------------------------------------------------------------------
    @torch.no_grad()
    def gather(self, u: int) -> None:
        """Unit u's parameters whole on this replica (collective over the replicas)."""
        if self.pending is not None:              # gathers complete in the order they started
            v, finish = self.pending
            self.pending = None
            finish()
            self._whole_again(v)
        if not self.is_gathered[u]:
            finish = self._start(u)
            if finish is not None:
                finish()
            self._whole_again(u)

    @torch.no_grad()
    def prefetch(self, u: int) -> None:
        """Start gathering unit u (one host only; finished by the next gather)."""
        if self.buffer is None or not 0 <= u < len(self.members) or self.is_gathered[u] or self.pending is not None:
            return
        self.pending = (u, self._start(u))

    def _start(self, u: int):
        """Give unit u's vector its memory back, put this replica's segment in, start the
        all-gather; returns what finishes it (None: nothing left to do)."""
        full = self.full[u]
        full.untyped_storage().resize_(full.numel() * full.element_size())
        self._segment(u).copy_(self._own(u))
        if self.world.size == 1:
            return None
        if self.buffer is not None:
            return shared_all_gather_start(self.world, full, self.buffer,
                                           [segment_of(full.numel(), self.world.size, j) for j in range(self.world.size)])
        wire = full.clone()           # the ring hands its storage to MPI, which pins its size: gather a copy
        all_gather(self.world, wire)
        full.copy_(wire)
        return None

    def _whole_again(self, u: int) -> None:
        for i in self.members[u]:
            self.params[i].data = self._view(i)
        self.is_gathered[u] = True

    def free(self, u: int, hand_over: bool = False) -> None:
        """Unit u back to this replica's segment only. `hand_over`: the gathered memory is left to
        whatever still refers to it (a state_dict taken inside gathered()), the unit gets new."""
        if not self.is_gathered[u]:
            return
        for i in self.members[u]:
            self.params[i].data = self.stand_in[i]
        if hand_over:
            self.full[u] = torch.empty(self.sizes[u], dtype=self.data.dtype)
        self.full[u].untyped_storage().resize_(0)
        self.is_gathered[u] = False

    @contextmanager
    def gathered(self, write_back: bool = False):
        """Every unit whole for the duration (collective); `write_back`: what was written into
        the parameters becomes this replica's segments (e.g. after loading a checkpoint).
        Tensors taken inside (model.state_dict()) stay valid after the block."""
        with collective(self.world, "ShardedOptimizer.gathered()"):
            for u in range(len(self.members)):
                self.gather(u)
        try:
            yield
        finally:
            for u in range(len(self.members)):
                if write_back:
                    self._own(u).copy_(self._segment(u))
                self.free(u, hand_over=True)

    # -- hooks ----------------------------------------------------------------------------------
    def _before_state_dict(self, u: int):
        def hook(module, prefix, keep_vars):
            if self.is_gathered[u] or _called_from_mpipar():
                return      # mpipar's own code reads the segments itself (or only the keys, or the buffers)
            raise ConfigError(f"ZeRO stage 3 keeps only this replica's segment of {type(module).__name__} "
                              f"{prefix.rstrip('.') or 'model'}'s parameters outside `with opt.gathered():` "
                              f"(a state_dict here would hold zeros): take the state dict inside "
                              f"`with opt.gathered():`")
        return hook

    def _before_forward(self, u: int):
        def hook(module, args):
            self.gather(u)
            self.prefetch(u + 1)
        return hook

    def _after_forward(self, u: int):
        def hook(module, args, out):
            if torch.is_grad_enabled():   # the unit's backward will need its weights: gather them then
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(lambda grad: self._before_backward(u))
            self.free(u)
        return hook

    def _before_backward(self, u: int) -> None:
        self.gather(u)
        self.prefetch(u - 1)

    def begin_step(self, passes: int = 1) -> None:
        """Each parameter's gradient is final after `passes` backward passes (micro-batches)."""
        self.passes = max(1, int(passes))
        self.seen = [0] * len(self.params)
        self.arrived = [0] * len(self.members)
        self.waiting = [set(self.members[u]) for u in reversed(range(len(self.members)))]
        self.next = 0                                 # position in the reduce order (last unit first)
        self.writes.clear()
        drop_reduced(self.params)

    def _on_grad(self, i: int):
        def hook(p: torch.Tensor) -> None:
            u = self.unit_of[i]
            self.arrived[u] += 1
            if self.arrived[u] % len(self.members[u]) == 0:   # the unit's backward is done for this pass
                self.free(u)
            self.seen[i] += 1
            self.writes.note(i, p.grad)
            if self.seen[i] == self.passes:
                self.waiting[len(self.members) - 1 - u].discard(i)
                while self.next < len(self.members) and not self.waiting[self.next]:
                    self._reduce(len(self.members) - 1 - self.next)
        return hook

    @torch.no_grad()
    def _reduce(self, u: int) -> None:
        """Sum unit u's gradients over the replicas; keep this replica's segment of the sum."""
        scratch = torch.zeros(self.sizes[u], dtype=self.data.dtype)
        for i in self.members[u]:
            p = self.params[i]
            self.had[i] = p.grad is not None
            if p.grad is not None:
                scratch[self.offset[i]:self.offset[i] + p.numel()].copy_(p.grad.reshape(-1))
            p.grad = self.reduced[i]
            self.writes.grads.pop(i, None)
        if self.scale is not None:
            scratch.mul_(self.scale())
        mine = reduce_scatter(self.world, scratch) if self.world.size > 1 else scratch
        self._own(u, self.grad).add_(mine)
        self.next += 1

    def finish(self) -> torch.Tensor:
        """The step's remaining reductions (units whose gradients were not all final, in order)
        and every unit freed; returns this replica's summed gradient segments."""
        while self.next < len(self.members):
            self._reduce(len(self.members) - 1 - self.next)
        if self.pending is not None:              # a prefetch nothing used: complete it, then free
            self.gather(self.pending[0])
        for u in range(len(self.members)):
            self.free(u)
        return self.grad

    # -- whole vectors <-> this replica's segments (optimizer state in checkpoints) ---------------
    def whole(self, mine: torch.Tensor) -> list[torch.Tensor]:
        """Per parameter, the whole of a per-element quantity of which this replica holds
        `mine` (laid out like `data`); collective."""
        out = [None] * len(self.params)
        for u, members in enumerate(self.members):
            full = torch.zeros(self.sizes[u], dtype=mine.dtype)
            a, b = self.segments[u]
            full[a:b] = self._own(u, mine)
            if self.world.size > 1:
                all_gather(self.world, full)
            for i in members:
                out[i] = full[self.offset[i]:self.offset[i] + self.params[i].numel()].view(self.params[i].shape)
        return out

    def remove(self) -> None:
        """Hooks off and the shared buffer freed (collective)."""
        for h in self.hooks:
            h.remove()
        if self.pending is not None:
            self.gather(self.pending[0])
        if self.buffer is not None:
            self.buffer.free()
            self.buffer = None


@contextmanager
def collective(world, called: str):
    """A collective the user calls (`called`): every rank of `world` first shows it is in the same
    one (a rank in another collective gets one line saying so), and a stall inside names it."""
    with BOARD.inside(f"{called}, which every rank of {world.name} ({world.size} ranks) must call"):
        if world.size > 1:
            codes = world.allgather_floats([digest(called)])[:, 0]
            others = [world.world_rank_of(r) for r in range(world.size) if codes[r] != codes[world.rank]]
            if others:
                raise ConfigError(f"rank {world.world_rank_of(world.rank)} called {called} while rank(s) "
                                  f"{', '.join(map(str, others))} of {world.name} called another collective: "
                                  f"{called} is collective, every rank of {world.name} must call it")
        yield


def _called_from_mpipar() -> bool:
    """Whether the first caller outside torch is mpipar's own code (not a test's or a user's)."""
    import sys
    f = sys._getframe(2)
    while f is not None and f.f_globals.get("__name__", "").startswith("torch"):
        f = f.f_back
    return f is not None and f.f_globals.get("__name__", "").startswith("mpipar.")

"""Any traceable nn.Module as pipeline units. torch.fx traces the module's forward with the modules
at the cut level kept whole (its children, with ModuleLists, ModuleDicts and plain Sequentials
opened up: `blocks.2`), and the graph is cut before the first call of each of them into units:
small GraphModules, each taking the tuple of values live at its start and returning the tuple live
at its end (a value a later stage uses -- the residual stream, positions, a mask -- passes through
the units between). The units are LayerSpecs to the rest of the pipeline (rank map, balance,
stages, ZeRO, recompute, checkpoints). A parameter that units on several pipeline ranks use (a head
tied to the embedding) stays one parameter of the user's model: Ties sums its gradient over them.

Why torch.fx and not torch.export: fx traces the user's Python module as it is into a graph whose
call_module and get_attr nodes name the user's own submodules and parameters, so every unit holds
the user's module objects under the user's names (single-process state-dict keys; a tied
parameter is one object) and runs them eagerly: autograd, recompute and 2BW's functional_call
work unchanged, with no example input. torch.export lowers to ATen with the parameters lifted into
inputs (a functional graph to rebind to the parameters) and needs example inputs. What fx cannot
trace (data-dependent control flow) is refused with the construct named; LayerSpecs remain.
"""
from __future__ import annotations

import inspect
import linecache
import operator
import sys
import traceback
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..comm.world import allgather
from ..errors import ConfigError
from ..model import LayerSpec

FALLBACK = ("keep that code inside one submodule (a block Pipeline keeps whole), or give Pipeline an "
            "nn.Sequential or a list of mpipar.LayerSpec")


def opened(module: nn.Module) -> bool:
    """A container whose items are the cut level: it has no forward of its own (ModuleList,
    ModuleDict) or runs its items in a row (nn.Sequential's own forward)."""
    return (isinstance(module, (nn.ModuleList, nn.ModuleDict))
            or isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward)


def cut_level(model: nn.Module, prefix: str = "") -> list[str]:
    """Qualified names of the modules a cut may go before, in definition order (a module listed
    twice counts at its first place, as fx names it)."""
    names, seen = [], set()
    for name, child in model.named_children():
        if id(child) in seen:
            continue
        seen.add(id(child))
        names += cut_level(child, f"{prefix}{name}.") if opened(child) else [prefix + name]
    return names


NOT_USER = (str(torch.__path__[0]), __file__.rsplit("/pipeline/", 1)[0], "<")   # torch, mpipar, generated code


class CutTracer(fx.Tracer):
    """fx's tracer with the cut-level modules kept whole, buffers as graph values (a causal mask
    sliced in forward) and the user's (file, line) noted on every node (fx's own stack recording
    imports torch._inductor: seconds)."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        f = sys._getframe(1)
        while f is not None and f.f_code.co_filename.startswith(NOT_USER):
            f = f.f_back
        if f is not None:
            node.meta["user_frame"] = (f.f_code.co_filename, f.f_lineno)
        return node


def user_frame(frames: list[tuple[str, int]]) -> str:
    """'file.py:12 (`code`)' of the last (file, line) outside torch and mpipar, or ''."""
    mine = [f for f in frames if not f[0].startswith(NOT_USER)]
    return f"{mine[-1][0]}:{mine[-1][1]} (`{linecache.getline(*mine[-1]).strip()}`)" if mine else ""


def origin(node: fx.Node) -> str:
    """Where the user's forward made this value, or its node name."""
    return user_frame([node.meta["user_frame"]] if "user_frame" in node.meta else []) or node.name


def trace(model: nn.Module, leaves: list[str]) -> fx.Graph:
    """The forward's graph; a module fx cannot trace is refused with the construct and the fallback."""
    kind = type(model).__name__
    if model._forward_hooks or model._forward_pre_hooks:
        raise ConfigError(f"{kind} has forward hooks, which a traced split would not run: put them on a "
                          f"submodule, or {FALLBACK}")
    args = list(inspect.signature(model.forward).parameters.values())
    odd = [a.name for a in args if a.kind in (a.VAR_POSITIONAL, a.VAR_KEYWORD, a.KEYWORD_ONLY)]
    if not args or odd or any(a.default is a.empty for a in args[1:]):
        raise ConfigError(f"{kind}.forward{inspect.signature(model.forward)} takes other than one input: "
                          f"Pipeline feeds a split module x alone (further arguments need defaults, *args and "
                          f"**kwargs are not traced); {FALLBACK}")
    try:
        return CutTracer(set(leaves)).trace(model, concrete_args={a.name: a.default for a in args[1:]})
    except Exception as e:   # fx's TraceError, and what user code raises on a Proxy
        where = user_frame([(f.filename, f.lineno) for f in traceback.extract_tb(e.__traceback__)])
        why = " ".join(str(e).split("\n")[0].split()) or type(e).__name__
        raise ConfigError(f"{kind}.forward cannot be traced by torch.fx" + (f" at {where}" if where else "")
                          + f": {why}; {FALLBACK}") from None


def crossing(values: tuple, names: tuple, cut: str) -> tuple:
    """A unit's live values on their way to the next unit: tensors and numbers only (what travels
    between ranks)."""
    for v, name in zip(values, names):
        if not isinstance(v, (torch.Tensor, int, float, bool)):
            raise ConfigError(f"the value made at {name} is a {type(v).__name__} that forward uses after the cut "
                              f"before {cut}: only tensors and numbers travel between pipeline stages; compute "
                              f"it after the cut (e.g. from a tensor's shape or device there), or {FALLBACK}")
    return values


@dataclass
class Traced:
    """A module cut into units. `specs`: the units as LayerSpecs (named after their first module,
    dots as underscores), `starts`: that module's dotted name per unit (what split= names),
    `keys`: the model's state-dict keys, `order`: id(parameter) -> its place in model.parameters()."""
    kind: str
    specs: list[LayerSpec]
    starts: list[str]
    keys: set[str]
    order: dict[int, int]

    def sizes(self, split, n: int) -> list[int]:
        """Units per stage for split= names (a cut before each), n stages wanted."""
        split = [split] if isinstance(split, str) else list(split)
        unknown = [s for s in split if s not in self.starts]
        if unknown:
            raise ConfigError(f"split= names {', '.join(map(repr, unknown))}, which is not a module {self.kind} "
                              f"can be cut before; the candidates, in forward order: {', '.join(self.starts)}")
        if len(split) != n - 1:
            raise ConfigError(f"split= names {len(split)} cut point(s), {len(split) + 1} stage(s), but the "
                              f"pipeline has {n} (pp x chunks per rank): name {n - 1} modules to cut before")
        at = [0] + [self.starts.index(s) for s in split] + [len(self.starts)]
        empty = next((j for j in range(n) if at[j + 1] <= at[j]), None)
        if empty is not None:
            raise ConfigError(f"split= {split} leaves stage {empty} without a module: name the cut points in "
                              f"forward order, each once and none before {self.starts[0]} (candidates: "
                              f"{', '.join(self.starts)})")
        return [b - a for a, b in zip(at, at[1:])]

    def state_dict(self, units) -> dict:
        """The units' tensors under the model's own names (a tied one once)."""
        out = {}
        for unit in units:
            for k, v in unit.state_dict().items():
                if k in self.keys and k not in out:
                    out[k] = v.detach().clone()
        return out


def split_units(model: nn.Module) -> Traced:
    """Trace `model` and cut it before every cut-level module it calls."""
    kind = type(model).__name__
    leaves = cut_level(model)
    graph = trace(model, leaves)
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    output = next(n for n in nodes if n.op == "output")
    starts, seen = [], set()
    for i, n in enumerate(body):
        if n.op == "call_module" and n.target in leaves and n.target not in seen:
            seen.add(n.target)
            starts.append((i, n.target))
    if not starts:
        raise ConfigError(f"{kind}.forward calls none of its submodules, so there is nothing to cut between; "
                          f"{FALLBACK}")
    bounds = [0] + [i for i, _ in starts[1:]] + [len(body)]
    where = {n: i for i, n in enumerate(body)} | {n: -1 for n in inputs}
    last_use = {n: max((where.get(u, len(body)) for u in n.users), default=-1) for n in inputs + body}
    carried = [n for n in inputs + body if n.op != "get_attr"]

    def live(k: int) -> list[fx.Node]:   # the values crossing the cut before unit k
        return [n for n in carried if where[n] < bounds[k] <= last_use[n]]

    specs = []
    for k, (_, first) in enumerate(starts):
        g, env = fx.Graph(), {}
        if k == 0:
            for ph in inputs:
                env[ph] = g.node_copy(ph)
        else:
            values = g.placeholder("values")
            for j, n in enumerate(live(k)):
                env[n] = g.call_function(operator.getitem, (values, j))

        def arg(n: fx.Node) -> fx.Node:
            if n not in env:          # a parameter or buffer read in an earlier unit: read it here too
                env[n] = g.get_attr(n.target)
            return env[n]

        for n in body[bounds[k]:bounds[k + 1]]:
            env[n] = g.node_copy(n, arg)
        if k == len(starts) - 1:
            g.output(fx.map_arg(output.args[0], arg))
        else:
            out = live(k + 1)
            g.output(g.call_function(crossing, (tuple(env[n] for n in out), tuple(origin(n) for n in out),
                                                starts[k + 1][1])))
        unit = fx.GraphModule(model, g, class_name=f"{kind}Unit")
        specs.append(LayerSpec(first.replace(".", "_"), build=lambda unit=unit: unit))
    order = {id(q): i for i, q in enumerate(model.parameters())}
    return Traced(kind, specs, [t for _, t in starts], set(model.state_dict()), order)


class Ties:
    """Parameters used by units on several pipeline ranks (a head tied to the embedding), each
    one parameter of the user's model: the copies start from the first holder's value, and after
    backward every holder's gradient becomes the sum over the holders, added up in pp-rank order
    on each of them, so the copies stay bit-identical (with dp > 1 after the replicas' all-reduce:
    the sum of every use). `groups`: (sub-World of the holders, their tied parameters in model
    order), for the groups this rank is in."""

    def __init__(self, groups: list):
        self.groups = groups

    @classmethod
    def build(cls, units: dict[str, nn.Module], stages: list[list[str]], pp_world) -> "Ties":
        """From every unit (name -> module, in model order) and the virtual stages' unit names.
        Collective over pp_world: one split per set of holders, the same on every rank."""
        rank_of = {name: j % pp_world.size for j, names in enumerate(stages) for name in names}
        holders: dict[int, tuple] = {}
        for name, unit in units.items():
            for q in unit.parameters():
                holders.setdefault(id(q), (q, set()))[1].add(rank_of[name])
        by_ranks: dict[tuple, list] = {}
        for q, ranks in holders.values():
            if len(ranks) > 1 and q.requires_grad:
                by_ranks.setdefault(tuple(sorted(ranks)), []).append(q)
        groups = []
        for ranks, params in sorted(by_ranks.items()):
            world = pp_world.split(0 if pp_world.rank in ranks else None, pp_world.rank,
                                   f"tied over pp ranks {','.join(map(str, ranks))}")
            if world is not None:
                groups.append((world, params))
                for q in params:                 # the copies start equal (a model built without a seed)
                    world.bcast_(q.detach(), 0)
        return cls(groups)

    def __bool__(self) -> bool:
        return bool(self.groups)

    def sync(self) -> None:
        """Every tied gradient := the sum of the holders' (none counts as zeros). Collective over each group."""
        for world, params in self.groups:
            flat = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1) for q in params])
            every = allgather(world, flat)
            total = every[0].clone()
            for r in range(1, world.size):
                total += every[r]
            at = 0
            for q in params:
                g = total[at:at + q.numel()].view_as(q)
                at += q.numel()
                if q.grad is None:
                    q.grad = g.clone()
                else:
                    q.grad.copy_(g)

"""Executes a schedule's action list on one rank, posting receives ahead of need.

The engine knows nothing of any particular schedule: it walks the list. Receives are posted
`lookahead` actions early (non-blocking) so a neighbour's send never waits on us; sends are
non-blocking and completed in order, at most `lookahead` outstanding, so memory stays bounded.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Sequence

import torch

from ..comm.tags import Kind
from .schedules import Action
from .stage import Stage

RECVS = {"RECV_F": Kind.ACT, "RECV_B": Kind.GRAD}


class Engine:
    def __init__(self, stage: Stage, lookahead: int = 2):
        self.stage, self.lookahead = stage, max(1, lookahead)

    def run(self, actions: Sequence[Action], inputs: Sequence[torch.Tensor] | None,
            targets: Sequence | None, weights: Sequence[float],
            on_output: Callable[[int, torch.Tensor], None] | None = None) -> None:
        """Run one step. `inputs` is read on the first stage, `targets` on the last one;
        `on_output(mb, out)` sees each last-stage output (metrics)."""
        st, w = self.stage, self.stage.world
        recv_queue = deque(a for a in actions if a.op in RECVS)
        posted: dict[tuple[str, int, int], object] = {}
        sends: deque = deque()
        received: dict[tuple[str, int, int], torch.Tensor] = {}
        grads_out: dict[int, torch.Tensor] = {}

        def post_more():
            while recv_queue and len(posted) < self.lookahead:
                a = recv_queue.popleft()
                peer = st.prev if a.op == "RECV_F" else st.next
                posted[(a.op, a.mb, a.chunk)] = w.irecv(peer, st.tag(RECVS[a.op], a.mb, a.chunk),
                                                        device=st.device)

        def send(t, peer, kind, a):
            sends.append(w.isend(t, peer, st.tag(kind, a.mb, a.chunk)))
            while len(sends) > self.lookahead:
                sends.popleft().wait()

        post_more()
        for a in actions:
            if a.op in RECVS:
                key = (a.op, a.mb, a.chunk)
                if key not in posted:
                    raise RuntimeError(f"schedule bug: {a!r} was not posted in order")
                received[key] = posted.pop(key).wait()
                post_more()
            elif a.op == "F":
                x = inputs[a.mb] if st.is_first else received.pop(("RECV_F", a.mb, a.chunk))
                y = targets[a.mb] if (st.is_last and targets is not None) else None
                out = st.forward(a.mb, x, y, weights[a.mb])
                if st.is_last and on_output is not None:
                    on_output(a.mb, out)
            elif a.op == "SEND_F":
                send(st.outputs[a.mb], st.next, Kind.ACT, a)
                if not torch.is_grad_enabled():
                    st.outputs.pop(a.mb)
                    st.inputs.pop(a.mb, None)
            elif a.op == "B":
                g = None if st.is_last else received.pop(("RECV_B", a.mb, a.chunk))
                gi = st.backward(a.mb, g)
                if gi is not None:
                    grads_out[a.mb] = gi
            elif a.op == "SEND_B":
                send(grads_out.pop(a.mb), st.prev, Kind.GRAD, a)
            else:
                raise ValueError(f"unknown action {a!r}")
        while sends:
            sends.popleft().wait()
        if not torch.is_grad_enabled():
            st.outputs.clear()
            st.inputs.clear()

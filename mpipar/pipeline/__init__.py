"""pipeline: pipeline parallelism. Schedules are data, proven sound in one process before any
process runs, and executed by one engine on stages; Pipeline is what a user holds.

    pipe.py       Pipeline: this rank's share of a model, one call for a batch's forward and backward
    split.py      any traceable nn.Module cut by torch.fx into units at named submodules; tied parameters
    balance.py    cutting the layers into stages by what they cost (profiled), and the balance table
    schedules.py  schedules as data: (stages, micro-batches, stage) -> that stage's ordered actions
    pipedream.py  PipeDream-2BW: 1F1B that never flushes, sound through double-buffered weights
    actions.py    the atoms of every schedule: actions, forward/backward units and their messages
    simulate.py   every rank's action list run in one process, no MPI: soundness, bubble, memory
    engine.py     executes one rank's action list, posting receives ahead of need
    stage.py      one pipeline stage on one rank: its layers, what it stashed for backward, neighbours
    timeline.py   --timeline: when each action really ran, as a Chrome trace and a Gantt chart
"""

"""The command-line app built on the engine: `python -m mpipar.run EXAMPLE` (run, session,
tp_session), the example registry and the Example record, the relaunching supervisor, the serving
loop of the realtime examples, small pipeline-friendly layers, and the example datasets'
loaders (datasets/). The engine never imports from here; the examples, benchmarks and tests do.

Where the examples and their data are: a checkout's `examples/` beside `mpipar/`, else the copy a
non-editable `pip install` put in `mpipar/app/examples` (see `places`).

    run.py         `python -m mpipar.run EXAMPLE`: the World, failure handling, rank map, banner
    session.py     one run of one example on this rank: grid, rank map, banner, training, summary
    tp_session.py  a tensor-parallel example: the sharded model, its single-device twin, the curves
    example.py     Example: what an example states (model, data, loss, optimizer, task)
    registry.py    finding examples by name (places.examples_dir) or by path
    places.py      where the examples and their data are, in a checkout and after `pip install`
    supervise.py   the supervisor: relaunches a job whose rank died, to resume from a checkpoint
    realtime.py    serving under load: arrivals, a micro-batching serving loop, latency summary
    layers.py      small layers that make common models pipeline-friendly; the word-level loss
"""

"""The command-line app built on the engine: `python -m mpipar.run EXAMPLE` (run, session,
tp_session), the example registry and the Example record, the relaunching supervisor, the serving
loop of the realtime examples, small pipeline-friendly layers, and the example datasets'
loaders (datasets/). The engine never imports from here; the examples, benchmarks and tests do.

Where the examples and their data are: a checkout's `examples/` beside `mpipar/`, else the copy a
non-editable `pip install` put in `mpipar/app/examples` (see `places`).
"""

"""The examples as installed by `pip install "mpipar[examples]"` (a non-editable install maps this
folder to mpipar/app/examples): run them with `python -m mpipar.run NAME`, list them with --list."""

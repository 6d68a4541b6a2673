"""Benchmarks, run under mpirun: `python -m mpipar.bench NAME [flags]`. Each prints ours next to
its peer measured in the same run, as ratios (timings on a shared machine are noisy).

    allreduce.py        our all-reduce against native MPI_Allreduce and torch gloo, 1 KiB .. 64 MiB
    _overlap.py         allreduce --overlap: a CNN step with buckets reduced during backward or after
    allreduce_hosts.py  allreduce-hosts: the all-reduce across emulated hosts with capped links
    dp_step.py          dp-step: dp-cifar's training step, ours against torch DistributedDataParallel
    dp_gpt.py           dp-gpt: gpt-shakespeare's GPT on one process, on dp=N, and the host's ceiling for N
    p2p.py              mpipar send/recv against raw mpi4py Send/Recv, ping-pong
    device.py           moving and all-reducing device tensors, each way mpipar can
    pipeline.py         schedule efficiency, activation memory, torch.distributed.pipelining (a GPT too)
    _pipeline_parts.py  the pipeline benchmark's building blocks: sleeping stages, lazy batches, timing
    balance.py          a pipeline step under each way of cutting the model into stages
    tp.py               ParallelMLP at tp = 1, 2, 4 against the unsplit model
    zero.py             model-state memory and step time: data parallelism against ZeRO 1, 2, 3
    async_ps.py         async: parameter servers, synchronous against bounded staleness
    checkpoint.py       checkpoint/restart: supervised runs with injected faults, and the overhead
    oversubscribed.py   more ranks than cores, with and without the MPI's yield-when-idle settings
"""

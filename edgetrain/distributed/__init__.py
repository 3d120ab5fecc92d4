"""Scale out with torch.distributed (issue 15): modules on several processes, data on several
replicas. Launched with torchrun; `edgetrain fit --distributed` dispatches here.

    topology.py    who is who: ranks, stages, replicas, process groups, the launch env
    transport.py   activations between stages: point-to-point, bounded in flight
    replicas.py    data-parallel replicas: shards, DistributedDataParallel, BatchNorm statistics
    stage.py       one module as one rank trains it; the state that travels to rank 0
    pipeline.py    --mode parallel: the pipeline of modules
    sequential.py  --mode sequential: each module data-parallel over every rank, the
                   disk cache written by rank 0 into the shared --out
    planning.py    --memory-budget per rank
    run.py         setup, rank 0's run folder, the report
    errors.py      LaunchError (exit 2), PeerError (exit 3)

Nothing here is imported unless --distributed is given (this file imports no torch: the CLI
reads errors.py).
"""

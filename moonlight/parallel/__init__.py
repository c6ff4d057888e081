"""Parallelism for Moonlight on torch.distributed DeviceMesh / DTensor. Import from the submodules
(mesh, parallelize, tensor, expert, context, pipeline, pipeline_layout, data_parallel, load): this file
stays empty so that a cheap one (pipeline_layout) does not pull in the rest.

Typical use (every rank):

    dims = ParallelDims(dp_shard=-1, tp=2).validate(args, sequence_parallel=True, seq_len=4096)
    mesh = build_mesh(dims)                    # after init_process_group(nccl | gloo)
    with torch.device("meta"):
        model = Moonlight(args)
    parallelize_model(model, dims, mesh, sequence_parallel=True, ac_mode="selective")
    model.to_empty(device=...); load_hf_sharded(model, hf_dir)   # or init_weights()
"""

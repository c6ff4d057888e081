"""Parallelism for Moonlight on torch.distributed DeviceMesh / DTensor.

Typical use (every rank):

    dims = ParallelDims(dp_shard=-1, tp=2).validate(args, sequence_parallel=True, seq_len=4096)
    mesh = build_mesh(dims)                    # after init_process_group(nccl | gloo)
    with torch.device("meta"):
        model = Moonlight(args)
    parallelize_model(model, dims, mesh, sequence_parallel=True, ac_mode="selective",
                      param_dtype="bfloat16", reduce_dtype="float32")
    model.to_empty(device=...); load_hf_sharded(model, hf_dir)   # or torch.manual_seed(s); init_weights()
    loss = cross_entropy_loss(model(tokens), labels)             # tokens: this dp rank's batch
    loss = reduce_token_losses(model(tokens, labels=labels), labels)  # no tp: chunked, no full logits
"""

from moonlight.parallel.load import load_hf_sharded
from moonlight.parallel.mesh import ParallelDims, ParallelMesh, build_mesh
from moonlight.parallel.parallelize import parallelize_model
from moonlight.parallel.tensor import cross_entropy_loss, reduce_token_losses

__all__ = ["ParallelDims", "ParallelMesh", "build_mesh", "parallelize_model", "cross_entropy_loss",
           "load_hf_sharded", "reduce_token_losses"]

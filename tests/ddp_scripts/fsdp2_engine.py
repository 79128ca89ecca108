"""The engine API with a user's own FSDP2 loop, under torchrun (2 ranks, gloo, CPU):
prepare (or attach) -> fully_shard -> optimizer -> one SGD step on a global batch -> gather the
full state on rank 0 -> finish_training (export on rank 0). Facts per rank as JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from _fsdp2_models import ENGINE_MODULES, accuracy_settings, calibration_data, global_batch
from _probe import KMEANS_CALLS, record
from helpers import lut_hash, tiny_llama
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from coreai_palettize_plugins import Palettization
from coreai_palettize_plugins.engine.fsdp import replicated_state_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--cluster", choices=["before-shard", "after-shard"], default="after-shard")
    parser.add_argument("--build", choices=["cpu", "meta"], default="cpu",
                        help="meta: torchtune's pattern (build on meta, attach, shard, "
                             "to_empty, load the full dense state dict from rank 0)")
    parser.add_argument("--intermediate", type=int, default=128,
                        help="MLP width: 176 puts a 16-row LUT group across the shard boundary")
    parser.add_argument("--calibration", type=int, default=0,
                        help="palettize.calibration samples (batches of 1 from calibration_set)")
    parser.add_argument("--calibration-path", default=None)
    parser.add_argument("--budget", type=float, default=0.0, help="bits_per_weight")
    parser.add_argument("--training", default="ste")
    parser.add_argument("--adapters", type=int, default=0, help="LoRA rank (0: none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.device("meta" if args.build == "meta" else "cpu"):
        model = tiny_llama(intermediate_size=args.intermediate)
    x = global_batch()
    engine = Palettization("w4", modules=ENGINE_MODULES, export_dir=args.out / "export",
                           export_formats=["torch"], training=args.training,
                           **({"adapters": {"r": args.adapters}} if args.adapters else {}),
                           **accuracy_settings(
                               args.calibration, args.calibration_path, args.budget))
    if args.calibration:
        engine.calibration_data = lambda: calibration_data(model)
    if args.cluster == "before-shard":
        engine.prepare(model, {"input_ids": x[:1]})
    else:
        engine.attach(model, {"input_ids": x[:1]})
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    # accelerate's layout: the final norm and the (palettized) lm_head as one group, so the
    # parametrized lm_head's own class is wrapped (FSDPParametrizedLinear)
    fully_shard([model.model.norm, model.lm_head], mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)
    if args.build == "meta":
        record(args.out, rank, on_meta_after_shard=all(p.is_meta for p in model.parameters()))
        model.to_empty(device="cpu")
        full = (engine.map_dense_state_dict(tiny_llama(intermediate_size=args.intermediate)
                                            .state_dict()) if rank == 0 else {})
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                                   broadcast_from_rank0=True))
        rotary = model.model.rotary_emb  # a non-persistent buffer: the model's own to re-init
        for name, buffer in type(rotary)(rotary.config).named_buffers():
            getattr(rotary, name).copy_(buffer)
    engine.ensure_clustered()
    record(args.out, rank, lut_hash=lut_hash(model), kmeans=list(KMEANS_CALLS),
           calibration=(engine.calibration_stats.to_dict() if engine.calibration_stats
                        else None),
           allocation=engine.allocation.to_dict() if engine.allocation else None,
           stats_mode=engine.cluster_stats.mode if engine.cluster_stats else None,
           replicated_bytes=replicated_state_bytes(model),
           sharded_bytes=sum(p.to_local().numel() * p.element_size() for p in model.parameters()))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    engine.start_training(0)
    batch = x[rank * 2 // world:(rank + 1) * 2 // world]      # this rank's part of the batch
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    engine.before_optimizer_step()
    optimizer.step()
    optimizer.zero_grad()
    engine.after_optimizer_step(1)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    if rank == 0:
        torch.save(state, args.out / "full_state.pt")
    result = engine.finish_training(args.out / "export")
    record(args.out, rank, loss=loss.item(), exported=result is not None,
           lut_hash_at_end=lut_hash(model))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

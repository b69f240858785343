from .collectives import all_reduce_, all_to_all, copy_to, gather_last, reduce_from
from .device import Device, comm_device, get_device, module_device, to_device
from .grad_sync import average_gradients, global_grad_norm
from .groups import ParallelGroups, build_groups, layout
from .parallelize import full_slice, parallelize, parallelize_multimodal
from .plan import ParallelPlan
from .spawn import free_port, init_distributed, run_ranks

__all__ = [
    "Device",
    "ParallelGroups",
    "ParallelPlan",
    "all_reduce_",
    "all_to_all",
    "comm_device",
    "module_device",
    "to_device",
    "average_gradients",
    "build_groups",
    "copy_to",
    "free_port",
    "full_slice",
    "gather_last",
    "get_device",
    "global_grad_norm",
    "init_distributed",
    "layout",
    "parallelize",
    "parallelize_multimodal",
    "reduce_from",
    "run_ranks",
]

"""`tunebook` under accelerate's FSDP on CPUs, for the tests: what stands in for the GPUs this machine lacks.

accelerate 1.15 applies FSDP only to GPU-like launches: on a machine without GPUs AcceleratorState sets up a
MULTI_CPU (gloo) launch and keeps the FSDP plugin out of it, so the trainer trains data-parallel. torch's FSDP2
itself runs on CPUs with gloo. This entry point makes that one decision as accelerate makes it with GPUs (the
launch is FSDP, with the profile's plugin), then runs the real `tunebook` command: everything after it (model
sharding, the sharded LM head, gathering the adapter, FSDP checkpoints and resume) is the code users run.

    accelerate launch --config_file recipes/accelerate/fsdp.yaml -m fsdp_on_cpu train RECIPE   (tests/ on PYTHONPATH)
"""
from __future__ import annotations

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)  # later instances share the first one's state
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin


AcceleratorState.__init__ = _init_fsdp_on_cpu

try:  # bitsandbytes on AVX512-BF16 CPUs repacks a 4-bit weight in place for evaluation (Linear4bit.forward in
    # eval mode), a layout a sharded parameter does not keep through FSDP's gather; GPUs have no such path.
    import bitsandbytes.nn.modules as _bnb_modules

    _bnb_modules.has_avx512bf16 = lambda: False
except ImportError:
    pass

if __name__ == "__main__":
    from runner.cli import main

    main()

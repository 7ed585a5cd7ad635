"""The adapter's full weights when the model's parameters are sharded across the processes of a launch.

Under FSDP (and DeepSpeed ZeRO-3) no process holds a whole LoRA matrix: every process takes part in gathering
them, and the main process alone writes them. Only the trainable parameters are gathered, so the frozen base
(most of the model) is never assembled in one process's memory. One process, DDP and ZeRO-1/2 keep the adapter
whole in every process: nothing to gather.
"""
from __future__ import annotations


def adapter_state_dict(trainer) -> dict | None:
    """Call on every process. The adapter's weights, full and on the CPU, on the main process (an empty dict
    elsewhere); None when the model holds them whole (then `save_pretrained` reads them itself)."""
    if trainer.is_fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(trainer.model, options=options)
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        # the profile sets zero3_save_16bit_model, so accelerate can gather the 16-bit weights
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return None


def save_adapter(trainer, folder, state_dict: dict | None) -> None:
    """Write the adapter (main process only) from what `adapter_state_dict` gathered."""
    if state_dict is None:
        trainer.model.save_pretrained(folder)
    else:
        trainer.model.save_pretrained(folder, state_dict=state_dict)

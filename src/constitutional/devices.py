"""The device and precision a training stage runs on (`training.device`, `training.precision`).

Read by `training.trainer_arguments`, the one place that turns them into Trainer (and accelerate)
arguments. torch is imported inside the functions.
"""

from __future__ import annotations

from constitutional.errors import UserError
from constitutional.models import cpu_has_native_bf16


def use_cpu(device: str) -> bool:
    """Whether `device` means the CPU; selects GPU N for `cuda:N`."""
    import torch

    if device == "auto":
        return not torch.cuda.is_available()
    if device == "cpu":
        return True
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("training.device: 'mps' asked for, but this machine has no MPS device")
        return False
    if not torch.cuda.is_available():
        raise UserError(f"training.device: {device!r} asked for, but CUDA is not available")
    if device.startswith("cuda:"):
        index, count = int(device[len("cuda:") :]), torch.cuda.device_count()
        if index >= count:
            raise UserError(f"training.device: {device!r} asked for, but this machine has {count} GPU(s)")
        torch.cuda.set_device(index)
    return False


def mixed_precision(precision: str, device: str, use_cpu: bool) -> tuple[bool, bool]:
    """(bf16, fp16) for `precision` on the chosen device."""
    import torch

    on_cuda = not use_cpu and device != "mps"
    native_bf16 = torch.cuda.is_bf16_supported() if on_cuda else use_cpu and cpu_has_native_bf16()
    if precision == "auto":
        return native_bf16, False
    if precision == "bf16" and not native_bf16:
        hardware = "this GPU" if on_cuda else "this CPU (no AVX512-BF16 or AMX)" if use_cpu else f"device {device!r}"
        raise UserError(
            f"training.precision: bf16 asked for, but {hardware} has no native bf16: it would be emulated, "
            "slower than fp32 (use auto or fp32)"
        )
    return precision == "bf16", precision == "fp16"

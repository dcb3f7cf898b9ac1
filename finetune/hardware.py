"""What this machine can do, for choices the trainer and the server make alike."""

from __future__ import annotations


def cpu_has_bf16() -> bool:
    """Native bf16 on the CPU (AVX512-BF16, AMX): bf16 autocast is then several times faster than fp32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False

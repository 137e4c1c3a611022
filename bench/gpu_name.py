"""Print a short file-name-safe name of this machine's GPU: h100, a100, t4, ... ("cpu" without one)."""

from __future__ import annotations

import re


def short_name(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'NVIDIA A100-SXM4-40GB' -> 'a100'; 'Tesla T4' -> 't4'."""
    found = re.search(r"\b([A-Z]{1,2}\d{1,4})\b", device_name)
    return (found.group(1) if found else re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-")).lower()


if __name__ == "__main__":
    import torch

    print(short_name(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu")

"""Resident memory of this process, for the benchmarks' and ``forwardinf lds``'s peak-memory columns
(Linux ``/proc``; elsewhere the readings are NaN and the peak cannot be reset)."""
from __future__ import annotations

from pathlib import Path


def status_mb(field: str = "VmHWM") -> float:
    """``field`` of ``/proc/self/status`` in MB: ``"VmRSS"`` (resident now) or ``"VmHWM"`` (its peak)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return float("nan")
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """Reset the peak (VmHWM) to the current resident size (``5 > /proc/self/clear_refs``), so the next
    :func:`status_mb` reading is the peak of what runs in between. False when not possible here."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False

"""The machine line every benchmark and report prints (numbers compare only on one machine)."""

import os
import platform


def machine_line(*extra: str) -> str:
    cpu = platform.processor()
    if not cpu:
        try:
            with open("/proc/cpuinfo") as fh:
                cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
        except OSError:
            cpu = ""
    parts = [f"machine: {cpu or platform.machine()} ({platform.machine()})", f"nproc={os.cpu_count()}",
             f"python {platform.python_version()} ({platform.python_implementation()})", platform.system(), *extra]
    return ", ".join(parts)

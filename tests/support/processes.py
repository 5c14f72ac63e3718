"""Which processes run now, of any parent or session (Ansible's workers have their own)."""

from __future__ import annotations

import psutil


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line mentions ``text``.

    psutil's iteration skips a process that ends while it is read; zombies count as ended.
    """
    return [
        process.info["pid"]
        for process in psutil.process_iter(["pid", "cmdline", "status"])
        if process.info["status"] != psutil.STATUS_ZOMBIE
        and text in " ".join(process.info["cmdline"] or ())
    ]


def gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie waiting for its parent counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True

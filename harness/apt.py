"""Debian packages a test needs (prometheus, openssh-server): found on the machine, or installed as root."""

from __future__ import annotations

import os
import shutil
import subprocess


def apt_install(package: str, binary: str, timeout: float = 600.0) -> tuple[str | None, str]:
    """``(path, "")`` of ``binary`` on PATH, installing Debian's ``package`` first if it is missing (root only);
    ``(None, reason)`` when it cannot be had."""
    found = shutil.which(binary)
    if found:
        return found, ""
    if not shutil.which("apt-get"):
        return None, "%s is not installed and there is no apt-get here: install %r" % (binary, package)
    if os.geteuid() != 0:
        return None, "%s is not installed and we are not root: run `apt-get install %s` first" % (binary, package)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package])
    for cmd in steps:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return None, "`%s` timed out: cannot install Debian's %s package" % (" ".join(cmd), package)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            return None, "`%s` failed, cannot install Debian's %s package: %s" % (" ".join(cmd), package, tail)
    found = shutil.which(binary)
    if not found:
        return None, "the %s package installed no %s on PATH" % (package, binary)
    return found, ""

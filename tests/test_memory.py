"""The allocator settings of ``lmlp.memory``."""

import ctypes
import platform
import subprocess
import sys

import pytest

from lmlp import memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_glibc_takes_both_thresholds():
    """``mallopt`` answers 1 for each value it accepts; the settings are process-wide, hence a fresh
    process."""
    code = "from lmlp.memory import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_without_mallopt_nothing_is_set(monkeypatch):
    class NoMallopt:
        def __init__(self, name):
            pass

    monkeypatch.setattr(ctypes, "CDLL", NoMallopt)
    assert memory.keep_freed_memory.__wrapped__() is False

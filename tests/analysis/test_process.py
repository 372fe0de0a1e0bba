"""trajscope.analysis.process.keep_freed_memory: glibc's heap keeps freed memory, unless the user chose.

Each case runs in a fresh interpreter: mallopt changes the whole process, and the setting is
made once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = "from trajscope.analysis.process import keep_freed_memory as k; print(k(), k())"


def _run(env_extra: dict[str, str], drop: tuple[str, ...] = ()) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_active_by_default_on_glibc() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert _run({}, drop=("TRAJSCOPE_KEEP_FREED_MEMORY",)) == "True True"


@pytest.mark.parametrize("env", [
    {"TRAJSCOPE_KEEP_FREED_MEMORY": "0"},
    {"MALLOC_TRIM_THRESHOLD_": "1000000"},
    {"MALLOC_ARENA_MAX": "2"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"},
])
def test_left_alone_when_the_user_chose(env: dict[str, str]) -> None:
    assert _run(env) == "False False"

"""Build Triton kernels for Hopper (sm_90) with no GPU: the tests that check a kernel compiles."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Mapping


def rerun_without_interpreter(test_id: str) -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1, set by conftest without a GPU) compiles nothing, so
    run ``test_id`` again in a process without it and assert that it passed. True when it did so
    (the caller returns); False when this process can build kernels itself."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           test_id], env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    return True


def build_for_hopper(fn: Any, signature: Mapping[str, str], constexprs: Mapping[str, Any], num_warps: int,
                     num_stages: int | None = None) -> None:
    """Triton's whole pipeline down to ptxas for sm_90; raises where the kernel does not build."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    options = {"num_warps": num_warps, **({"num_stages": num_stages} if num_stages is not None else {})}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs)),
                   target=GPUTarget("cuda", 90, 32), options=options)

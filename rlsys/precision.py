"""Which dtype the engines and the learner compute in: the rule behind `rollout.dtype` and
`learner.compute_dtype` = "auto" (bfloat16 where it is native, float32 where it is emulated).

A leaf without omegaconf, torch or Ray: rlsys.config resolves a loaded config with it, and the
memory plan and the learner read it for configs built without load_config (the GPU check runs
with nothing but torch and transformers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def engine_dtype(rollout: Any) -> str:
    """The engines' weight dtype: rollout.dtype, "auto" resolved (on GPU engines: bfloat16)."""
    return resolve_dtype(rollout.dtype, gpu=rollout.num_gpus > 0)


def learner_compute_dtype(learner: Any) -> str:
    """The learner's forward/backward dtype: learner.compute_dtype, "auto" resolved."""
    return resolve_dtype(learner.compute_dtype, gpu=learner.device == "cuda")


def resolve_dtype(dtype: str, *, gpu: bool) -> str:
    """`dtype` itself, or for "auto": bfloat16 on a GPU or a CPU with native bfloat16
    arithmetic (`cpu_has_native_bf16`), else float32 (see rlsys.config.AUTO_DTYPE_DOC).

    It is decided where the config is loaded (the driver), for every engine and learner of the
    run: on a cluster whose CPU-only nodes differ, name the dtype.
    """
    if dtype != "auto":
        return dtype
    return "bfloat16" if gpu or cpu_has_native_bf16() else "float32"


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes in bfloat16 natively: the x86 flags avx512_bf16 or amx_bf16,
    or Arm's bf16 feature, in /proc/cpuinfo (`cpuinfo`: its text, for tests). Elsewhere
    (no /proc, e.g. macOS) this says no, and "auto" picks float32, which is never slow."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            features = set(value.split())
            return bool(features & {"avx512_bf16", "amx_bf16", "bf16"})
    return False

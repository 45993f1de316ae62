"""benchmarks/gpu_check.py: its CPU smoke run (the tiny model's shape) with only torch and
transformers importable, as on the GPU machines (no Ray, vLLM or omegaconf), and its helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.report import gpu_check_rows

REPO = Path(__file__).resolve().parent.parent

# Run the module with the packages the GPU machines lack made unimportable.
BLOCKED_RUN = """
import runpy, sys
for name in ("ray", "vllm", "omegaconf"):
    sys.modules[name] = None
sys.argv = ["gpu_check", *sys.argv[1:]]
runpy.run_module("benchmarks.gpu_check", run_name="__main__")
"""


def test_cpu_smoke_run_without_ray_vllm_omegaconf(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "--device", "cpu", "--out",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"]["kind"] == "cpu" and result["ok"] is True
    assert result["checks"] == {"plan_within_tolerance": True, "parity": True,
                                "dcp_round_trip": True, "weight_staging": True,
                                "checkpointing_saves_memory": True}
    staging = result["weight_staging"]
    assert staging["backend"] == "gloo" and staging["bytes"] > 0
    assert staging["stage_s"] > 0 and staging["staged_sync_s"] > 0
    (model,) = result["models"]
    assert model["model"] == "tiny-random" and model["micro_batches"] == 2
    assert model["attention_backend"] == "sdpa"
    for mode in ("none", "full"):
        figures = model["modes"][mode]
        assert figures["tokens_per_s"] > 0 and figures["peak_gib"] > 0
        assert abs(figures["plan_ratio"] - 1) <= 0.25
        assert "mfu_spec" not in figures  # no GPU, no peak to compare with
    assert model["checkpointing_saved_gib"] > 0
    assert result["dcp"]["max_abs_diff"] == 0.0
    # The report's rows of it.
    rows = gpu_check_rows(result)
    assert any(r.figure.startswith("DCP save/load round trip") and r.met for r in rows)
    assert sum(r.figure.startswith("memory plan / measured peak") for r in rows) == 2


def test_default_output_never_replaces_gpu_figures() -> None:
    from benchmarks.common import QUICK_RESULTS, RESULTS

    assert gpu_check.result_path("gpu_check", quick=True) == QUICK_RESULTS / "gpu_check.json"
    assert gpu_check.result_path("gpu_check", quick=False) == RESULTS / "gpu_check.json"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="has a GPU")
def test_cuda_without_a_gpu_is_refused(capsys: pytest.CaptureFixture) -> None:
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "no CUDA device here" in capsys.readouterr().err


def test_peaks_and_flops() -> None:
    from learners.packing import pack_microbatches
    from rlsys.memory_plan import KNOWN_SHAPES

    assert gpu_check.bf16_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.bf16_peak_tflops("Some GPU") is None
    # One prompt of 3 tokens, responses of 2 and 1: rows (3 queries, 3 keys), (2, 5), (1, 4):
    # pairs 6 + (2*3 + 3) + (1*3 + 1) = 19; 3 predicted tokens.
    (mb,) = pack_microbatches([[5, 6, 7], [5, 6, 7]], [[8, 9], [10]], 64)
    assert gpu_check.attention_visits(mb) == 19
    shape = KNOWN_SHAPES["tiny-random"]
    expected = (6 * (shape.layers * shape.layer_linear_params() * 6 + 512 * 128 * 3)
                + 12 * 128 * 2 * 19)
    assert gpu_check.model_flops(shape, [mb]) == expected

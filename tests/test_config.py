"""The config system: files, inheritance, overrides and the one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlsys.config import (
    Config,
    ConfigError,
    available_configs,
    load_config,
    to_yaml,
    worker_threads,
)


def test_defaults_are_valid_and_every_shipped_config_loads():
    assert isinstance(load_config([]), Config)
    for name in available_configs():
        cfg = load_config([f"conf={name}"])
        assert cfg.rollout.group_size >= 2


def test_file_then_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("rollout:\n  group_size: 4\ntrainer:\n  steps: 7\n")
    (tmp_path / "child.yaml").write_text("defaults: [base]\ntrainer:\n  steps: 9\n")
    cfg = load_config(["conf=child", "rollout.temperature=0.7"], conf_dir=tmp_path)
    assert cfg.rollout.group_size == 4  # inherited
    assert cfg.trainer.steps == 9  # the child wins over its parent
    assert cfg.rollout.temperature == 0.7  # the command line wins over files


def test_r1_zero_has_the_papers_settings():
    cfg = load_config(["conf=r1_zero"])
    assert cfg.learner.lr == 3e-6
    assert cfg.algorithm.kl_coef == 0.001
    assert cfg.rollout.group_size == 16
    assert cfg.rollout.prompts_per_step * cfg.rollout.group_size == 512
    assert cfg.rollout.temperature == 1.0
    assert cfg.rollout.max_new_tokens == 32768
    assert cfg.algorithm.ref_update_every == 400


# /proc/cpuinfo lines of the CPUs the rule tells apart (flags shortened).
AVX2_EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n"
ZEN4_EPYC = "processor\t: 0\nflags\t\t: avx2 avx512f avx512bw avx512_vnni avx512_bf16\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8\n"
ICE_LAKE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512bw avx512_vnni\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16 sve2\n"


@pytest.mark.parametrize(("cpuinfo", "native"), [
    (AVX2_EPYC, False), (ZEN4_EPYC, True), (SAPPHIRE_RAPIDS, True), (ICE_LAKE, False),
    (GRAVITON3, True), ("", False)])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native):
    from rlsys.precision import cpu_has_native_bf16

    assert cpu_has_native_bf16(cpuinfo) is native


@pytest.mark.parametrize("native", [False, True])
def test_auto_dtypes_are_bf16_on_gpus_and_native_cpus_else_fp32(monkeypatch, native):
    import rlsys.precision

    monkeypatch.setattr(rlsys.precision, "cpu_has_native_bf16", lambda: native)
    cpu = "bfloat16" if native else "float32"
    cfg = load_config(["conf=smol"])  # leaves both dtypes at their default, auto
    assert (cfg.rollout.dtype, cfg.learner.compute_dtype) == (cpu, cpu)
    cfg = load_config(["rollout.num_gpus=1", "learner.device=cuda"])
    assert (cfg.rollout.dtype, cfg.learner.compute_dtype) == ("bfloat16", "bfloat16")
    cfg = load_config(["rollout.dtype=float16", "learner.compute_dtype=float32"])
    assert (cfg.rollout.dtype, cfg.learner.compute_dtype) == ("float16", "float32")  # as named
    # What the run writes to its output folder is the resolved dtype, which reloads as is.
    assert f"dtype: {cpu}" in to_yaml(load_config([]))


@pytest.mark.parametrize(("args", "message"), [
    (["conf=nope"], "conf=nope: no such config; available: "),
    (["rollout.grup_size=3"], "unknown config key 'rollout.grup_size' (command line); "
                              "did you mean rollout.group_size?"),
    (["traner.steps=3"], "unknown config key 'traner.steps'"),
    (["trainer.steps=abc"], "bad value for 'trainer.steps'"),
    (["rollout.group_size=1"], "bad value for 'rollout.group_size': 1 (GRPO compares"),
    (["algorithm.loss_agg=mean"], "bad value for 'algorithm.loss_agg'"),
    (["algorithm.rollout_is=seq"], "bad value for 'algorithm.rollout_is': 'seq' (one of none, "
                                   "token, sequence)"),
    (["algorithm.rollout_is_cap=1.0"], "bad value for 'algorithm.rollout_is_cap': 1.0 (must be"),
    (["learner.stage_weights=true", "learner.sync_mode=delta"],
     "bad value for 'learner.stage_weights': True (needs learner.sync_mode=full"),
    (["algorithm.kl_in_reward=true", "algorithm.kl_coef=0"],
     "bad value for 'algorithm.kl_in_reward': True (needs algorithm.kl_coef > 0"),
    (["reward.weights.acc=1"], "unknown reward part 'acc'"),
    (["rollout.dtype=fp8"], "bad value for 'rollout.dtype': 'fp8' (one of bfloat16, float16, "
                            "float32, auto)"),
    (["data.task=file"], "bad value for 'data.path'"),
    (["data.task=mix"], "bad value for 'data.mix': {} (data.task=mix needs the tasks"),
    (["data.task=mix", "data.mix={arithmetic: 1, gsm8k: 1}"], "bad value for 'data.mix.gsm8k'"),
    (["data.task=mix", "data.mix={arithmetic: 0}"], "bad value for 'data.mix.arithmetic': 0.0 "
                                                     "(a sampling share must be > 0)"),
    (["data.task=mix", "data.mix={file: 1}"], "bad value for 'data.path'"),
    (["reward.per_task={humaneval: {accuracy: 1}}"], "bad value for 'reward.per_task.humaneval'"
                                                     ": {'accuracy': 1.0} (this run has no task"),
    (["data.task=mix", "data.mix={arithmetic: 1, humaneval: 1}",
      "reward.per_task={humaneval: {acc: 1}}"], "bad value for 'reward.per_task.humaneval': "
                                                "unknown reward part 'acc'"),
    (["trainer.steps"], "expected key=value"),
    (["data.arithmetic.phrasings=[Compute it.]"],
     "data.arithmetic.phrasings[0]: 'Compute it.' has no placeholder; use {expr}"),
    (["data.arithmetic.ops=[+, -]", "data.arithmetic.phrasings=['What is {expr}?', "
      "'Add {a} and {b}.']"], "data.arithmetic.phrasings[1]: 'Add {a} and {b}.' names {a}/{b}"),
    (["rollout.max_staleness=-1"], "bad value for 'rollout.max_staleness': -1 (must be >= 0)"),
    (["rollout.on_policy_steps=-2"],
     "bad value for 'rollout.on_policy_steps': -2 (must be >= 0)"),
    (["rollout.temperature_warmup_steps=5", "rollout.inflight=true",
      "rollout.max_staleness=1"], "bad value for 'rollout.temperature_warmup_steps': 5 "
                                  "(rollout.inflight samples groups before it knows the step"),
    (["rollout.temperature_start=0"], "bad value for 'rollout.temperature_start': 0.0"),
    (["learner.lr_schedule=step"], "bad value for 'learner.lr_schedule': 'step'"),
    (["learner.min_lr_ratio=2"], "bad value for 'learner.min_lr_ratio': 2.0 (must be in [0, 1])"),
    (["trainer.wandb_mode=cloud"], "bad value for 'trainer.wandb_mode': 'cloud' (online, "
                                   "offline or disabled)"),
    (["rollout.resources={GPU: 1}"], "bad value for 'rollout.resources.GPU': 1.0 (set "
                                     "rollout.num_cpus / num_gpus instead"),
    (["learner.resources={learner_node: -1}"], "bad value for 'learner.resources.learner_node'"
                                               ": -1.0 (an amount >= 0)"),
])
def test_errors_name_the_problem(args, message):
    with pytest.raises(ConfigError) as info:
        load_config(args)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_circular_defaults(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a]\n")
    with pytest.raises(ConfigError, match="circular defaults"):
        load_config(["conf=a"], conf_dir=tmp_path)


def test_cli_print_config_and_exit_codes():
    run = [sys.executable, "-m", "rlsys.run"]
    args = ["conf=tiny", "trainer.output_dir=/tmp/x"]
    ok = subprocess.run([*run, *args, "--print-config"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    config_part, plan = ok.stdout.split("# resource plan (Ray reservations):\n")
    assert config_part == to_yaml(load_config(args))
    assert "learner: 1 worker(s) (dp 1 x tp 1)" in plan
    r1 = subprocess.run([*run, "conf=r1", "--print-config"], capture_output=True, text=True)
    # The paper-scale recipe: a 16-GPU learner partition, engines on GPUs of their own.
    assert "learner: 16 worker(s) (dp 4 x tp 4) x {CPU: 4, GPU: 1}" in r1.stdout
    assert "rollout: 8 engine(s) x {CPU: 4, GPU: 1}" in r1.stdout
    assert "total:   CPU 112, GPU 24" in r1.stdout
    # Node pools: each role's custom resources join its reservation.
    pools = subprocess.run([*run, *args, "rollout.resources={rollout_node: 1}",
                            "learner.resources={learner_node: 1}", "--print-config"],
                           capture_output=True, text=True)
    assert "rollout: 1 engine(s) x {CPU: 1, rollout_node: 1}" in pools.stdout, pools.stderr
    assert "x {CPU: 1, learner_node: 1}, one placement group" in pools.stdout
    assert "reward:  1 worker(s) x {CPU: 0.5}\n" in pools.stdout
    bad = subprocess.run([*run, "conf=tiny", "rollout.grup_size=3"], capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: unknown config key 'rollout.grup_size' (command line); "
        "did you mean rollout.group_size?"]


@pytest.mark.parametrize(("args", "message"), [
    (["model.path=/no/such/model"], "error: model.path='/no/such/model' is neither"),
    (["data.task=file", "data.path=/no/such.jsonl"], "error: data.path"),
    (["rollout.max_model_len=4096", "learner.max_tokens_per_microbatch=8192"],
     "error: rollout.max_model_len=4096 exceeds the model's max_position_embeddings=1024"),
    (["learner.tp=3"], "error: learner.tp=3 must divide the model's attention heads (4)"),
])
def test_cli_bad_model_or_data_is_one_line(tmp_path, args, message):
    """Caught before any actor starts: one line, exit code 2, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "rlsys.run", "conf=tiny", f"trainer.output_dir={tmp_path}/run",
         *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(message), lines[-5:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_reward_weights_are_replaced_as_a_whole_but_single_weights_merge(tmp_path):
    cfg = load_config(["reward.weights={code_accuracy: 1.0, format: 0.5}"])
    assert cfg.reward.weights == {"code_accuracy": 1.0, "format": 0.5}
    cfg = load_config(["reward.weights.format=0.5"])
    assert cfg.reward.weights == {"accuracy": 1.0, "format": 0.5}
    (tmp_path / "code.yaml").write_text("reward:\n  weights: {code_accuracy: 1.0}\n")
    assert load_config(["conf=code"], conf_dir=tmp_path).reward.weights == {"code_accuracy": 1.0}


def test_cli_tokenizer_without_chat_template_is_one_line(tmp_path, cache_dir):
    import json
    import shutil

    from rlsys.models import resolve_model

    model = tmp_path / "no-template"
    shutil.copytree(resolve_model("tiny-random", cache_dir), model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    result = subprocess.run(
        [sys.executable, "-m", "rlsys.run", "conf=tiny", f"model.path={model}",
         "data.template=chat", f"trainer.output_dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.template=chat:") and "chat template" in last, last
    assert not (tmp_path / "run").exists()


def test_processes_sharing_a_node_divide_its_cores_between_them(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert worker_threads(0, [], 1) == 8  # one engine: the whole node
    assert worker_threads(0, [], 2) == 4  # two engines: half each, not 8 threads each
    assert worker_threads(0, [], 3) == 2  # rounded down: never more threads than cores
    assert worker_threads(0, [], 16) == 1  # at least one
    assert worker_threads(0, [2, 3], 2) == 1  # pinned: the pinned cores are what is shared
    assert worker_threads(3, [], 2) == 3  # set explicitly: as set


def test_temperature_warms_up_linearly_from_the_start_value():
    """Step 1 samples at rollout.temperature_start, step warmup + 1 on at rollout.temperature."""
    ramp = load_config(["rollout.temperature=1.5", "rollout.temperature_start=1.0",
                        "rollout.temperature_warmup_steps=10"]).rollout
    assert [ramp.temperature_at(s) for s in (1, 6, 11, 50)] == pytest.approx(
        [1.0, 1.25, 1.5, 1.5])
    fixed = load_config(["rollout.temperature=1.5"]).rollout
    assert {fixed.temperature_at(s) for s in (1, 2, 80)} == {1.5}

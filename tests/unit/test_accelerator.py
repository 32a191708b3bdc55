"""Accelerator selection, the launch environment, communication knobs, and the CPU mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm.accelerator import (
    AcceleratorError,
    LaunchError,
    backend_accepted,
    check_comm_env,
    read_launch_env,
    select_accelerator,
)
from mm.accelerator import cuda_on_cpu, device


@pytest.fixture
def fresh_selection(monkeypatch):
    """Each test selects from scratch; whatever it installs is undone afterwards."""
    monkeypatch.setattr(device, "_SELECTED", None)
    was_installed = cuda_on_cpu.is_installed()
    yield
    if not was_installed:
        cuda_on_cpu.uninstall()


def test_cpu_selected_by_flag(fresh_selection):
    acc = select_accelerator("cpu")
    assert (acc.name, acc.backend) == ("cpu", "gloo")
    assert acc.device() == torch.device("cpu")
    assert cuda_on_cpu.is_installed()


def test_env_decides_without_flag(fresh_selection, monkeypatch):
    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    assert select_accelerator(None).name == "cpu"


def test_auto_falls_back_to_cpu_without_gpu(fresh_selection, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "_npu_present", lambda: False)
    assert select_accelerator("auto").name == "cpu"


def test_cuda_requested_without_gpu_is_a_clear_error(fresh_selection, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AcceleratorError, match="--accelerator / MM_ACCELERATOR = 'cuda', but torch sees no CUDA GPU"):
        select_accelerator("cuda")


def test_npu_requested_without_torch_npu(fresh_selection, monkeypatch):
    monkeypatch.setattr(device, "_npu_present", lambda: False)
    with pytest.raises(AcceleratorError, match="torch_npu is not installed"):
        select_accelerator("npu")


def test_unknown_accelerator(fresh_selection):
    with pytest.raises(AcceleratorError, match="valid: auto, cuda, npu, cpu"):
        select_accelerator("tpu")


def test_cannot_switch_after_selection(fresh_selection, monkeypatch):
    select_accelerator("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(AcceleratorError, match="already selected as 'cpu'"):
        select_accelerator("cuda")


def test_backend_accepted():
    assert backend_accepted("cpu", "gloo") and not backend_accepted("cpu", "nccl")
    assert backend_accepted("npu", "hccl") and backend_accepted("npu", "nccl")
    assert not backend_accepted("cuda", "hccl")


def test_launch_env_single_process_without_torchrun():
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.local_rank) == (0, 1, 0) and env.master_port > 0


def test_launch_env_from_torchrun_variables():
    env = read_launch_env({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 16, 1, 8)
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 29501)


def test_launch_env_incomplete():
    with pytest.raises(LaunchError, match="MASTER_ADDR, MASTER_PORT missing"):
        read_launch_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_launch_env_rank_out_of_range():
    with pytest.raises(LaunchError, match=r"RANK=4 is outside \[0, WORLD_SIZE=4\)"):
        read_launch_env({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"})


def test_hccl_knob_ranges():
    assert check_comm_env("hccl", 10, {"HCCL_CONNECT_TIMEOUT": "1200"}) == []
    with pytest.raises(LaunchError, match=r"HCCL_CONNECT_TIMEOUT=60 is outside its valid range \[120, 7200\]"):
        check_comm_env("hccl", 10, {"HCCL_CONNECT_TIMEOUT": "60"})
    with pytest.raises(LaunchError, match="HCCL_EXEC_TIMEOUT='soon' must be an integer"):
        check_comm_env("hccl", 10, {"HCCL_EXEC_TIMEOUT": "soon"})


def test_hccl_exec_timeout_shorter_than_collective_timeout_warns():
    warnings = check_comm_env("hccl", 60, {"HCCL_EXEC_TIMEOUT": "1800"})
    assert len(warnings) == 1 and "HCCL_EXEC_TIMEOUT=1800s is shorter than --distributed-timeout-minutes=60" in warnings[0]


def test_nccl_knobs_checked_only_for_nccl():
    with pytest.raises(LaunchError, match="TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"):
        check_comm_env("nccl", 10, {"TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "0"})
    assert check_comm_env("gloo", 10, {"TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "0"}) == []
    assert "watchdog monitor" in check_comm_env("nccl", 10, {"TORCH_NCCL_ENABLE_MONITORING": "0"})[0]


# ---- the CPU mode itself

@pytest.fixture
def cpu_mode():
    was_installed = cuda_on_cpu.is_installed()
    cuda_on_cpu.install()
    yield
    if not was_installed:
        cuda_on_cpu.uninstall()


def test_cuda_device_arguments_land_on_cpu(cpu_mode):
    for dev in ("cuda", "cuda:0", torch.device("cuda"), torch.cuda.current_device()):
        assert torch.zeros(2, device=dev).device.type == "cpu"
    t = torch.ones(3)
    assert t.cuda() is t and t.to("cuda").device.type == "cpu" and t.to(torch.float64).dtype == torch.float64


def test_cuda_type_names_for_cpu_tensors(cpu_mode):
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type("torch.cuda.HalfTensor").dtype == torch.float16


def test_cuda_rng_is_the_cpu_generator(cpu_mode):
    torch.cuda.manual_seed(123)
    a = torch.rand(4)
    state = torch.cuda.get_rng_state()
    b = torch.rand(4)
    torch.cuda.set_rng_state(state)
    torch.testing.assert_close(torch.rand(4), b)
    torch.manual_seed(123)
    torch.testing.assert_close(torch.rand(4), a)
    assert torch.cuda.default_generators[0] is torch.default_generator


def test_streams_events_and_sync_are_host_objects(cpu_mode):
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = torch.ones(2) * 2
    torch.cuda.current_stream().wait_stream(stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda.synchronize()
    end.record()
    assert end.query() and start.elapsed_time(end) >= 0.0 and x.sum().item() == 4.0


def test_backward_sees_the_redirection(cpu_mode):
    class AllocatesOnCuda(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2 + torch.zeros_like(grad, device=torch.cuda.current_device())

    x = torch.ones(3, requires_grad=True)
    AllocatesOnCuda.apply(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
    y = torch.ones(2, requires_grad=True)
    torch.autograd.backward([AllocatesOnCuda.apply(y).sum()], grad_tensors=[torch.tensor(3.0)])
    torch.testing.assert_close(y.grad, torch.full((2,), 6.0))


def test_uninstall_restores_torch_cuda():
    if cuda_on_cpu.is_installed():
        pytest.skip("CPU mode installed by an earlier test in this process")
    original = torch.cuda.current_device
    cuda_on_cpu.install()
    assert torch.cuda.current_device is not original
    cuda_on_cpu.uninstall()
    assert torch.cuda.current_device is original


def test_cpu_accelerator_device_queries(fresh_selection):
    acc = select_accelerator("cpu")
    acc.synchronize()
    acc.reset_peak_memory_stats()
    assert acc.max_memory_allocated() == 0 and acc.device_count() == 1 and acc.device(3).type == "cpu"


def test_auto_attention_kernel_fits_the_dtype(monkeypatch):
    from mm.accelerator import attention_kernels as ak

    monkeypatch.setattr(ak, "available_kernels", lambda: ["cudnn", "flash", "math"])
    assert ak.get_kernel("auto", torch.bfloat16).name == "cudnn"
    assert ak.get_kernel("auto", torch.float32).name == "math"
    with pytest.raises(ValueError, match="--attention-kernel 'fast'; valid: auto, math, flash, cudnn"):
        ak.get_kernel("fast")


def _collective_error_worker(rank: int, world: int):
    from datetime import timedelta

    import torch.distributed as dist

    from mm.accelerator import CollectiveError, naming_collective_failures

    group = dist.new_group([0, 1], timeout=timedelta(seconds=90), group_desc="MM_TEST_GROUP")

    def all_reduce_in(group):  # a communication library's failure, raised where ``group`` is a local
        raise RuntimeError("[gloo/transport/tcp/pair.cc:538] Read error [127.0.0.1]:4242: Connection reset by peer")

    with pytest.raises(ValueError, match="not a communication failure"):  # anything else passes unchanged
        with naming_collective_failures("phase one"):
            raise ValueError("not a communication failure")
    with pytest.raises(RuntimeError, match="DataLoader timed out") as other:  # a timeout where no group is at work
        with naming_collective_failures("phase one"):
            raise RuntimeError("DataLoader timed out after 5 seconds")
    assert not isinstance(other.value, CollectiveError)
    with pytest.raises(CollectiveError) as info:
        with naming_collective_failures("phase two"):
            all_reduce_in(group)
    assert isinstance(info.value.__cause__, RuntimeError)
    return str(info.value)


def test_a_communication_failure_names_the_rank_phase_group_and_peers():
    from tests.dist_helper import run_distributed

    for rank, message in enumerate(run_distributed(2, _collective_error_worker)):
        assert message.startswith(
            f"rank {rank}: a collective operation failed during phase two, in process group MM_TEST_GROUP (global "
            f"ranks [0, 1]), waiting on rank {1 - rank}, timeout 0:01:30: RuntimeError: "
            "[gloo/transport/tcp/pair.cc:538] Read error [127.0.0.1]:4242: Connection reset by peer. "
            "A peer rank died"), message


@pytest.fixture
def stand_in_flash3(tmp_path, monkeypatch):
    """A flash_attn_interface that imports as a file, over a flash_attn_3 package without its compiled
    extension (a broken build); ``make(with_extension)`` installs it on sys.path for this test."""
    import sys

    from mm.accelerator import attention_kernels

    def make(with_extension: bool):
        root = tmp_path / ("ok" if with_extension else "broken")
        (root / "flash_attn_3").mkdir(parents=True)
        (root / "flash_attn_3" / "__init__.py").write_text("")
        if with_extension:
            (root / "flash_attn_3" / "_C.py").write_text("")
        (root / "flash_attn_interface.py").write_text("def _flash_attn_forward(*args, **kwargs):\n"
                                                      "    import flash_attn_3._C\n")
        for name in ("flash_attn_interface", "flash_attn_3", "flash_attn_3._C"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.syspath_prepend(str(root))
        monkeypatch.setattr(attention_kernels, "_flash3", [])
        monkeypatch.setattr(attention_kernels, "_KERNELS_FOR", {})

    yield make
    for name in ("flash_attn_interface", "flash_attn_3", "flash_attn_3._C"):
        sys.modules.pop(name, None)
    attention_kernels._flash3.clear()
    attention_kernels._KERNELS_FOR.clear()


def test_a_broken_flash3_install_is_never_picked(stand_in_flash3):
    """flash_attn_interface imports but its compiled extension does not load: auto falls back to cudnn
    and says why once; --attention-kernel flash3 is refused before start, with the reason."""
    from mm.accelerator.attention_kernels import flash3_fallback_note, flash3_problem, kernels_for
    from mm.arguments import ConfigError, config_from_args, parse_flags

    stand_in_flash3(with_extension=False)
    problem = flash3_problem()
    assert problem.startswith("its compiled extension does not load (ModuleNotFoundError: No module named "
                              "'flash_attn_3._C'"), problem
    assert kernels_for("cuda") == ["cudnn", "flash", "math"]
    assert flash3_fallback_note() == (f"--attention-kernel auto: flash-attention 3 is installed but cannot run here "
                                      f"({problem}); using cudnn")
    model = Path(__file__).resolve().parents[2] / "examples" / "wan2.1" / "1.3b" / "t2v" / "inference_t2v_model.json"
    with pytest.raises(ConfigError) as error:
        config_from_args(parse_flags(["--mm-model", str(model), "--attention-kernel", "flash3"]), 1,
                         mode="inference", accelerator="cuda")
    assert f"--attention-kernel flash3 is not available on 'cuda' ({problem}); valid: auto, cudnn, flash, math" in \
        error.value.problems
    config = config_from_args(parse_flags(["--mm-model", str(model)]), 1, mode="inference", accelerator="cuda")
    assert config.notes == [flash3_fallback_note()]


def test_a_loadable_flash3_still_needs_a_hopper_gpu(stand_in_flash3):
    from mm.accelerator.attention_kernels import flash3_problem, kernels_for

    stand_in_flash3(with_extension=True)
    problem = flash3_problem()
    if not torch.cuda.is_available():
        assert problem == "no CUDA GPU is visible" and "flash3" not in kernels_for("cuda")
    elif torch.cuda.get_device_capability()[0] != 9:
        assert problem.startswith("it runs on Hopper GPUs (sm_90)")
    else:
        assert problem is None and kernels_for("cuda")[0] == "flash3"


def test_a_named_math_kernel_is_the_one_that_runs(monkeypatch):
    """--attention-kernel math without CP calls aten's math SDPA itself (output and gradients as SDPA's)."""
    from mm.accelerator.attention_kernels import MathAttention
    from mm.parallel import attention

    calls = []
    monkeypatch.setattr(attention, "get_attention_options", lambda: {"kernel": "math", "algo": None, "overlap": False})
    monkeypatch.setattr(MathAttention, "attention", staticmethod(
        lambda q, k, v, scale, original=MathAttention.attention: calls.append(scale) or original(q, k, v, scale)))
    torch.manual_seed(0)
    q, k, v = (torch.randn(7, 2, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = attention.CoreAttention()(q, k, v)
    out.square().sum().backward()
    assert calls == [pytest.approx(8 ** -0.5)]
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)))
    ref = ref.permute(2, 0, 1, 3).reshape(7, 2, -1)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad)

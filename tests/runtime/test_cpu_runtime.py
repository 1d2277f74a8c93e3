"""The CPU runtime redirects CUDA placement to the CPU and changes nothing else."""

from __future__ import annotations

import pytest
import torch

from ling_pretrain.runtime import cpu

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU runtime is for machines without CUDA"
)


@pytest.fixture(autouse=True, scope="module")
def installed():
    cpu.install()
    cpu.install()  # idempotent
    assert cpu.is_installed()


def test_factories_and_moves_land_on_cpu():
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2, device=torch.device("cuda", 0)).device.type == "cpu"
    t = torch.arange(4)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu"
    assert t.to(device="cuda:0", dtype=torch.float32).dtype == torch.float32
    assert torch.empty(2, pin_memory=True).is_pinned() is False


def test_values_are_unchanged():
    torch.manual_seed(0)
    a = torch.randn(5, 7)
    b = torch.randn(7, 3)
    expected = a @ b
    assert torch.equal(a.cuda() @ b.to("cuda"), expected)


def test_type_names_follow_megatrons_checks():
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64


def test_cuda_rng_is_the_cpu_generator():
    torch.manual_seed(123)
    state = torch.cuda.get_rng_state()
    assert torch.equal(state, torch.get_rng_state())
    first = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)
    torch.cuda.manual_seed(7)
    x = torch.rand(2)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(2), x)


def test_streams_and_events_are_inert():
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = torch.ones(2) * 2
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    end.record()
    torch.cuda.current_stream().wait_stream(s)
    assert end.query() and start.elapsed_time(end) >= 0.0
    assert torch.equal(y, torch.tensor([2.0, 2.0]))
    torch.cuda.synchronize()


def test_backward_runs_with_the_redirect_active():
    class NeedsDevice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            # megatron's backward functions allocate on "the current CUDA device".
            return grad * torch.full_like(grad, 2.0, device=torch.cuda.current_device())

    x = torch.ones(3, requires_grad=True)
    NeedsDevice.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))
    x.grad = None
    torch.autograd.backward([NeedsDevice.apply(x).sum()])
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_split_sizes_become_lists():
    assert cpu._as_split_list(torch.tensor([1, 2])) == [1, 2]
    np = pytest.importorskip("numpy")
    assert cpu._as_split_list(np.array([3, 4])) == [3, 4]
    assert cpu._as_split_list(None) is None

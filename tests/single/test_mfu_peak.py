"""The MFU denominator: a GPU's spec peak looked up by name (fp32 runs as TF32, half the bf16 peak),
a timed matmul with a warning for unknown GPUs, a fixed nominal peak on CPUs."""

import pytest
import torch

from moonlight.train import metrics


@pytest.mark.parametrize(
    "name,bf16_tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA GB200", 2500.0),
    ],
)
def test_spec_peak_by_device_name(monkeypatch, name, bf16_tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(metrics, "measure_peak_flops", lambda device: pytest.fail("timed on a known GPU"))
    cuda = torch.device("cuda", 0)
    assert metrics.peak_flops(cuda, torch.bfloat16) == pytest.approx(bf16_tflops * 1e12)
    assert metrics.peak_flops(cuda, torch.float32) == pytest.approx(bf16_tflops * 1e12 / 2)


def test_unknown_gpu_is_timed_with_a_warning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    monkeypatch.setattr(metrics, "measure_peak_flops", lambda device: 123.0)
    with pytest.warns(UserWarning, match="Some Future GPU"):
        assert metrics.peak_flops(torch.device("cuda", 0), torch.bfloat16) == 123.0


def test_cpu_uses_the_fixed_nominal_peak(monkeypatch):
    """A CPU's MFU is comparable between runs: never a matmul timed at each start (it varied 5x)."""
    monkeypatch.setattr(metrics, "measure_peak_flops", lambda device: pytest.fail("timed on a CPU"))
    assert metrics.peak_flops(torch.device("cpu"), torch.float32) == metrics.CPU_NOMINAL_PEAK_FLOPS == 100e9

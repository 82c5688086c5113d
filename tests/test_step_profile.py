"""tracking/step_profile: the device's busy share of a profiled step counts overlapping streams once and only
within the host's span; without GPU events there is none."""
from __future__ import annotations

from types import SimpleNamespace

from torch.autograd import DeviceType

from pipeline.tracking.step_profile import StepProfile


def event(device: DeviceType, start: float, end: float) -> SimpleNamespace:
    return SimpleNamespace(device_type=device, time_range=SimpleNamespace(start=start, end=end))


def test_device_busy_is_the_union_of_device_intervals_within_the_host_span():
    profile = StepProfile(first=0)
    host = [event(DeviceType.CPU, 100, 150), event(DeviceType.CPU, 120, 300)]  # the span: 100 .. 300
    kernels = [event(DeviceType.CUDA, 90, 110),  # begun before the span: 10 counted
               event(DeviceType.CUDA, 150, 200), event(DeviceType.CUDA, 180, 220),  # overlapping streams: 70
               event(DeviceType.CUDA, 250, 260), event(DeviceType.CUDA, 252, 255),  # one inside another: 10
               event(DeviceType.CUDA, 290, 400)]  # runs past the span: 10
    profile.events = host + kernels
    assert profile.device_busy() == (10 + 70 + 10 + 10) / 200
    profile.events = host
    assert profile.device_busy() is None
    assert StepProfile(first=0).device_busy() is None  # nothing profiled

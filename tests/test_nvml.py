"""The NVML adapter against a fake pynvml: no driver, no device, N devices, errors mid-query."""

from __future__ import annotations

import pytest
from fakes import GIB, FakeDevice, fake_pynvml

from yolo_batch.core.nvml import CudaDevice, NvmlUnavailable, bare_uuid, read_gpus


def test_reads_memory_and_processes_of_each_chosen_gpu():
    nvml = fake_pynvml([
        FakeDevice(used=10 * GIB, processes=[(111, 6 * GIB), (222, 3 * GIB)]),
        FakeDevice(name="NVIDIA A100", total=40 * GIB, used=2 * GIB),
    ])
    gpus = read_gpus([0, 1], nvml=nvml, cuda=[CudaDevice(0, "GPU-fake-0"), CudaDevice(1, "GPU-fake-1")])
    assert [g.name for g in gpus] == ["NVIDIA H100 80GB HBM3", "NVIDIA A100"]
    assert [g.matched_by for g in gpus] == ["uuid", "uuid"] and gpus[0].driver == "550.54.15"
    assert gpus[0].free_bytes == 70 * GIB and gpus[1].free_bytes == 38 * GIB
    assert gpus[0].uuid == "GPU-fake-0"
    assert gpus[0].others_bytes(pid=111) == 3 * GIB
    assert gpus[0].own_bytes(pid=111) == 6 * GIB
    assert nvml.calls[-1] == "nvmlShutdown"


def test_only_the_chosen_gpu_is_read():
    nvml = fake_pynvml([FakeDevice(), FakeDevice(used=50 * GIB)])
    (gpu,) = read_gpus([1], nvml=nvml)
    assert gpu.index == 1 and gpu.used_bytes == 50 * GIB


def test_hidden_per_process_memory_is_none_not_a_crash():
    nvml = fake_pynvml([FakeDevice(processes=[(5, None)])])
    (gpu,) = read_gpus([0], nvml=nvml)
    assert gpu.processes[0].used_bytes is None
    assert gpu.others_bytes(pid=1) == 0


@pytest.mark.parametrize(
    ("nvml", "message"),
    [
        (fake_pynvml([], init_error=True), "NVML could not start (Driver Not Loaded)"),
        (fake_pynvml([]), "GPU 0 not found: NVML sees 0 device(s)"),
        (fake_pynvml([FakeDevice()], count_error=True), "NVML query failed: Unknown Error"),
        (fake_pynvml([FakeDevice(fail_on="nvmlDeviceGetMemoryInfo")]), "NVML query failed: nvmlDeviceGetMemoryInfo"),
    ],
)
def test_failures_become_one_line_reasons(nvml, message):
    with pytest.raises(NvmlUnavailable) as info:
        read_gpus([0], nvml=nvml)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_unsupported_process_query_keeps_the_totals():
    nvml = fake_pynvml([FakeDevice(fail_on="nvmlDeviceGetComputeRunningProcesses")])
    (gpu,) = read_gpus([0], nvml=nvml)
    assert gpu.processes == () and gpu.total_bytes == 80 * GIB


def test_missing_bindings_are_reported(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(NvmlUnavailable, match="nvidia-ml-py"):
        read_gpus([0])


def test_cuda_visible_devices_maps_to_physical_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    nvml = fake_pynvml([FakeDevice(), FakeDevice(), FakeDevice(used=7 * GIB), FakeDevice()])
    (gpu,) = read_gpus([0], nvml=nvml)
    assert gpu.index == 0 and gpu.used_bytes == 7 * GIB


A100, H100 = "NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3"


def mixed() -> list[FakeDevice]:
    """NVML (PCI bus order): an A100 first, an H100 second; CUDA (fastest first) numbers the H100 0."""
    return [FakeDevice(name=A100, total=40 * GIB, used=5 * GIB), FakeDevice(name=H100, total=80 * GIB, used=9 * GIB)]


def mig_gpu() -> FakeDevice:
    """An A100 split into two 20 GiB MIG instances; process 77 runs in instance 1 (GPU instance id 2)."""
    return FakeDevice(name=A100, total=40 * GIB, used=12 * GIB, mig=[
        FakeDevice(name=f"{A100} MIG 3g.20gb", total=20 * GIB, used=1 * GIB, instance_id=1, processes=[(55, GIB)]),
        FakeDevice(name=f"{A100} MIG 3g.20gb", total=20 * GIB, used=11 * GIB, instance_id=2,
                   processes=[(77, 10 * GIB)]),
    ])


@pytest.mark.parametrize(
    ("devices", "env", "cuda", "uuid", "total", "matched_by"),
    [
        # CUDA_VISIBLE_DEVICES with indices: CUDA's 0 is NVML's 2
        ([FakeDevice(), FakeDevice(), FakeDevice(), FakeDevice()], {"CUDA_VISIBLE_DEVICES": "2,3"}, None,
         "GPU-fake-2", 80, "CUDA_VISIBLE_DEVICES index"),
        # ... with GPU UUIDs, in an order of the user's choosing, and as a unique prefix (CUDA accepts both)
        ([FakeDevice(), FakeDevice(), FakeDevice(), FakeDevice()], {"CUDA_VISIBLE_DEVICES": "GPU-fake-3,GPU-fake-1"},
         None, "GPU-fake-3", 80, "CUDA_VISIBLE_DEVICES UUID"),
        ([FakeDevice(uuid="GPU-5f2a0c11-aaaa"), FakeDevice(uuid="GPU-9b7e0d22-bbbb")],
         {"CUDA_VISIBLE_DEVICES": "GPU-9b7e"}, None, "GPU-9b7e0d22-bbbb", 80, "CUDA_VISIBLE_DEVICES UUID"),
        # ... with a MIG UUID: the instance's own 20 GiB, not the GPU's 40
        ([mig_gpu()], {"CUDA_VISIBLE_DEVICES": "MIG-fake-0-1"}, None, "MIG-fake-0-1", 20, "CUDA_VISIBLE_DEVICES UUID"),
        # CUDA's UUIDs decide whatever the environment says: fastest first ...
        (mixed(), {}, [CudaDevice(0, "fake-1")], "GPU-fake-1", 80, "uuid"),
        # ... PCI bus order requested: NVML's order is CUDA's
        (mixed(), {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, None, "GPU-fake-0", 40, "index"),
        # ... a container whose NVML sees only its own two GPUs while CUDA_VISIBLE_DEVICES holds host indices
        ([FakeDevice(uuid="GPU-host-5"), FakeDevice(uuid="GPU-host-7")], {"CUDA_VISIBLE_DEVICES": "5,7"},
         [CudaDevice(0, "GPU-host-7")], "GPU-host-7", 80, "uuid"),
        # ... a MIG instance as CUDA reports it (bare hex, no prefix)
        ([mig_gpu()], {}, [CudaDevice(0, "FAKE-0-1")], "MIG-fake-0-1", 20, "uuid"),
    ],
)
def test_the_cuda_device_is_found_among_nvmls(devices, env, cuda, uuid, total, matched_by):
    (gpu,) = read_gpus([0], nvml=fake_pynvml(devices), cuda=cuda or (), environ=env)
    assert (gpu.uuid, gpu.total_bytes, gpu.matched_by) == (uuid, total * GIB, matched_by)


@pytest.mark.parametrize(
    ("devices", "env", "cuda", "message"),
    [
        (mixed(), {}, None, "CUDA orders GPUs fastest first and NVML by PCI bus"),
        (mixed(), {"CUDA_VISIBLE_DEVICES": "1"}, None, "CUDA orders GPUs fastest first"),
        ([FakeDevice(uuid="GPU-host-5"), FakeDevice(uuid="GPU-host-7")], {"CUDA_VISIBLE_DEVICES": "5,7"}, None,
         "names GPU 5 but NVML sees 2 device(s) (a container"),
        ([mig_gpu()], {}, None, "GPU 0 is split into MIG instances"),
        ([mig_gpu()], {"CUDA_VISIBLE_DEVICES": "0"}, None, "GPU 0 is split into MIG instances"),
        ([FakeDevice()], {}, [CudaDevice(0, "GPU-elsewhere")], "CUDA device 0 (UUID GPU-elsewhere) is not among"),
        ([FakeDevice(), FakeDevice()], {"CUDA_VISIBLE_DEVICES": "GPU-fake"}, None, "is ambiguous"),
        ([FakeDevice()], {"CUDA_VISIBLE_DEVICES": "GPU-fake-0"}, None, None),  # control: this one is fine
    ],
)
def test_a_gpu_that_cannot_be_identified_is_a_reason_not_a_guess(devices, env, cuda, message):
    if message is None:
        assert read_gpus([0], nvml=fake_pynvml(devices), cuda=cuda or (), environ=env)[0].uuid == "GPU-fake-0"
        return
    with pytest.raises(NvmlUnavailable) as info:
        read_gpus([0], nvml=fake_pynvml(devices), cuda=cuda or (), environ=env)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_mig_instance_reports_its_own_memory_and_processes():
    (gpu,) = read_gpus([0], nvml=fake_pynvml([mig_gpu()]), cuda=[CudaDevice(0, "MIG-fake-0-1")], environ={})
    assert gpu.mig and gpu.total_bytes == 20 * GIB and gpu.used_bytes == 11 * GIB
    assert [p.pid for p in gpu.processes] == [77]  # the other instance's process is not ours to count
    assert gpu.others_bytes(pid=1) == 10 * GIB


def test_uuids_compare_without_their_prefix():
    assert bare_uuid("GPU-AbC-1") == bare_uuid("abc-1") == bare_uuid("MIG-abc-1") == "abc-1"


def test_real_nvml_on_this_machine_never_crashes():
    try:
        gpus = read_gpus([0])
    except NvmlUnavailable as exc:
        assert str(exc)  # a GPU-less machine gets a reason
    else:
        assert gpus[0].total_bytes > 0

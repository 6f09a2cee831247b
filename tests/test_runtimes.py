"""The runtime choice with plain values, the host facts adapter, the export cache, and the no-install guard."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from yolo_batch.errors import InputError
from yolo_batch.inference.runtimes.cache import ENTRY, ExportCache, entry_name, export_key
from yolo_batch.inference.runtimes.choice import HostFacts, choose_runtime
from yolo_batch.inference.runtimes.host import cpu_flags

ALL = {"torch": "2.9", "openvino": "2026.4", "onnxruntime": "1.32", "onnx": "1.23", "onnxslim": "0.1",
       "tensorrt": "10.13"}
TORCH_ONLY = {"torch": "2.9"}
CPU_BF16 = HostFacts(device_type="cpu", installed=ALL, cpu_bf16=True)
CPU_PLAIN = HostFacts(device_type="cpu", installed=ALL)
CPU_BARE = HostFacts(device_type="cpu", installed=TORCH_ONLY, cpu_bf16=True)
ARM = HostFacts(device_type="cpu", machine="aarch64", installed=ALL, cpu_bf16=True)
GPU = HostFacts(device_type="cuda", installed=ALL, gpu_name="NVIDIA H100", gpu_nvidia=True, gpu_bf16=True,
                onnxruntime_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
GPU_NO_TRT = HostFacts(device_type="cuda", installed={k: v for k, v in ALL.items() if k != "tensorrt"},
                       gpu_name="NVIDIA T4", gpu_nvidia=True)

CHOICES = [
    # facts, backend, precision, chosen backend, chosen precision, words in the reason
    (CPU_BF16, "auto", "auto", "openvino", "bf16", ["auto: openvino", "bf16"]),
    (CPU_PLAIN, "auto", "auto", "openvino", "fp32", ["precision auto: fp32"]),
    (CPU_BARE, "auto", "auto", "torch", "bf16", ["not openvino: openvino is not installed", "yolo-batch[openvino]"]),
    (ARM, "auto", "auto", "torch", "bf16", ["auto: torch"]),
    (CPU_BF16, "torch", "auto", "torch", "bf16", ["as requested"]),
    (CPU_PLAIN, "torch", "auto", "torch", "fp32", ["fp32"]),
    (CPU_BF16, "onnxruntime", "auto", "onnxruntime", "fp32", ["does not run bf16"]),
    (CPU_BF16, "openvino", "fp32", "openvino", "fp32", ["as requested"]),
    (CPU_BF16, "auto", "fp32", "openvino", "fp32", []),
    (GPU, "auto", "auto", "tensorrt", "fp16", ["auto: tensorrt", "fp16 on a GPU"]),
    (GPU_NO_TRT, "auto", "auto", "torch", "fp16", ["not tensorrt: tensorrt is not installed"]),
    (GPU, "auto", "bf16", "torch", "bf16", ["not tensorrt: TensorRT engines are built fp32 or fp16"]),
    (GPU, "onnxruntime", "fp16", "onnxruntime", "fp16", []),
    (GPU, "torch", "auto", "torch", "fp16", []),
]


@pytest.mark.parametrize(("facts", "backend", "precision", "chosen", "final", "words"), CHOICES)
def test_choice(facts, backend, precision, chosen, final, words):
    choice = choose_runtime(backend, precision, facts)
    assert (choice.backend, choice.precision) == (chosen, final)
    assert (choice.requested_backend, choice.requested_precision) == (backend, precision)
    for word in words:
        assert word in choice.reason, choice.reason
    assert choice.version == facts.installed[chosen]


REFUSED = [
    # facts, backend, precision, words in the one-line message
    (CPU_BF16, "tensorrt", "auto", "--backend tensorrt: tensorrt needs an NVIDIA GPU"),
    (CPU_BARE, "openvino", "auto", "pip install 'yolo-batch[openvino]'"),
    (CPU_BARE, "onnxruntime", "fp32", "pip install 'yolo-batch[onnx]'"),
    (CPU_PLAIN, "torch", "bf16", "--precision bf16 with torch: bf16 needs a CPU with AVX512-BF16 or AMX"),
    (CPU_PLAIN, "auto", "bf16", "bf16 needs a CPU with AVX512-BF16 or AMX"),
    (CPU_BF16, "torch", "fp16", "--precision fp16 with torch"),
    (CPU_BF16, "openvino", "fp16", "fp16 on a CPU needs AVX512-FP16"),
    (CPU_BF16, "onnxruntime", "bf16", "onnxruntime runs fp32 on a CPU"),
    (GPU, "openvino", "auto", "openvino runs on the CPU here"),
    (GPU_NO_TRT, "onnxruntime", "auto", "onnxruntime has no CUDA provider"),
    (CPU_BF16, "cuda", "auto", "unknown backend 'cuda'"),
    (CPU_BF16, "torch", "int8", "unknown precision 'int8'"),
]


@pytest.mark.parametrize(("facts", "backend", "precision", "message"), REFUSED)
def test_explicit_requests_that_cannot_run_here_are_one_line(facts, backend, precision, message):
    with pytest.raises(InputError) as info:
        choose_runtime(backend, precision, facts)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cpu_flags_from_a_cpuinfo_file(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert {"avx512_bf16", "avx512f"} <= cpu_flags(cpuinfo)
    assert cpu_flags(tmp_path / "missing") is None


def test_host_facts_of_this_machine():
    import torch

    from yolo_batch.inference.runtimes.host import host_facts

    facts = host_facts(torch.device("cpu"))
    assert facts.device_type == "cpu" and facts.installed["torch"]
    flags = cpu_flags()
    if flags is not None:
        assert facts.cpu_bf16 == bool(flags & {"avx512_bf16", "amx_bf16"})


# --- the export cache ----------------------------------------------------------------------------------------------


def key(**changes):
    base = {"weights_sha256": "a" * 64, "imgsz": 64, "precision": "fp32", "batch": "dynamic", "runtime": "openvino",
            "runtime_version": "2026.4", "device": "cpu", "ultralytics": "8.4.190"}
    return export_key(**{**base, **changes})


def test_every_part_of_the_key_names_another_entry():
    names = {entry_name(key())}
    for change in ({"weights_sha256": "b" * 64}, {"imgsz": 96}, {"precision": "fp16"}, {"batch": "1-16"},
                   {"runtime": "onnxruntime"}, {"runtime_version": "2026.5"}, {"device": "NVIDIA T4 sm75"},
                   {"ultralytics": "8.4.191"}):
        names.add(entry_name(key(**change)))
    assert len(names) == 9
    assert entry_name(key()).startswith("openvino-fp32-64-")


def fake_build(calls: list[Path], delay: threading.Event | None = None):
    def build(folder: Path) -> tuple[Path, dict]:
        calls.append(folder)
        if delay is not None:
            delay.wait(10)
        (folder / "model.xml").write_text("ir")
        return folder / "model.xml", {"names": {"0": "a"}, "stride": 32, "end2end": False}

    return build


def test_a_second_lookup_finds_the_entry_without_building(tmp_path):
    cache, calls = ExportCache(tmp_path), []
    first = cache.get_or_build(key(), fake_build(calls))
    second = cache.get_or_build(key(), fake_build(calls))
    assert len(calls) == 1 and not first.hit and second.hit
    assert second.artefact == first.artefact and second.artefact.read_text() == "ir"
    assert second.meta["stride"] == 32 and second.meta["key"] == key()
    rebuilt = cache.get_or_build(key(), fake_build(calls), rebuild=True)
    assert len(calls) == 2 and not rebuilt.hit and rebuilt.artefact.exists()
    assert [p.name for p in tmp_path.iterdir()] == [entry_name(key())]  # no temporary folders left


def test_a_failed_build_leaves_nothing(tmp_path):
    def broken(folder: Path):
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("export died")

    with pytest.raises(RuntimeError):
        ExportCache(tmp_path).get_or_build(key(), broken)
    assert list(tmp_path.iterdir()) == []
    assert ExportCache(tmp_path).lookup(key()) is None


def test_an_entry_without_its_record_is_not_used(tmp_path):
    folder = tmp_path / entry_name(key())
    folder.mkdir()
    (folder / "model.xml").write_text("partial")
    assert ExportCache(tmp_path).lookup(key()) is None
    (folder / ENTRY).write_text("{not json")
    assert ExportCache(tmp_path).lookup(key()) is None


def test_two_exports_of_one_key_at_once_leave_one_whole_entry(tmp_path):
    release, calls, results = threading.Event(), [], []
    cache = ExportCache(tmp_path)

    def export() -> None:
        results.append(cache.get_or_build(key(), fake_build(calls, release)))

    threads = [threading.Thread(target=export) for _ in range(2)]
    for thread in threads:
        thread.start()
    while len(calls) < 2:  # both are inside their build, each in its own temporary folder
        threading.Event().wait(0.01)
    release.set()
    for thread in threads:
        thread.join(30)
    assert len(calls) == 2 and calls[0] != calls[1]
    assert len({r.artefact for r in results}) == 1 and results[0].artefact.read_text() == "ir"
    assert [p.name for p in tmp_path.iterdir()] == [entry_name(key())]


# --- Ultralytics never installs anything ----------------------------------------------------------------------------


def test_requirement_checks_never_install(monkeypatch):
    import subprocess

    from yolo_batch.ultralytics_adapter import MissingRequirement, no_installs, offline

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to run {args[:1]}")

    monkeypatch.setattr(subprocess, "check_output", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)
    with offline():
        from ultralytics.engine import exporter
        from ultralytics.utils import checks

        original = checks.check_requirements
    with no_installs("onnx"):
        assert exporter.check_requirements is not original and checks.check_requirements is not original
        assert checks.check_requirements("numpy") is True  # installed: passes
        with pytest.raises(MissingRequirement) as info:
            exporter.check_requirements(["numpy", "surely-not-installed-pkg>=1.0"])
        with pytest.raises(MissingRequirement):
            checks.check_tensorrt()
    assert "surely-not-installed-pkg>=1.0" in str(info.value) and "yolo-batch[onnx]" in str(info.value)
    assert exporter.check_requirements is original and checks.check_requirements is original


IR = """<?xml version="1.0"?>
<net name="tiny" version="11"><layers>
<layer id="0" name="x" type="Parameter" version="opset1"><data shape="1,3,8,8" element_type="f32"/></layer>
<layer id="1" name="__module.model.0.conv/aten::_convolution/Convolution" type="Convolution" version="opset1"/>
<layer id="2" name="__module.model.23.cv3.2.1.1.act/aten::silu_/Swish_50" type="Swish" version="opset4"/>
<layer id="3" name="__module.model.23.cv2.0.0.conv/aten::_convolution/Convolution" type="Convolution"
  version="opset1"><data strides="1, 1"/><rt_info><attribute name="fused_names" version="0" value="a"/></rt_info>
</layer>
<layer id="4" name="__module.model.23.dfl/aten::softmax/Softmax" type="SoftMax" version="opset8"/>
<layer id="5" name="__module.model.23.dfl.conv/aten::_convolution/Convolution" type="Convolution" version="opset1"/>
<layer id="6" name="__module.model.23.cv3.0.0.0.conv/aten::_convolution/GroupConvolution" type="GroupConvolution"
  version="opset1"/>
<layer id="7" name="__module.model.23/aten::cat/Concat" type="Concat" version="opset1"/>
<layer id="8" name="out" type="Result" version="opset1"/>
</layers><edges>
<edge from-layer="0" from-port="0" to-layer="1" to-port="0"/>
<edge from-layer="1" from-port="1" to-layer="2" to-port="0"/>
<edge from-layer="2" from-port="1" to-layer="3" to-port="0"/>
<edge from-layer="2" from-port="1" to-layer="6" to-port="0"/>
<edge from-layer="3" from-port="1" to-layer="4" to-port="0"/>
<edge from-layer="4" from-port="1" to-layer="5" to-port="0"/>
<edge from-layer="5" from-port="1" to-layer="7" to-port="0"/>
<edge from-layer="6" from-port="1" to-layer="7" to-port="1"/>
<edge from-layer="7" from-port="2" to-layer="8" to-port="0"/>
</edges></net>"""


def precise_layers(xml: bytes) -> list[str]:
    """The ids of the layers marked ``precise``, once per mark."""
    import xml.etree.ElementTree as ET

    return sorted(layer.get("id", "") for layer in ET.fromstring(xml).iter("layer")
                  for attribute in layer.iter("attribute") if attribute.get("name") == "precise")


def test_openvino_marks_the_class_branch_the_dfl_and_what_follows_them():
    from yolo_batch.inference.runtimes.openvino_head import mark_head_precise

    marked = mark_head_precise(IR.encode())
    assert marked.layer == 23 and "class branch and DFL" in marked.reason
    # not the body's convolution, nor the body's activation the frontend named after the head's last SiLU, nor
    # the box branch's convolution (it stays at bf16: it moves no score)
    assert precise_layers(marked.xml) == ["4", "5", "6", "7"]
    assert precise_layers(mark_head_precise(marked.xml).xml) == ["4", "5", "6", "7"]  # marking twice adds nothing


def test_a_head_without_those_branches_is_marked_whole():
    from yolo_batch.inference.runtimes.openvino_head import mark_head_precise

    other = IR.replace("model.23.cv3.0", "model.23.cv9.0").replace("model.23.dfl", "model.23.box")
    marked = mark_head_precise(other.encode())
    assert "the whole head" in marked.reason and precise_layers(marked.xml) == ["3", "4", "5", "6", "7"]


def test_an_ir_without_ultralytics_names_runs_unmarked_with_the_reason():
    from yolo_batch.inference.runtimes.openvino_head import mark_head_precise

    foreign = IR.replace("__module.model.", "node.")
    marked = mark_head_precise(foreign.encode())
    assert marked.nodes == 0 and marked.xml == foreign.encode() and "no layer named after" in marked.reason
    no_convolution = IR.replace('type="Convolution"', 'type="Other"').replace('type="GroupConvolution"', 'type="Other"')
    marked = mark_head_precise(no_convolution.encode())
    assert marked.nodes == 0 and "no convolution named after the last layer (model.23)" in marked.reason

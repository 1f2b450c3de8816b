"""Where calibration runs: device names resolve as documented, a bfloat16 teacher plays the game with a float32
student (the GPU set-up, checked here in the CPU's bfloat16), and on CUDA the game matches the CPU's."""

from __future__ import annotations

import pytest
import torch

from calib.config import (
    ActivationQuant,
    CalibConfig,
    GeneratorConfig,
    QuadapterConfig,
    QuantConfig,
    RotationConfig,
    SamSgaConfig,
    TaskConfig,
    WeightQuant,
)
from calib.devices import frozen_on, resolve_device, teacher_dtype
from calib.errors import ConfigError
from calib.methods import CalibrationRequest, calibrate, quantize_student
from tests.models import tiny_teacher

CALIB = CalibConfig(
    method="zsaq", samples=8, seq_len=16, batch_size=4,
    generator=GeneratorConfig(kind="soft-tokens", batch_size=4, min_len=4), sam_sga=SamSgaConfig(rounds=2),
)  # fmt: skip


def test_device_names_resolve_to_what_the_machine_has():
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda" and resolve_device("cuda", local_rank=0).index == 0
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="calib.device: cuda, but torch sees no CUDA GPU"):
            resolve_device("cuda")
    assert teacher_dtype(torch.device("cpu")) == torch.float32
    assert teacher_dtype(torch.device("cuda")) == torch.bfloat16
    teacher = tiny_teacher("bert")
    assert frozen_on(teacher, torch.device("cpu")) is teacher


def test_a_bfloat16_teacher_plays_against_a_float32_student():
    """What runs on a GPU (teacher in bfloat16, student in float32), in the CPU's bfloat16."""
    torch.manual_seed(0)
    teacher = tiny_teacher("llama")
    calibration = calibrate(CalibrationRequest(teacher, None, CALIB, QuantConfig(), TaskConfig(kind="causal-lm"),
                                               show_progress=False))  # fmt: skip
    student = calibration.game.student
    bf16 = teacher.to(torch.bfloat16)
    out = calibration.samples.batches(4)[0].run(bf16)
    assert out.output.dtype == torch.float32  # float32 embeddings in, float32 logits out
    game = calibration.game
    game.teacher = bf16
    for param in game.student_params:  # play() froze them when it ended
        param.requires_grad_(True)
    before = [p.detach().clone() for p in game.student_params]
    losses = torch.stack([game.generator_step()[0], game.student_step()]).tolist()
    assert all(torch.isfinite(torch.tensor(losses))) and next(student.parameters()).dtype == torch.float32
    assert any(not torch.equal(a, p) for a, p in zip(before, game.student_params))


# the rotated decoder's student carries its rotation (a buffer) and online Hadamards (buffers) onto the GPU
ROTATED_SMOOTHED = QuantConfig(
    rotation=RotationConfig(enabled=True), quadapter=QuadapterConfig(enabled=True, init="smoothquant-search")
)


# asymmetric int4: the zero points (a buffer) travel with the step sizes
ASYMMETRIC = QuantConfig(
    weights=WeightQuant(bits=4, granularity="per-group", group_size=32, zero_point=True, init="mse"),
    activations=ActivationQuant(bits=16),
)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none; scripts/gpu_check.py)")
@pytest.mark.parametrize(
    "quant", [QuantConfig(), ROTATED_SMOOTHED, ASYMMETRIC], ids=["W8A8", "W8A8-rotated-smoothed", "W4A16-g32-zp"]
)
def test_on_cuda_calibration_and_learning_run_on_the_gpu_and_track_the_cpu(quant):
    teacher = tiny_teacher("llama")
    request = CalibrationRequest(teacher, None, CALIB, quant, TaskConfig(kind="causal-lm"),
                                 show_progress=False, device="cuda")  # fmt: skip
    calibration = calibrate(request)
    assert calibration.samples.attention_mask.device.type == "cpu"  # artifacts come back on the CPU
    kept = next(teacher.parameters())  # the caller's teacher is untouched: the next stage builds from it
    assert (kept.device.type, kept.dtype) == ("cpu", torch.float32)
    assert next(calibration.game.student.parameters()).device.type == "cuda"
    student, _ = quantize_student(tiny_teacher("llama"), quant, calibration.samples.batches(4),
                                  show_progress=False, device="cuda")  # fmt: skip
    cpu_student, _ = quantize_student(tiny_teacher("llama"), quant, calibration.samples.batches(4),
                                      show_progress=False)  # fmt: skip
    batch = calibration.samples.batches(4)[0]
    on_gpu = batch.to(torch.device("cuda")).run(student).output.cpu()
    torch.testing.assert_close(on_gpu, batch.run(cpu_student).output, rtol=0.05, atol=0.05)

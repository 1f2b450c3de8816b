"""The export contract: every number an exporter needs, exactly as the student computes it (its tensors:
docs/ARCHITECTURE.md). No exporter re-derives a scale."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from calib.config import QuadapterConfig, QuantConfig
from calib.models import TaskModel
from calib.quadapter import FixedMultiplier, fold_quadapters
from calib.quant_attention import KV_ROLES, ROLES
from calib.quant_linear import QuantEmbedding
from calib.student import attention_quantizers, build_student, kv_cache_quantizers, quant_layers

CONTRACT_TENSORS = "contract.safetensors"
CONTRACT_META = "contract.json"


@dataclass(frozen=True)
class LayerSpec:
    """One quantized layer as the exporters see it."""

    name: str
    in_features: int
    out_features: int
    weight_bits: int
    granularity: str
    group_size: int | None
    act_bits: int
    act_block: int | None = None  # 8-bit activations quantized dynamically per block of this many (None: static)
    zero_point: bool = False  # asymmetric weights: ``weight_zero_point`` holds an integer per group

    @property
    def act_granularity(self) -> str:
        """``per-block`` (dynamic) or ``per-tensor`` (static) for 8-bit activations."""
        return "per-tensor" if self.act_block is None else "per-block"


@dataclass
class Contract:
    """Tensors plus layer descriptions."""

    tensors: dict[str, torch.Tensor]
    layers: list[LayerSpec]
    embeddings: list[str] = dataclasses.field(default_factory=list)  # quantized embedding tables' module names
    attention: list[str] = dataclasses.field(default_factory=list)  # attention modules with quantized matmuls
    kv_cache: list[str] = dataclasses.field(default_factory=list)  # attention modules with an int8 cache, in order
    rotation: dict | None = None  # calib.rotation.RotationLayout as JSON: the structure a rotation changed
    smoothing: dict = dataclasses.field(default_factory=dict)  # searched SmoothQuant alpha per group (first layer)


@torch.no_grad()
def build_contract(student: TaskModel) -> Contract:
    """Fold the Quadapters, then read the integers and scales out of the student's quantizers."""
    student = copy.deepcopy(student)
    fold_quadapters(student.backbone, student.quadapter_groups)
    layers = quant_layers(student)
    tensors: dict[str, torch.Tensor] = {}
    specs = []
    for name, layer in layers.items():
        wq = layer.weight_quantizer
        tensors[f"{name}.weight_int"] = wq.to_int(layer.effective_weight()).to(torch.int8)
        scale = wq.scale.detach().float()
        scale = scale.reshape(scale.shape[0], -1)  # [out, groups] (one group per row included)
        tensors[f"{name}.weight_scale"] = (scale if wq.group_size else scale.squeeze(-1)).contiguous()
        if wq.zero_point is not None:
            zero = wq.zero_point.reshape(scale.shape)
            tensors[f"{name}.weight_zero_point"] = (zero if wq.group_size else zero.squeeze(-1)).to(torch.int8)
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().float().clone()
        multiplier = layer.input_multiplier()
        if multiplier is not None:
            tensors[f"{name}.input_multiplier"] = multiplier.detach().float().clone()
        dynamic = layer.dynamic_input_quantizer
        if layer.input_quantizer is not None:
            tensors[f"{name}.input_scale"] = layer.input_quantizer.scale.detach().float().reshape(()).clone()
        specs.append(
            LayerSpec(
                name=name,
                in_features=layer.in_features,
                out_features=layer.out_features,
                weight_bits=wq.bits,
                granularity=wq.granularity,
                group_size=wq.group_size,
                act_bits=8 if layer.input_quantizer is not None or dynamic is not None else 16,
                act_block=None if dynamic is None else dynamic.block_size,
                zero_point=wq.zero_point is not None,
            )
        )
    quantized = {f"{n}." for n in layers}
    embeddings = [n for n, m in student.backbone.named_modules() if isinstance(m, QuantEmbedding)]
    for embedding in embeddings:
        table = student.backbone.get_submodule(embedding)
        tensors[f"{embedding}.weight_int"] = table.weight_quantizer.to_int(table.weight).to(torch.int8)
        tensors[f"{embedding}.weight_scale"] = table.weight_quantizer.scale.detach().float().reshape(-1).clone()
        quantized.add(f"{embedding}.")
    attention = attention_quantizers(student)
    for name, group in attention.items():
        for role in ROLES:
            tensors[f"{name}.{role}_scale"] = group.quantizer(role).scale.detach().float().reshape(()).clone()
        quantized.add(f"{name}.attn_quantizers.")
    cache = kv_cache_quantizers(student)
    for name, group in cache.items():  # one scale per key/value head
        for role in KV_ROLES:
            tensors[f"{name}.{role}_cache_scale"] = group.quantizer(role).scale.detach().float().reshape(-1).clone()
        quantized.add(f"{name}.kv_quantizers.")
    for pname, value in student.backbone.state_dict().items():
        if not any(pname.startswith(prefix) for prefix in quantized):
            tensors[f"float.{pname}"] = value.detach().clone().contiguous()
    layout = getattr(student, "rotation_layout", None)
    rotation = None if layout is None else asdict(layout)
    smoothing = dict(getattr(student, "smoothing", {}))
    return Contract(tensors, specs, embeddings, list(attention), list(cache), rotation, smoothing)


def save_contract(contract: Contract, folder: Path) -> list[Path]:
    """Write both files into ``folder``; returns their paths."""
    tensors_path = folder / CONTRACT_TENSORS
    meta_path = folder / CONTRACT_META
    save_file(contract.tensors, str(tensors_path))
    meta = {
        "layout": "weight [out, in]",
        "layers": [asdict(spec) for spec in contract.layers],
        "embeddings": contract.embeddings,
        "attention": contract.attention,
        "kv_cache": contract.kv_cache,
        "rotation": contract.rotation,
        "smoothing": contract.smoothing,
    }
    meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return [tensors_path, meta_path]


def load_contract(folder: Path) -> Contract:
    """Read a contract the quantize stage wrote."""
    meta = json.loads((folder / CONTRACT_META).read_text(encoding="utf-8"))
    tensors = load_file(str(folder / CONTRACT_TENSORS))
    layers = [LayerSpec(**spec) for spec in meta["layers"]]
    embeddings = meta.get("embeddings", [meta["embedding"]] if meta.get("embedding") else [])  # older: one table
    attention, cache = meta.get("attention", []), meta.get("kv_cache", [])
    return Contract(tensors, layers, embeddings, attention, cache, meta.get("rotation"), meta.get("smoothing", {}))


def dequantized_weight(contract: Contract, spec: LayerSpec) -> torch.Tensor:
    """``(weight_int - weight_zero_point) * weight_scale`` in ``[out, in]``: the weight the student actually uses."""
    q = contract.tensors[f"{spec.name}.weight_int"].float()
    scale = contract.tensors[f"{spec.name}.weight_scale"]
    zero = contract.tensors.get(f"{spec.name}.weight_zero_point", torch.zeros(scale.shape)).float()
    if spec.group_size:
        groups = q.reshape(spec.out_features, -1, spec.group_size) - zero.unsqueeze(-1)
        return (groups * scale.unsqueeze(-1)).reshape(spec.out_features, spec.in_features)
    return (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)


def dequantized_embedding(contract: Contract, name: str) -> torch.Tensor:
    """The embedding table ``name`` as the student uses it: ``weight_int * weight_scale`` per row."""
    q = contract.tensors[f"{name}.weight_int"].float()
    return q * contract.tensors[f"{name}.weight_scale"].unsqueeze(-1)


def float_state_dict(contract: Contract) -> dict[str, torch.Tensor]:
    """The backbone's non-quantized tensors."""
    return {k[len("float.") :]: v for k, v in contract.tensors.items() if k.startswith("float.")}


@torch.no_grad()
def load_student(teacher: TaskModel, quant: QuantConfig, contract: Contract) -> TaskModel:
    """Rebuild the PyTorch student from a contract: the same fake-quantized function the exporters encode."""
    student = build_student(teacher, dataclasses.replace(quant, quadapter=QuadapterConfig(enabled=False)))
    student.backbone.load_state_dict(float_state_dict(contract), strict=False)
    for spec in contract.layers:
        layer = student.backbone.get_submodule(spec.name)
        multiplier = contract.tensors.get(f"{spec.name}.input_multiplier")
        if multiplier is not None:
            layer.quadapter = FixedMultiplier(multiplier)
        layer.weight.copy_(dequantized_weight(contract, spec))
        scale = contract.tensors[f"{spec.name}.weight_scale"]
        shape = (spec.out_features, -1, 1) if spec.group_size else (spec.out_features, 1)
        layer.weight_quantizer.set_scale(scale.reshape(shape))
        if spec.zero_point:
            layer.weight_quantizer.set_zero_point(contract.tensors[f"{spec.name}.weight_zero_point"].reshape(shape))
        if layer.bias is not None:
            layer.bias.copy_(contract.tensors[f"{spec.name}.bias"])
        if layer.input_quantizer is not None:
            layer.input_quantizer.set_scale(contract.tensors[f"{spec.name}.input_scale"])
    for name in contract.embeddings:
        table = student.backbone.get_submodule(name)
        table.weight.copy_(dequantized_embedding(contract, name))
        table.weight_quantizer.set_scale(contract.tensors[f"{name}.weight_scale"].unsqueeze(-1))
    for name, group in attention_quantizers(student).items():
        for role in ROLES:
            group.quantizer(role).set_scale(contract.tensors[f"{name}.{role}_scale"])
    for name, group in kv_cache_quantizers(student).items():
        for role in KV_ROLES:
            group.quantizer(role).set_scale(contract.tensors[f"{name}.{role}_cache_scale"].reshape(1, -1, 1, 1))
    return student

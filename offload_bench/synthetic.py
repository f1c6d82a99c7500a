"""Random-weight models of a real shape, built on the fly and never saved: for benchmarks.

Offloaded (:func:`random_offloaded`): the experts go straight into the host store layer by layer, so a
Qwen3-30B-A3B or Mixtral-8x7B shape needs host RAM for its experts once and never a whole model. Plain
(:func:`random_plain`): the whole model in host RAM, for the peers' baselines.

Building is kept cheap, because the GPU check builds ten such models in minutes: the values of random weights
do not matter for timing, and forced routing (:mod:`offload_bench.forced_routing`) sets the access pattern.

- Experts are copies of a small bank of random experts (:class:`ExpertBank`), packed into the store's format
  once: a compressed format quantizes ``BANK_EXPERTS`` experts in all (on the CUDA device where there is one)
  instead of every expert of every layer on the CPU, and each layer is one gather into the store.
- Every other weight of ``TILE`` elements or more (embeddings, LM head, attention projections) repeats one
  tile of normal samples instead of drawing its own: drawing a Qwen3 embedding's 311M samples took seconds.
  Smaller ones (norms, routers, biases) are initialized as transformers initializes new models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from offload.config import OffloadConfig
from offload.errors import OffloadError
from offload.hf.install import attach_runtime, new_runtime, take_over_experts
from offload.hf.skeleton import model_class_for
from offload.hf.survey import expert_param_names, experts_modules, survey
from offload.memory.disk_store import DiskStore
from offload.memory.layout import ExpertLayout
from offload.runtime.model_survey import ModelSurvey
from offload.user_cache import user_cache_dir

BANK_EXPERTS = 8  # distinct random experts the weights are filled from
TILE = 1 << 20  # elements of the tile that large non-expert weights repeat


class ExpertBank:
    """``BANK_EXPERTS`` random experts per parameter name, drawn once; layer ``l`` gets a different mix: its
    expert ``e`` is bank expert ``(e + l) % BANK_EXPERTS``. Each layer is a view of one periodic run of
    ``E + BANK_EXPERTS`` bank experts, made once: building a layer copies it once, into the store."""

    def __init__(self, std: float, dtype: torch.dtype, seed: int) -> None:
        self.std = std
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(seed)
        self._bank: dict[str, torch.Tensor] = {}
        self._runs: dict[str, torch.Tensor] = {}

    def drawn(self, name: str, shape: torch.Size) -> torch.Tensor:
        """The bank's own experts for parameter ``name`` of per-layer shape ``shape`` (``[E, ...]``)."""
        if name not in self._bank:
            draw = torch.empty((min(BANK_EXPERTS, shape[0]), *shape[1:]), dtype=torch.float32)
            self._bank[name] = draw.normal_(0.0, self.std, generator=self.generator).to(self.dtype)
        return self._bank[name]

    def experts(self, name: str, shape: torch.Size, layer: int) -> torch.Tensor:
        """``[E, ...]`` weights for parameter ``name`` of MoE layer ``layer``: a view into the bank's run."""
        if name not in self._runs:
            self._runs[name] = periodic_run(self.drawn(name, shape), shape[0])
        return layer_view(self._runs[name], shape[0], layer)

    def packed(
        self, layout: ExpertLayout, shapes: dict[str, torch.Size], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """The bank's experts in ``layout``'s format, as periodic runs ``{field: [E + BANK_EXPERTS, ...]}`` in
        host memory (:func:`layer_view` takes a layer's fields): quantized once, on ``device``, where the
        format is compressed."""
        canonical = layout.canonicalize({p: self.drawn(p, shape) for p, shape in shapes.items()})
        on_device = {name: t.to(device) for name, t in canonical.items()}
        per_expert = [layout.pack(on_device, b) for b in range(next(iter(canonical.values())).shape[0])]
        experts = next(iter(shapes.values()))[0]
        return {
            name: periodic_run(torch.stack([f[name] for f in per_expert]).cpu(), experts)
            for name in per_expert[0]
        }


def periodic_run(bank: torch.Tensor, experts: int) -> torch.Tensor:
    """``[E + n, ...]``: row ``i`` is ``bank[i % n]``, for a bank of ``n`` experts."""
    return bank[torch.arange(experts + bank.shape[0]) % bank.shape[0]]


def layer_view(run: torch.Tensor, experts: int, layer: int) -> torch.Tensor:
    """Layer ``layer``'s ``[E, ...]``, expert ``e`` being bank expert ``(e + layer) % n``: no copy."""
    start = layer % (run.shape[0] - experts)
    return run[start : start + experts]


def _std(hf_config: PretrainedConfig) -> float:
    return float(getattr(hf_config.get_text_config(), "initializer_range", 0.02) or 0.02)


def _quantize_device(config: OffloadConfig) -> torch.device:
    return config.device if config.device.type == "cuda" else torch.device("cpu")


def random_offloaded(
    hf_config: PretrainedConfig, config: OffloadConfig, seed: int = 0, progress: bool = True
) -> PreTrainedModel:
    """An offloaded model of ``hf_config``'s shape with random weights (dtype: ``config.dtype`` or bf16)."""
    model_class, hf_config = model_class_for(hf_config)
    dtype = config.dtype or torch.bfloat16
    with torch.device("meta"):
        model = model_class._from_config(hf_config, dtype=dtype)
    # disk_tier="always": planned and stored as a load would (offload.runtime.host_tier), in a disk store
    # keyed by the config, seed and format, so the next build of the same model only swaps its modules
    on_disk = config.disk_tier == "always"
    runtime = new_runtime(model, dtype, config, model_name=f"random {hf_config.model_type}", reading=on_disk)
    layout = runtime.survey.layout
    store = _disk_store(hf_config, config, runtime, seed) if runtime.tier is not None else None
    bank = ExpertBank(_std(hf_config), dtype, seed)
    packed: dict[str, torch.Tensor] | None = None
    names = runtime.survey.layer_names
    for layer, name in enumerate(tqdm(names, desc="Random experts", disable=not progress)):
        module = model.get_submodule(name)
        if store is not None and store.state == "read":
            take_over_experts(model, runtime, layer, name, stored=True)
            continue
        if packed is None:  # every layer has the same shapes: the bank is packed once
            shapes = {p: getattr(module, p).shape for p in expert_param_names(layout)}  # [E, ...] on meta
            packed = bank.packed(layout, shapes, _quantize_device(config))
        fields = {f: layer_view(run, runtime.survey.num_experts, layer) for f, run in packed.items()}
        take_over_experts(model, runtime, layer, name, packed=fields)
    if runtime.tier is not None:
        runtime.tier.loaded()
    # Everything else: allocated on the device, large weights from a tile, the rest initialized as
    # transformers initializes new models.
    model.to_empty(device=config.device)
    fill_large_weights(model, _std(hf_config), seed)
    torch.manual_seed(seed)
    model.initialize_weights()
    model.eval()
    attach_runtime(model, runtime)
    return model


def _disk_store(hf_config: PretrainedConfig, config: OffloadConfig, runtime: Any, seed: int) -> DiskStore:
    """The disk tier's store of a random model: one per config, seed and expert format."""
    layout = runtime.survey.layout
    identity = dict(
        random=hf_config.to_json_string(use_diff=False),
        seed=seed,
        format=layout.format,
        group=layout.group_size,
        dtype=str(layout.dtype),
    )
    root = Path(config.store_dir) if config.store_dir else user_cache_dir("stores")
    store = DiskStore.open(root, identity, layout, runtime.survey.num_layers, runtime.survey.num_experts)
    if store.state == "off":
        raise OffloadError(f"the disk tier cannot keep this model's experts in {root}: see the warning above")
    runtime.tier.use_store(store)
    return store


def random_plain(hf_config: PretrainedConfig, dtype: torch.dtype, seed: int) -> PreTrainedModel:
    """A plain transformers model in host RAM with random weights, filled as :func:`random_offloaded` fills its
    store, everything else as :func:`random_offloaded` fills it."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.to_empty(device="cpu")
    model.requires_grad_(False)
    bank = ExpertBank(_std(hf_config), dtype, seed)
    for layer, (_, module) in enumerate(experts_modules(model)):
        for name, param in module.named_parameters(recurse=False):
            param.copy_(bank.experts(name, param.shape, layer))
            param._is_hf_initialized = True  # type: ignore[attr-defined]  # initialize_weights skips it
    del bank
    fill_large_weights(model, _std(hf_config), seed)
    torch.manual_seed(seed)
    model.initialize_weights()
    return model.eval()


@torch.no_grad()
def fill_large_weights(model: PreTrainedModel, std: float, seed: int) -> None:
    """Every floating parameter of ``TILE`` elements or more not yet initialized: a repeated tile of normal
    samples (std ``std``), marked initialized so that ``initialize_weights`` leaves it."""
    generator = torch.Generator().manual_seed(seed + 1)
    tiles: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
    for param in model.parameters():
        if (
            param.numel() < TILE
            or not param.is_floating_point()
            or getattr(param, "_is_hf_initialized", False)
        ):
            continue
        key = (param.dtype, param.device)
        if key not in tiles:
            tile = torch.empty(TILE, dtype=torch.float32).normal_(0.0, std, generator=generator)
            tiles[key] = tile.to(dtype=param.dtype, device=param.device)
        tile, flat = tiles[key], param.view(-1)
        whole = flat.numel() // TILE * TILE
        flat[:whole].view(-1, TILE).copy_(tile.expand(whole // TILE, TILE))
        flat[whole:].copy_(tile[: flat.numel() - whole])
        param._is_hf_initialized = True  # type: ignore[attr-defined]


def shape_survey(hf_config: PretrainedConfig, dtype: torch.dtype) -> ModelSurvey:
    """The runtime's view of a config (MoE layers, expert bytes, resident bytes), from a meta-device model."""
    model_class, hf_config = model_class_for(hf_config)
    with torch.device("meta"):
        model = model_class._from_config(hf_config, dtype=dtype)
    return survey(model, dtype)

"""The expert cache a config asks for: its policy, with the options the config and the model fill in."""

from __future__ import annotations

from typing import Any

from cache_policies import (
    AccessSequence,
    ExpertCache,
    TraceError,
    expert_counts,
    load_trace,
    make_policy_factory,
)
from cache_policies.cache import PolicyFactory
from offload.config import OffloadConfig
from offload.errors import OffloadError
from offload.runtime.model_survey import ModelSurvey


def build_cache(config: OffloadConfig, survey: ModelSurvey, slots: int) -> ExpertCache:
    """The cache over ``slots`` device slots: one partition, or one per layer with ``cache_scope="layer"``."""
    per_layer = config.cache_scope == "layer"
    layers, experts = survey.num_layers, survey.num_experts
    return ExpertCache(
        layers,
        experts,
        slots // layers if per_layer else slots,
        policy_factory(config, layers, experts, survey.top_k),
        scope=config.cache_scope,
    )


def policy_factory(config: OffloadConfig, num_layers: int, num_experts: int, top_k: int) -> PolicyFactory:
    """The cache policy the config names, with the options it needs filled in from the config and model."""
    options: dict[str, Any] = dict(config.policy_options)
    if config.policy == "random":
        options.setdefault("seed", config.seed)
    if config.policy == "static":
        if config.static_profile is None:
            raise OffloadError(
                "policy 'static' pins the experts a profiling run used most: pass static_profile=<trace file> "
                "(offload-run --static-profile; record one with --record-trace)"
            )
        try:
            counts = expert_counts(AccessSequence.from_trace(load_trace(config.static_profile)))
        except (TraceError, OSError) as exc:
            raise OffloadError(f"static profile: {exc}") from None
        if counts.shape != (num_layers, num_experts):
            raise OffloadError(
                f"static profile {config.static_profile} has {counts.shape[0]} layers x {counts.shape[1]} experts; "
                f"this model has {num_layers} x {num_experts}"
            )
        # Top-k dynamic slots: one token's experts fit without unpinning anything (as the simulator does).
        options.update(profile=counts, dynamic_slots=top_k, scope=config.cache_scope)
    try:
        return make_policy_factory(config.policy, **options)
    except ValueError as exc:
        raise OffloadError(str(exc)) from None

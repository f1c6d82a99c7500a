"""Scheduling: the runtime that wires host store, slot pool, copy engine, cache and kernel for one model
(``runtime``), the owner of one MoE layer call (``layer_step``), the budget planner (``budget``), the model
facts it plans from (``model_survey``), the cache a config asks for (``policy``), the routing recorder and the
predictors that run a model's routers. No transformers here: ``offload.hf`` feeds it."""

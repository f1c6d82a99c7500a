"""Integration with transformers, the only part of ``offload`` that imports it.

``checkpoint`` (finding and validating safetensors checkpoints), ``quantized`` (quantized checkpoints),
``architectures`` (which model types work, read from transformers), ``skeleton`` (the model on the meta
device), ``survey`` (a model into a ModelSurvey), ``load`` (the streaming load), ``install`` (the experts
modules swapped, the runtime handle), ``experts`` (the module that replaces them), ``activation`` (an experts
module's nonlinearity), ``generation`` (tokenizer and timed generation), ``demo`` (the embedded checkpoint).
"""

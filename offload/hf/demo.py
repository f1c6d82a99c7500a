"""The embedded demo: a random-weight Mixtral-architecture checkpoint with a byte-level tokenizer.

Built once into a cache folder (about 300 MB in bf16), so ``offload-run`` with no ``--model`` exercises the
real loading path, the cache and the copy engine on any machine. The weights are random: the text is noise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

# v3: the tokenizer has a chat template (offload-serve's chat endpoint); the weights are v2's.
DEMO_NAME = "demo-mixtral-random-v3"
# 8 MoE layers x 8 experts, top-2: 64 experts of 4.5 MiB each in bf16.
DEMO_ARCH: dict[str, Any] = dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
)
DEMO_CACHE_FRACTION = 0.25  # the demo budget holds about a quarter of the experts
DEMO_PROMPT = "Offloading experts to host memory lets a small GPU run a large model."
# Each message between <s> and </s>, its role on the first line; the reply opens with "<s>assistant".
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/moe-offload`` (the XDG convention), else ``~/.cache/moe-offload``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moe-offload"


def demo_checkpoint(root: Path | None = None) -> Path:
    """Path of the demo checkpoint, building it on first use. Built in a temp folder and renamed into place,
    so an interrupted build never leaves a half-written checkpoint behind."""
    target = (root or cache_root()) / DEMO_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=target.parent))
    try:
        _build(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build(directory: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = DEMO_CHAT_TEMPLATE
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **DEMO_ARCH,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the same random weights on every machine
    try:
        model = MixtralForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]
    finally:
        torch.random.set_rng_state(generator_state)
    # Random logits over bytes would mostly pick bytes that are not valid UTF-8 on their own. Zeroing every
    # output row but printable ASCII keeps the noise readable (a positive logit among 95 rows always wins).
    printable = [tokenizer.encode(chr(c))[0] for c in range(32, 127)]  # one byte, one token
    keep = torch.zeros(len(tokenizer), dtype=torch.bool)
    keep[printable] = True
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def byte_tokenizer():
    """A byte-level tokenizer: 256 byte tokens plus <s>, </s>, <pad>; any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )

"""The tokenizer files of a Hugging Face checkpoint directory, Long-VITA's 17 tokens included.

`tokenizer_files(tokenizer)` gives the texts `lvita_model.weights.save_pretrained` writes beside
the weights (``extra_files``), so that ``transformers.AutoTokenizer.from_pretrained(directory)``
loads the tokenizer offline, no remote code, with the same ids as lvita's own tokenizer
(`lvita_data.tokenizer`):

- ``tokenizer.json``: the `tokenizers` pipeline as is (Qwen2.5's BPE, its 22 special tokens and
  Long-VITA's 17, ``<img>`` 151665 ... ``<video>`` 151681, as special added tokens);
- ``tokenizer_config.json``: ``tokenizer_class: Qwen2Tokenizer``, every added token under
  ``added_tokens_decoder`` (special, not normalized, no strip), EOS ``<|im_end|>``, pad
  ``<|endoftext|>``, no BOS, and the training template as ``chat_template`` (ChatML, no default
  system prompt; reference section 3);
- ``special_tokens_map.json``, ``added_tokens.json``, and ``vocab.json`` + ``merges.txt`` for
  tools that build the slow (pure Python) tokenizer.

It lives in `pipelines` because `lvita_model` never imports the tokenizer stack.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lvita_data.tokenizer.tokenizer import LongVitaTokenizer

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Reference section 3's ChatML, as `pipelines.generate` lays a prompt out."""


def tokenizer_files(tokenizer: LongVitaTokenizer, *, model_max_length: int) -> dict[str, str]:
    """File name -> text of the tokenizer files (module docstring)."""
    from lvita_data.tokenizer.special_tokens import LONGVITA_SPECIAL_TOKENS

    backend = tokenizer.backend
    tokenizer_json = backend.to_str()
    spec = json.loads(tokenizer_json)
    added = {int(i): token for i, token in backend.get_added_tokens_decoder().items()}
    missing = [t for t in LONGVITA_SPECIAL_TOKENS if t not in {a.content for a in added.values()}]
    assert not missing, f"the tokenizer lacks Long-VITA tokens {missing}"
    specials = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    additional = ["<|im_start|>", "<|im_end|>", *LONGVITA_SPECIAL_TOKENS]
    config: dict[str, Any] = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(i): {
                "content": token.content,
                "lstrip": token.lstrip,
                "normalized": token.normalized,
                "rstrip": token.rstrip,
                "single_word": token.single_word,
                "special": token.special,
            }
            for i, token in sorted(added.items())
        },
        "additional_special_tokens": additional,
        "bos_token": None,
        "unk_token": None,
        **specials,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": model_max_length,
        "split_special_tokens": False,
    }
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": _json(config),
        "special_tokens_map.json": _json({**specials, "additional_special_tokens": additional}),
        "added_tokens.json": _json({token.content: i for i, token in sorted(added.items())}),
        "vocab.json": _json(spec["model"]["vocab"], indent=None),
        "merges.txt": _merges(spec["model"]["merges"]),
    }


def _merges(merges: list[Any]) -> str:
    """``merges.txt``: a version line, then one ``left right`` pair per line (tokenizers writes
    pairs as lists since 0.20, as ``"left right"`` strings before)."""
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return "#version: 0.2\n" + "\n".join(lines) + "\n"


def _json(data: Any, indent: int | None = 2) -> str:
    return json.dumps(data, indent=indent, ensure_ascii=False) + "\n"

"""Text tokenizer: the Qwen2.5 BPE (`tokenizer`) and Long-VITA's special tokens
(`special_tokens`)."""

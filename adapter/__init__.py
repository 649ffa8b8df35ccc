"""LLaMA-Adapter core: the frozen LLaMA, adaption prompts with zero-init gated attention,
checkpoint and adapter files, tokenizer, prompt templates and generation. No Ray in here."""

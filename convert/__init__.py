"""edgevlm.convert: Hugging Face checkpoints -> GGUF (LLM + vision projector)."""

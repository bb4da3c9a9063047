"""Bridges to model runtimes: Hugging Face transformers (:mod:`kvstore.integrations.hf`)."""

"""Real-model evaluation: load a small LLM offline (:mod:`.model`), long texts (:mod:`.corpus`),
continuation perplexity with substituted KV (:mod:`.perplexity`)."""

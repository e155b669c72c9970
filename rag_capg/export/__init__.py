"""Export: a run's encoder as a sentence-transformers folder with a model card, optionally to the Hub."""

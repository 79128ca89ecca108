"""The framework adapters: Lightning and Hugging Face callbacks."""

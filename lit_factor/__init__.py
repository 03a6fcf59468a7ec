"""lit-factor: fine-tune Hugging Face transformers while factorizing their linear layers."""

__version__ = "0.1.0"

"""lit-factor: fine-tune Hugging Face transformers while factorizing their linear layers.

``lit_factor.load_pretrained(DIR)`` loads a model exported with ``python cli.py export --format hf``.
"""

__version__ = "0.1.0"

__all__ = ["load_pretrained"]


def __getattr__(name: str):
    # Lazy: ``import lit_factor.errors`` (pure Python) must not pull in torch and transformers.
    if name == "load_pretrained":
        from lit_factor.deploy.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'lit_factor' has no attribute {name!r}")

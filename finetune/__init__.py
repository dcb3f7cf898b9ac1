"""finetune: one `kubectl apply` to a fine-tuned, evaluated and served language model."""

__version__ = "0.1.0"

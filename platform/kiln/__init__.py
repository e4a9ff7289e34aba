"""kiln: pretrain GPT-style Transformers with Hydra, Ray Train, DeepSpeed ZeRO and WebDataset."""

__version__ = "0.1.0"

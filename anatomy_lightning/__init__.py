"""GRPO fine-tuning of vision-language models for surgical anatomy, with the Anatomy-R1 curriculum
(option-similarity stages) and group-diversity question augmentation, on PyTorch Lightning."""

__version__ = "0.1.0"

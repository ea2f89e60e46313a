"""LoRA fine-tuning of LLaMA in plain PyTorch and SentencePiece, run inside the job's container.

Each module does one job and the ones with a command line run as `python -m trainer.NAME`.
"""

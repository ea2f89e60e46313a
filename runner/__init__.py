"""runner: take an ML fine-tuning job from a laptop to a rented GPU and back."""

__version__ = "0.1.0"

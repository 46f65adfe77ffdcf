"""PyTorch models trained by zsgd through ``--model torch:package.module:factory`` (see resnet.py)."""

"""Benchmarks against outside baselines, run as `skinlesion bench prepare|predict|files|harness|serve`.

Each measures skinlesion against what a user would otherwise do, in the same run: `prepare` against a
single-process decode/resize/encode loop, `files` (the shard loader) against JPEG files through
torchvision's ImageFolder, `harness` (the training step) against a bare PyTorch loop, `predict` (batched)
against one image at a time, `serve` (batched) against a server answering one image at a time. The
loader/step/train measurements of the GPU story live in `skinlesion.bench`.
"""

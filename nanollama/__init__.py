"""nanollama: kernel-optimised training of small language models on synthetic data.

Kept deliberately light: `import nanollama.kernels` must not load the trainer, data or model code.
"""

__version__ = "0.1.0"

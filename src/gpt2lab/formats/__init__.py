"""How model weights are laid out on disk: gpt2lab's own layout and the transformers exports."""

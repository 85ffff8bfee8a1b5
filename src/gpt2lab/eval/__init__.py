"""Evaluation: HellaSwag (both standard scorings), the CORE metric (DCLM, as nanochat computes it), loss,
perplexity and bits per byte on a prepared dataset, and run reports."""

"""The verbs over gpt2lab's top-level modules (sample, convert, report), one module each; the verbs
of a stage package live in that package's cli.py (data, train, eval, serve)."""

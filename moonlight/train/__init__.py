"""Training stack: job config (config.py), tokenizers (tokenizer.py), data (data.py).

Kept import-free so that `import moonlight.train.config` stays cheap."""

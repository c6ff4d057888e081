"""Training: the job config (config.py, config_io.py), what a run is built from (build.py), optimizers,
schedules, metrics and the loop (trainer.py). Text and data live in moonlight.data.

Kept import-free so that `import moonlight.train.config` stays cheap."""

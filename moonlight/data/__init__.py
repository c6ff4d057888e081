"""Text and data: tokenizers, chat rendering, documents, Megatron files, packing and loaders.

Used by training, generation and `python -m moonlight.prepare_data`; imports nothing above errors,
outputs and distributed.
"""

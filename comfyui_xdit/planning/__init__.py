"""A speed model of the engine and a layout planner built on it (issue 13).

``model_shape`` reads what the model needs from a spec alone (no weights), ``traffic`` counts the bytes
each parallel axis sends per step (the formulas the engine's ``CommCounter`` is tested against),
``hardware`` describes GPUs and links, ``latency_model`` predicts seconds per generation for a layout,
and ``planner`` searches the layouts a pool allows for the fastest one. Every number it prints is
modelled, never measured.
"""

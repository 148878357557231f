"""What is done with a trained backbone: probes, export, pictures.

The command lines are the top-level modules `evaluate`, `dense_eval`,
`export` and `visualize` (`python -m mcl_jax.evaluate`, ...).

* `core`: what every evaluation shares (normalised frozen forward, padded
  batches, variable subset, random-init baseline, trained-vs-random table).
* `probes`: kNN and linear probe on frozen pooled C5 features.
* `dense_probe`: the linear per-pixel (segmentation) probe on frozen FPN maps.
* `exporters`: detectron2 (.pkl) and torchvision (.pth) weights.
* `pictures`: the crop grid and montage canvases as PNGs.
"""

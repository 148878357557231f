"""What is done with a trained backbone: probes, export, pictures.

The command lines are the top-level modules of the same names
(`python -m mcl_jax.evaluate`, `.dense_eval`, `.export`, `.visualize`).

* `evaluate`: kNN and linear probe on frozen pooled C5 features.
* `dense_eval`: the linear per-pixel (segmentation) probe on frozen FPN maps.
* `export`: detectron2 (.pkl) and torchvision (.pth) weights.
* `visualize`: the crop grid and montage canvases as PNGs.
"""

"""The network: ResNet, the BN FPN, the region neck and predictors, and their parts.

* `resnet`, `fpn`: ResNet (torchvision layout, PyTorch padding) and the FPN.
* `roi_align`: RoIAlign with torchvision's `aligned=True` semantics.
* `heads`: the region neck (4 convs + MLP) and the per-level predictors.
* `batch_norm`: BatchNorm with a backward pass that keeps only its input,
  and `GroupedBatchNorm` (statistics per montage level).
* `remat`: `model.remat`, recomputation whose backward waits for its cotangent.
* `montage_layout`: the montage geometry (`Layout`): which tiles, where, at
  which level; region cutting reads it.
* `model`: `MCLNet`, region cutting, `create_model`.
"""

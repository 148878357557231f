"""Detection fine-tuning: a Mask R-CNN (ResNet-50-FPN) on top of the pretrained backbone.

A layer above `training`: it may import `nn`, `data`, `eval`, `training` and
the leaf modules; nothing in the package imports it except the `finetune`
command. Everything that runs on the device is written with static shapes
(ground truth padded to a fixed count, fixed proposal and RoI counts, NMS as
array operations), so one canvas shape compiles once.

The box operations (`boxes`, `anchors`, `matching`, `nms`, `mask_targets`)
follow detectron2's conventions: boxes are float32 (x1, y1, x2, y2) in canvas
pixels, a box's width is x2 - x1, anchors are centred at x * stride.
"""

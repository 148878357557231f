"""The pretext task: montages of crops, the multi-level loss, the batch objective.

* `montage`: layouts (`Layout`, `layout_for`) and canvas assembly, per device
  under `shard_map`.
* `losses`: the multi-level InfoNCE and the supervised cross-entropy.
* `objective`: a batch of crops through both networks to the loss.
"""

"""The training system: state, optimizer, the sharded step and the loop around it.

* `state`: `TrainState`, its creation, the mesh, `apply_update` (step + EMA).
* `optim`: LARS and the learning-rate schedule.
* `step`: the jitted, sharded train step.
* `loop`: `train_and_evaluate`, the whole run (checks, resume, steps, evaluation).
* `signals`: SIGTERM / SIGINT: finish the step, save, exit 0.
* `checkpointing`: Orbax checkpoints, the saved config, loading for tools.
* `logs`: console step lines, TensorBoard scalars, metrics.jsonl.
* `memory`: the saved-residuals audit and the pre-run memory check.
"""

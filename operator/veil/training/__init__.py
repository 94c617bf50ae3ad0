"""DP training: `veil train`, the program a ConfidentialModel's training Job runs.

- `train.train`: check the spec against the table's header, read the rows (per-record
  parsing and filtering), fit at ε on clipped, publicly bounded features with the declared
  classes, optionally release a paid DP accuracy estimate, check the ONNX export on points of
  the public bounds box, seal it to the model key and write it by URI;
- `data`: the header checks, per-record parsing and keyed-hash sampling (split, forest);
- `learners`: the three diffprivlib learners, made to know only the declared classes;
- `dpsgd`: the DP-SGD networks (`mlp`, `cnn`) with Opacus, and their ONNX export (torch and
  Opacus imported there only, from the `dpsgd` extra);
- `distributed`: DP-SGD across a PyTorchJob's replicas (WORLD_SIZE > 1), the same event;
- `evaluate`: the DP accuracy estimate;
- `claim.mechanisms`: what a run spends, for the trainer's result and the controller's claim;
- `commands.register`: the CLI subcommand.
"""

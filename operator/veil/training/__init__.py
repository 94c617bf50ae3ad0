"""DP training: `veil train`, the program a ConfidentialModel's training Job runs.

- `train.train`: diffprivlib fit at ε on clipped, publicly bounded features, ONNX export
  checked against the trained model, sealed to the model key, written by URI;
- `train.claim_mechanisms`: what a run spends (pure ε), in the privacy ledger's wire format;
- `commands.register`: the CLI subcommand.
"""

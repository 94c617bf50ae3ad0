"""DP synthetic data: `veil synthesize`, the program a SyntheticDataset's Job runs.

- `privacy.claim_mechanisms`: what a run spends, in the privacy ledger's wire format (the
  synthesizer, the DP report, the preprocessor and value discovery, all out of one ε/δ);
- `domain`: every column's public domain (declared, or found by `dp`), the per-record
  encoding onto it;
- `dp`: the run's own mechanisms — value discovery, private bounds, the report's marginals;
- `synthesize.synthesize`: the run itself (header check, DP steps, fit MST/AIM, sample, write);
- `quality`: the DP report, and exact TVD helpers for benchmarks on public data;
- `commands.register`: the CLI subcommand.
"""

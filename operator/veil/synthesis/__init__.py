"""DP synthetic data: `veil synthesize`, the program a SyntheticDataset's Job runs.

- `privacy.claim_mechanisms`: what a run spends, in the privacy ledger's wire format;
- `synthesize.synthesize`: the run itself (read, encode, fit MST/AIM, sample, write, report);
- `quality`: marginal TVD, correlation difference and DCR figures of the report;
- `commands.register`: the CLI subcommand.
"""

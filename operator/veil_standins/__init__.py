"""LOCAL STAND-INS for the Azure services Veil talks to. They are NOT security boundaries.

For development and tests on a machine without Azure and without a TEE; never for real keys:

- keyvault: the Key Vault keys REST API, Secure Key Release included (every key is plain
  memory of this process);
- maa: a Microsoft Azure Attestation instance that signs tokens for a SIMULATED confidential VM
  (no hardware is attested);
- skr: the Secure Key Release sidecar, `python -m veil_standins.skr`, which releases keys
  through the two above;
- arm: the ARM agentPools endpoints of AKS;
- `python -m veil_standins` serves keyvault, maa and arm over HTTPS under a throwaway CA.

They speak the real services' wire formats so that Veil's real clients (the Azure SDKs, its
SKR client, its token verifier) are what the tests exercise.
"""

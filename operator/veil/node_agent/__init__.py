"""Veil's node agent: attests an Azure confidential-VM node through its vTPM and releases model
keys from Key Vault to the authorized pods of that node (see server.py for the API)."""

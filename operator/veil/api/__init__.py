"""Veil's custom resources as pydantic models: the single source of truth for the CRDs."""

from veil.api.base import Condition, CustomResource
from veil.api.confidential_model import ConfidentialModel
from veil.api.privacy_budget import PrivacyBudget
from veil.api.synthetic_dataset import SyntheticDataset

KINDS: tuple[type[CustomResource], ...] = (ConfidentialModel, PrivacyBudget, SyntheticDataset)

__all__ = [
    "KINDS",
    "Condition",
    "ConfidentialModel",
    "CustomResource",
    "PrivacyBudget",
    "SyntheticDataset",
]

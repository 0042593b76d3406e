"""Model adapters: wrap a pretrained network as ordered, named layer groups with a new head."""

from tunelab.adapters.groups import Adapter, LayerGroup

__all__ = ["Adapter", "LayerGroup"]

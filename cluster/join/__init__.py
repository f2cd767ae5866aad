"""Joining a node to the cluster: one-time tickets minted by the provider (`tickets`) and the
head's HTTP service that redeems them for the Ray token (`service`). The node's side is
`cluster.node.join`. The protocol is described in `docs/join.md`."""

from .tickets import InstanceState, JoinError, LivenessUnknown, TicketBook

__all__ = ["InstanceState", "JoinError", "LivenessUnknown", "TicketBook"]

"""The names of Hyperfleet's Ray custom resources: nodes advertise them (the node agent, the
local stack, `cluster.yaml`) and agent replicas request them (`actors.spec`)."""

# One per VM: an `isolation: vm` replica takes the whole VM, so tenants' tools never share one.
VM_SLOT_RESOURCE = "hyperfleet_vm_slot"
# `hyperfleet_mig_<profile>` (e.g. `hyperfleet_mig_1g.10gb`): one per MIG instance of a profile.
MIG_RESOURCE_PREFIX = "hyperfleet_mig_"

"""The node agent: what a VM runs as its entrypoint (`hyperfleet node`).

It reads its settings from `HYPERFLEET_*` env (`settings`), finds GPUs and MIG instances with
NVML (`gpus`), redeems its one-time join ticket for the cluster's Ray token (`join`), builds
the `ray start --block` command with the right resources and labels (`ray_start`), runs and
supervises it (`agent`), keeps a spare Ray worker warm (`warm_workers`), and reads Ray's node
table from the GCS (`gcs`).
"""

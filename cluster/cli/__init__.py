"""The `hyperfleet` command (`commands`) and the local stack it starts (`stack`, `daemon`,
`servers`): `up`, `down`, `status`, `chat`, `agents`, and the entrypoints `node`, `emulator` and
`hypercore serve`.

This package imports nothing itself, and each command imports what it needs when it runs:
`hyperfleet node` (a VM's entrypoint) and `--help` load neither the emulator nor the Hypercore
stand-in.
"""
